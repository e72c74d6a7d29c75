"""The tokenizer of a converted Hugging Face folder: copied from a tokenizer folder, or built from a
sentencepiece ``.model`` (InternEvo's ``tokenizer_internlm2.model``) as a ``tokenizer.json`` that
``AutoTokenizer`` loads without remote code, encoding exactly as sentencepiece does (BPE or unigram, byte
fallback, sentencepiece's whitespace rules; bos added, eos not, as InternLM's tokenizers do)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _spm_to_fast(model_file: Path):
    """A ``transformers`` fast tokenizer equivalent to the sentencepiece model in ``model_file``."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError
        raise ValueError(f"--tokenizer {model_file} is not a sentencepiece model ({exc})") from exc
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]  # type: 1 normal, 2 unk, 3 control, 6 byte
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unk = pieces[spec.unk_id][0]
    if spec.model_type == 2:  # BPE: merges of every normal piece, highest score first
        merges = []
        for i in sorted((i for i, (p, _, t) in enumerate(pieces) if t == 1 and len(p) > 1),
                        key=lambda i: -pieces[i][1]):
            piece = pieces[i][0]
            pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            merges += sorted(pairs, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)
    elif spec.model_type == 1:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        raise ValueError(f"--tokenizer {model_file}: sentencepiece model type {spec.model_type} is neither BPE nor "
                         "unigram")
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t in (2, 3)])
    name = {i: pieces[i][0] for i in (spec.bos_id, spec.eos_id, spec.pad_id) if 0 <= i < len(pieces)}
    bos, eos = name.get(spec.bos_id), name.get(spec.eos_id)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, spec.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   pad_token=name.get(spec.pad_id, eos), clean_up_tokenization_spaces=False)


def _special_ids_from_files(folder: Path) -> dict[str, int | None]:
    """bos/eos/pad ids from ``tokenizer.json`` and the special-token names in the tokenizer's json files."""
    from tokenizers import Tokenizer

    names: dict = {}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / fname).is_file():
            names.update({k: v for k, v in json.loads((folder / fname).read_text()).items() if k.endswith("_token")})
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = {}
    for kind in ("bos", "eos", "pad"):
        name = names.get(f"{kind}_token")
        name = name.get("content") if isinstance(name, dict) else name
        ids[f"{kind}_token_id"] = tok.token_to_id(name) if name else None
    return ids


def write_tokenizer(src: Path, folder: Path) -> dict[str, int | None]:
    """Put a tokenizer into ``folder``; return its bos/eos/pad token ids for ``config.json``.

    ``src`` is a sentencepiece ``.model`` file (converted, and also copied as ``tokenizer.model``) or a folder
    holding a Hugging Face tokenizer (its tokenizer files are copied; a folder with only ``tokenizer.model`` and
    remote code is converted from that model).
    """
    from transformers import AutoTokenizer

    src = Path(src)
    if src.is_file():
        tok = _spm_to_fast(src)
        tok.save_pretrained(folder)
        shutil.copyfile(src, folder / "tokenizer.model")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name every transformers version knows
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    elif src.is_dir():
        copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        copied += [p.name for p in src.glob("tokenization_*.py")]
        if not copied:
            raise ValueError(f"--tokenizer {src} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        for name in copied:
            shutil.copyfile(src / name, folder / name)
        if not (src / "tokenizer.json").is_file():
            if not (src / "tokenizer.model").is_file():
                raise ValueError(f"--tokenizer {src}: no tokenizer.json and no tokenizer.model to build one from")
            _spm_to_fast(src / "tokenizer.model").backend_tokenizer.save(str(folder / "tokenizer.json"))
        try:
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except Exception:  # e.g. a tokenizer class that only exists as remote code: read the ids from the files
            return _special_ids_from_files(folder)
    else:
        raise ValueError(f"--tokenizer {src} does not exist (a sentencepiece .model file or a tokenizer folder)")
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}

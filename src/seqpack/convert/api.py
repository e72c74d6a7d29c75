"""The two conversions: InternEvo ``model_tp{t}_pp{p}.pt`` folders <-> Hugging Face folders (InternLM, InternLM2).

    from seqpack.convert import internevo_to_hf, hf_to_internevo
    print(hf_to_internevo("hf_ckpt", "evo_ckpt", tp_size=2, pp_size=2))
    print(internevo_to_hf("evo_ckpt", "hf_again", tokenizer="tokenizer.model", dtype="float32", verify=True))

Both read everything, check it, and only then write into a temp folder that replaces ``tgt`` in one rename.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from . import families, hf, internevo
from .atomic import parse_size, staging
from .families import Arch
from .layouts import Split, merge_tp, split_pp, split_tp

# keys of each family after per-file normalisation (anything else in a shard file is an error)
ALLOWED = {
    "internlm2": re.compile(r"^(layers\.\d+\.(attention\.(wqkv|wo)\.(weight|bias)|feed_forward\.w[123]\.weight|"
                            r"attention_norm\.weight|ffn_norm\.weight)|tok_embeddings\.weight|norm\.weight|"
                            r"output\.weight)$"),
    "internlm": re.compile(r"^(blocks\.\d+\.(mixer\.(Wqkv|out_proj)\.(weight|bias)|mlp\.w[123]\.weight|"
                           r"norm[12]\.weight)|embedding\.weight|norm\.weight|head\.weight)$"),
}
ALIASES = [("tok_embeddings.word_embeddings.", "tok_embeddings."), ("embedding.word_embeddings.", "embedding."),
           (".mixer.wqkv.", ".mixer.Wqkv.")]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass
class Summary:
    """What a conversion did (``str()`` is the printed report)."""

    direction: str
    family: str
    src: Path
    tgt: Path
    layers: int
    parameters: int
    dtype: str
    tp_in: int = 1
    pp_in: int = 1
    tp_out: int = 1
    pp_out: int = 1
    files: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    max_abs_logit_diff: float | None = None

    def __str__(self) -> str:
        lines = [f"converted {self.family} {self.direction}: {self.src} -> {self.tgt}",
                 f"  layers {self.layers}, parameters {self.parameters:,}, dtype {self.dtype}",
                 f"  tp {self.tp_in} -> {self.tp_out}, pp {self.pp_in} -> {self.pp_out}, "
                 f"{len(self.files)} weight file(s):"]
        lines += [f"    {name}  {size / 2**20:.2f} MiB" for name, size in self.files]
        lines += [f"  note: {n}" for n in self.notes]
        if self.max_abs_logit_diff is not None:
            lines.append(f"  verify: max |logit difference| = {self.max_abs_logit_diff:.3g}")
        return "\n".join(lines)


def _fuse_split_qkv(state: dict, cfg: dict, family: str, path: Path) -> None:
    """Per rank, fold ``wq``/``wk``/``wv`` (written by newer InternEvo or with ``enable_qkv_fusion=False``) back into
    the fused tensor. InternLM2 with ``enable_qkv_fusion`` (default) saves ``wq, wk, wv`` as consecutive row blocks of
    the group-major ``wqkv``; without fusion they are true q/k/v heads that are regrouped ``[g: q.., k, v]``."""
    mixer = ".attention." if family == "internlm2" else ".mixer."
    fused = "wqkv" if family == "internlm2" else "Wqkv"
    for key in [k for k in state if f"{mixer}wq." in k]:
        names = [key.replace(f"{mixer}wq.", f"{mixer}w{c}.") for c in "qkv"]
        if missing := [n for n in names if n not in state]:
            raise ValueError(f"{path}: {key} without {missing}")
        parts = [state.pop(n) for n in names]
        if family == "internlm2" and not cfg.get("enable_qkv_fusion", True):
            d = cfg["hidden_size"] // cfg["num_attention_heads"]
            groups = parts[1].shape[0] // d  # kv heads on this rank
            parts = [p.reshape(groups, -1, *p.shape[1:]) for p in parts]  # [g, rows of q / k / v, ...]
            state[key.replace(f"{mixer}wq.", f"{mixer}{fused}.")] = torch.cat(parts, 1).flatten(0, 1)
        else:
            state[key.replace(f"{mixer}wq.", f"{mixer}{fused}.")] = torch.cat(parts)


def _normalizer(cfg: dict, family: str | None):
    seen = {"family": family}

    def normalize(state: dict, path: Path) -> dict:
        out = {}
        for key, tensor in state.items():
            if key.endswith(".inv_freq"):
                continue
            key = key.removeprefix("model.")
            for old, new in ALIASES:
                key = key.replace(old, new) if old.startswith(".") else (
                    new + key[len(old):] if key.startswith(old) else key)
            out[key] = tensor
        fam = seen["family"] or ("internlm" if any(k.startswith("blocks.") for k in out) else "internlm2")
        seen["family"] = fam
        _fuse_split_qkv(out, cfg, fam, path)
        if unknown := sorted(k for k in out if not ALLOWED[fam].match(k)):
            raise ValueError(f"{path}: unknown key(s) {unknown[:6]} for an InternEvo {fam} checkpoint "
                             "(pass --model if the family was guessed wrong)")
        return out

    return normalize, seen


def _interleaved(cfg: dict, override: bool | None) -> bool:
    if override is not None:
        return override
    if "qk_interleaved" in cfg:
        return bool(cfg["qk_interleaved"])
    if "adapt_hf" in cfg:
        return not cfg["adapt_hf"]
    raise ValueError("model_config.pt has neither qk_interleaved nor adapt_hf, so the rotary layout of wq/wk is "
                     "unknown: pass --qk_interleaved true if the model ran with interleaved rotary (InternEvo "
                     "qk_interleaved=True / adapt_hf=False), --qk_interleaved false otherwise")


def _missing_tp_ratio(state: dict, arch) -> int | None:
    """k when every mis-shaped tensor is exactly 1/k of its expected size along one dimension (the files of the
    higher tensor-parallel ranks are missing), else None."""
    ratios = set()
    for name, want in families.hf_shapes(arch).items():
        got = tuple(state[name].shape) if name in state else want
        if got == want:
            continue
        diff = [d for d in range(len(want)) if len(got) == len(want) and got[d] != want[d]]
        if len(diff) != 1 or got[diff[0]] == 0 or want[diff[0]] % got[diff[0]]:
            return None
        ratios.add(want[diff[0]] // got[diff[0]])
    return ratios.pop() if len(ratios) == 1 else None


def _check_internevo_config(cfg: dict, where: Path) -> None:
    need = ["num_layers", "hidden_size", "num_attention_heads", "vocab_size"]
    if missing := [k for k in need if k not in cfg]:
        raise ValueError(f"{where}/model_config.pt: missing key(s) {missing}")
    for key, ok in (("norm_type", "rmsnorm"), ("apply_post_layer_norm", False), ("use_swiglu", True),
                    ("num_chunks", 1)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{where}/model_config.pt: {key}={cfg[key]!r} is not supported (only {ok!r})")


def _arch_from_internevo(cfg: dict, rank0: dict, tp: int, family: str, version: int | None, where: str) -> Arch:
    H, N = cfg["hidden_size"], cfg["num_attention_heads"]
    lay, mlp = ("layers.0.", "feed_forward.") if family == "internlm2" else ("blocks.0.", "mlp.")
    if missing := [k for k in (lay + mlp + "w1.weight", lay + mlp + "w2.weight", lay + mlp + "w3.weight")
                   if k not in rank0]:
        raise ValueError(f"{where}: missing tensor(s) {missing} of a {family} model")
    down = "w2"
    if family == "internlm":
        w2, w3 = rank0[lay + mlp + "w2.weight"].shape, rank0[lay + mlp + "w3.weight"].shape
        if version is not None:
            down = "w3" if version == 1 else "w2"
        elif w2 == w3:
            raise ValueError(f"{where}: w2 and w3 both have shape {tuple(w2)}, so which is the down projection "
                             "cannot be told from shapes: pass --version 1 (w3 is down_proj) or 2 (w2 is down_proj)")
        else:
            down = "w2" if w2[0] == H else "w3"
    if family == "internlm" and (lay + "mixer.Wqkv.bias") not in rank0:
        raise ValueError(f"{where}: InternLM attention has biases but the checkpoint has no mixer.Wqkv.bias")
    arch = Arch(family, cfg["num_layers"], H, N, cfg.get("num_kv_attention_heads", N), cfg["vocab_size"],
                rank0[lay + mlp + "w1.weight"].shape[0] * tp, (lay + "attention.wqkv.bias") in rank0
                or family == "internlm", down)
    arch.check(f"{where}/model_config.pt")
    if family == "internlm2" and arch.num_kv_heads % tp:
        raise ValueError(f"{where}: num_kv_attention_heads={arch.num_kv_heads} is not divisible by the checkpoint's "
                         f"tp={tp} (kv heads duplicated across ranks); reshard it with tp dividing the kv heads first")
    return arch


def _embed_split_hidden(cfg: dict, shard: torch.Tensor, arch: Arch, tp: int, where: str) -> bool:
    if tp == 1:
        return bool(cfg.get("embed_split_hidden", True))
    by_shape = {(arch.vocab_size, arch.hidden_size // tp): True, (arch.vocab_size // tp, arch.hidden_size): False}
    if tuple(shard.shape) not in by_shape:
        raise ValueError(f"{where}: embedding shard has shape {tuple(shard.shape)}, neither [V, H/tp] nor [V/tp, H] "
                         f"for V={arch.vocab_size}, H={arch.hidden_size}, tp={tp}")
    return by_shape[tuple(shard.shape)]


def internevo_to_hf(src, tgt, tokenizer, *, model: str | None = None, dtype: str = "bfloat16",
                    max_shard: str | int = "10GB", max_pos: int = 4096, rotary_type: str = "origin",
                    scaling_factor: float | None = None, qk_interleaved: bool | None = None,
                    version: int | None = None, overwrite: bool = False, verify: bool = False) -> Summary:
    """Convert an InternEvo checkpoint folder (any tp x pp) into an official Hugging Face folder."""
    src, tgt = Path(src), Path(tgt)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    max_bytes = parse_size(max_shard)
    cfg = internevo.read_config(src)
    _check_internevo_config(cfg, src)
    normalize, seen = _normalizer(cfg, model)
    tp, pp, ranks = internevo.read_shards(src, normalize)
    family = seen["family"]
    arch = _arch_from_internevo(cfg, ranks[0], tp, family, version, str(src))
    interleaved = _interleaved(cfg, qk_interleaved)
    emb_key = "tok_embeddings.weight" if family == "internlm2" else "embedding.weight"
    if emb_key not in ranks[0]:
        raise ValueError(f"{src}: no {emb_key} in any pipeline stage")
    esh = _embed_split_hidden(cfg, ranks[0][emb_key], arch, tp, str(src))
    splits = {p.internevo.format(i=i): p.split for p in families.params(arch) for i in range(arch.num_layers)}
    if missing := sorted(set(splits) - set(ranks[0])):
        raise ValueError(f"{src}: missing tensor(s) {missing[:6]} of a {arch.num_layers}-layer {family} model")
    if extra := sorted(set(ranks[0]) - set(splits)):
        raise ValueError(f"{src}: unexpected tensor(s) {extra[:6]} for a {arch.num_layers}-layer {family} model "
                         f"({'with' if arch.bias else 'without'} attention biases)")
    merged = {k: merge_tp(k, [r[k] for r in ranks], splits[k], esh) for k in splits}
    state = families.to_hf(merged, arch, interleaved)
    head = "output.weight" if family == "internlm2" else "lm_head.weight"
    if cfg.get("norm_head"):
        state[head] = torch.nn.functional.normalize(state[head].float(), dim=-1).to(state[head].dtype)
    try:
        families.check_hf_state(state, arch, str(src))
    except ValueError as e:
        k = _missing_tp_ratio(state, arch)
        if k is None:
            raise
        names = ", ".join(f"model_tp{t}_pp*.pt" for t in range(tp, tp * k))
        raise ValueError(f"{src}: missing shard files: the tensors split over tensor-parallel ranks are 1/{k} of "
                         f"their size in model_config.pt, so this is a tp={tp * k} checkpoint with only the files "
                         f"of tp ranks 0..{tp - 1}; copy {names} into the folder") from e
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    if scaling_factor is None:
        scaling_factor = 2.0 if family == "internlm2" else 1.0
    summary = Summary("internevo-to-hf", family, src, tgt, arch.num_layers, sum(v.numel() for v in state.values()),
                      dtype, tp_in=tp, pp_in=pp)
    if interleaved:
        summary.notes.append("q/k rows permuted from interleaved rotary to Hugging Face's rotate-half layout")
    if cfg.get("norm_head"):
        summary.notes.append("norm_head: output rows L2-normalised")
    summary.notes.append(f"intermediate_size {arch.intermediate_size} read from w1's shape; "
                         f"embedding was split on {'hidden' if esh else 'vocab'}")
    if family == "internlm":
        summary.notes.append(f"down_proj <- {arch.mlp_down}, up_proj <- {'w3' if arch.mlp_down == 'w2' else 'w2'}")
    with staging(tgt, overwrite, hf.holds_model) as tmp:
        from .tokenizer import write_tokenizer

        ids = write_tokenizer(Path(tokenizer), tmp)
        config = families.hf_config(arch, dtype=DTYPES[dtype], max_pos=max_pos,
                                    eps=cfg.get("layer_norm_epsilon", 1e-5 if family == "internlm2" else 1e-6),
                                    rope_theta=cfg.get("rope_base", 10000), rotary_type=rotary_type,
                                    scaling_factor=scaling_factor, special_ids=ids)
        hf.write_config(tmp, config)
        files = hf.write_weights(tmp, state, max_bytes)
        summary.files = [(f.name, f.stat().st_size) for f in files]
        if verify:
            from .verify import compare_logits

            summary.max_abs_logit_diff = compare_logits(
                tmp, arch, ranks, dtype=DTYPES[dtype], interleaved=interleaved, embed_split_hidden=esh,
                rope_theta=cfg.get("rope_base", 10000), eps=config["rms_norm_eps"],
                norm_head=bool(cfg.get("norm_head")))
    return summary


def hf_to_internevo(src, tgt, *, tp_size: int = 1, pp_size: int = 1, embed_split: bool = False,
                    use_flash: bool = False, version: int = 2, qk_interleaved: bool = False,
                    safetensors: bool = False, dtype: str | None = None, overwrite: bool = False,
                    verify: bool = False) -> Summary:
    """Convert an official Hugging Face InternLM / InternLM2 folder into InternEvo tp x pp shards."""
    src, tgt = Path(src), Path(tgt)
    if tp_size < 1 or pp_size < 1:
        raise ValueError(f"--tp_size {tp_size} and --pp_size {pp_size} must be >= 1")
    if version not in (1, 2):
        raise ValueError(f"--version {version} must be 1 (down_proj -> w3) or 2 (down_proj -> w2)")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    cfg = hf.read_config(src)
    arch, extra = families.arch_from_hf(cfg, f"{src}/config.json", "w3" if version == 1 else "w2")
    if arch.family == "internlm2" and arch.num_kv_heads % tp_size:
        raise ValueError(f"num_key_value_heads={arch.num_kv_heads} is not divisible by --tp_size {tp_size}: "
                         "InternEvo's grouped wqkv gives every tp rank whole (q.., k, v) groups; choose a tp size "
                         "that divides the kv heads")
    if arch.num_heads % tp_size:
        raise ValueError(f"num_attention_heads={arch.num_heads} is not divisible by --tp_size {tp_size}")
    state = hf.read_state(src, safetensors)
    state = {k: v for k, v in state.items() if not k.endswith(".inv_freq")}
    head = "output.weight" if arch.family == "internlm2" else "lm_head.weight"
    if head not in state and cfg.get("tie_word_embeddings"):
        embed = "model.tok_embeddings.weight" if arch.family == "internlm2" else "model.embed_tokens.weight"
        state[head] = state[embed]
    families.check_hf_state(state, arch, str(src))
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    merged = families.from_hf(state, arch, qk_interleaved)
    splits = {p.internevo.format(i=i): p.split for p in families.params(arch) for i in range(arch.num_layers)}
    ranks = [{} for _ in range(tp_size)]
    for key, tensor in merged.items():
        for r, part in zip(ranks, split_tp(key, tensor, splits[key], tp_size, embed_split), strict=True):
            r[key] = part
    first = {p.internevo for p in families.params(arch) if p.split is Split.EMBED}
    grid = [split_pp(r, arch.num_layers, pp_size, first) for r in ranks]
    ratio, multiple_of = families.mlp_ratio_for(arch.hidden_size, arch.intermediate_size)
    out_dtype = next(iter(merged.values())).dtype
    model_config = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
        num_kv_attention_heads=arch.num_kv_heads, vocab_size=arch.vocab_size, mlp_ratio=ratio,
        multiple_of=multiple_of, embed_split_hidden=embed_split, norm_type="rmsnorm",
        layer_norm_epsilon=extra["eps"], no_bias=not arch.bias, rope_base=extra["rope_theta"],
        qk_interleaved=qk_interleaved, adapt_hf=not qk_interleaved, use_flash_attn=use_flash,
        max_position_embeddings=extra["max_pos"],
        dtype=str(out_dtype), num_chunks=1, norm_head=False, apply_post_layer_norm=False, checkpoint=False,
        parallel_output=False)
    summary = Summary("hf-to-internevo", arch.family, src, tgt, arch.num_layers,
                      sum(v.numel() for v in state.values()), str(out_dtype).removeprefix("torch."),
                      tp_out=tp_size, pp_out=pp_size)
    summary.notes.append(f"mlp_ratio={ratio:g} with multiple_of={multiple_of} gives intermediate_size "
                         f"{arch.intermediate_size} exactly; embedding split on {'hidden' if embed_split else 'vocab'}")
    if qk_interleaved:
        summary.notes.append("q/k rows permuted to the interleaved rotary layout (qk_interleaved=True)")
    if extra["dynamic"]:
        summary.notes.append("the source uses dynamic NTK rope scaling: set use_dynamic_ntk_rope in the InternEvo "
                             "training config if you need it")
    if arch.family == "internlm":
        summary.notes.append(f"down_proj -> {arch.mlp_down} (--version {version})")
    with staging(tgt, overwrite, internevo.holds_model) as tmp:
        files = internevo.write_folder(tmp, model_config, grid)
        summary.files = [(f.name, f.stat().st_size) for f in files]
        if verify:
            from .verify import compare_logits

            summary.max_abs_logit_diff = compare_logits(
                src, arch, ranks, dtype=out_dtype, interleaved=qk_interleaved, embed_split_hidden=embed_split,
                rope_theta=extra["rope_theta"], eps=extra["eps"])
    return summary

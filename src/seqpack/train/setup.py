"""Tokenizer and data loader of a run, from the config (adapters over :mod:`seqpack.data`).

The tokenizer comes from ``data.tokenizer_path``, else from the model folder of ``ckpt.load_ckpt_info`` (if it
holds one), else the embedded corpus tokenizer. The loader yields, per optimizer step, this data-parallel rank's
``micro_num`` packed rows of ``seq_len * micro_bsz`` tokens; the ranks of one SP group get identical rows.
"""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .model import model_source


def load_tokenizer(cfg: Config):
    """The run's tokenizer (a transformers tokenizer; nothing downloads). A vision-language model's processor:
    :mod:`seqpack.multimodal.task`."""
    from transformers import AutoTokenizer

    path = cfg.data.tokenizer_path
    if path is None:
        folder = model_source(cfg)
        if folder is not None and any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                             "tokenizer.model")):
            path = folder
    if path is None:
        if cfg.data.train_folder is not None:
            raise ValueError(f"data.train_folder={cfg.data.train_folder!r} is tokenized data but no tokenizer was "
                             "given; set data.tokenizer_path to the tokenizer that produced it")
        from ..data.corpus import default_tokenizer

        return default_tokenizer()
    path = path.removeprefix("local:")
    if not Path(path).exists():
        raise ValueError(f"data.tokenizer_path={path!r} does not exist; give a local tokenizer folder")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)


def build_loader(cfg: Config, tokenizer, topo, vocab_size: int | None = None):
    """``seqpack.data.build_packed_loader`` for this rank (dp rank / dp size of ``topo``); with ``vocab_size`` every
    document read is checked against the model's vocabulary (ValueError naming file and line)."""
    from ..data import build_packed_loader

    d = cfg.data
    folder = d.train_folder.removeprefix("local:") if d.train_folder else None
    if folder is not None and not Path(folder).exists():
        raise ValueError(f"data.train_folder={folder!r} does not exist; give a local ftdp folder "
                         "(make one with `seqpack tokenize`)")
    if d.type in ("hf", "streaming") and folder is not None and not any(Path(folder).rglob("*.bin")):
        raise ValueError(f"data.type={d.type!r}: {folder} holds no ftdp *.bin files; seqpack reads tokenized "
                         "folders — convert the dataset first with `seqpack tokenize`")
    return build_packed_loader(
        train_folder=folder, seq_len=d.seq_len, micro_bsz=d.micro_bsz, micro_num=d.micro_num, packing=cfg.packing,
        min_length=d.min_length, min_length_dict=d.min_length_dict, dataset_weights=d.dataset_weights,
        data_order_file=d.data_order_file, seed=d.seed, dp_rank=topo.dp_rank, dp_size=topo.dp_size,
        tokenizer=tokenizer, max_docs=d.max_docs, vocab_size=vocab_size,
    )

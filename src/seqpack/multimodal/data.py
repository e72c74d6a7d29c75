"""The ``seqpack train`` data path for LLaVA-style models: a local JSONL of (image, conversation) samples ->
packed multimodal rows.

One record per line, image paths relative to the JSONL file's folder (or absolute)::

    {"image": "images/0001.png", "messages": [{"role": "user", "content": "<image>\\nWhat is shown?"},
                                              {"role": "assistant", "content": "A red square."}]}

``"images": [...]`` gives several images (one ``<image>`` placeholder each, in order); no image key makes a
text-only sample. ``data.train_folder`` is such a file or a folder of ``*.jsonl`` files (sorted).

Rows never cut a sample (its image features belong to it): samples are taken in a shuffled order
(``RandomState(seed + epoch)``, a new order every epoch) and added to the current row while they fit into
``seq_len * micro_bsz`` tokens, then the row is padded to exactly that length (packing ``padded``: one sample per
row). A sample longer than a row is skipped (counted in ``loader.stats``, one warning). Rows are numbered
globally; data-parallel rank r takes rows r, r + dp, ... (SP peers the same ones), and only the images of its own
rows are read. The state (epoch, next sample, next row) makes resuming exact.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..data.sources import iter_records
from .batch import MultimodalBatch, encode_sample, pack_multimodal, sample_images


def read_records(path: str | Path) -> list[dict]:
    """Samples of a JSONL file or of every ``*.jsonl`` under a folder; image paths resolved; ValueError naming
    the file and line for a bad record or a missing image."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.jsonl")) if path.is_dir() else []
    if not files:
        raise ValueError(f"data.train_folder={str(path)!r}: no JSONL file there; a multimodal run reads a .jsonl of "
                         '{"image": path, "messages": [...]} records (or a folder of them)')
    records = []
    for f in files:
        for where, rec in iter_records(f):  # JSON Lines; invalid JSON names the file and line
            if not isinstance(rec.get("messages"), list):
                raise ValueError(f"{where}: a record needs 'messages' (a list of {{'role', 'content'}}) and "
                                 "optionally 'image' (a path) or 'images' (a list of paths)")
            images = []
            for img in sample_images(rec, where):
                if not isinstance(img, str):
                    raise ValueError(f"{where}: image paths must be strings, got {type(img).__name__}")
                p = Path(img) if Path(img).is_absolute() else f.parent / img
                if not p.is_file():
                    raise ValueError(f"{where}: image {img!r} not found (looked for {p})")
                images.append(str(p))
            records.append({"messages": rec["messages"], "images": images, "where": where})
    return records


class MultimodalLoader:
    """Iterator over optimizer steps: each a list of ``micro_num`` :class:`MultimodalBatch` rows of exactly
    ``row_len`` tokens for this data-parallel rank; ``state_dict`` / ``load_state_dict`` resume exactly.

        >>> loader = MultimodalLoader("chats.jsonl", processor, row_len=2048, micro_num=2)   # doctest: +SKIP
        >>> rows = next(iter(loader))                                                     # doctest: +SKIP
    """

    def __init__(self, path, processor, row_len: int, micro_num: int = 1, one_per_row: bool = False,
                 seed: int = 1024, dp_rank: int = 0, dp_size: int = 1, max_docs: int | None = None):
        self.processor, self.row_len, self.micro_num = processor, row_len, micro_num
        self.one_per_row, self.seed, self.dp_rank, self.dp_size = one_per_row, seed, dp_rank, dp_size
        self.records = read_records(path)[:max_docs]
        self._lengths: dict[int, int] = {}
        self.epoch, self.cursor, self.row = 0, 0, 0
        self.stats = {"samples": len(self.records), "skipped_overlong": 0}
        self._order = self._shuffle(0)
        fits = [i for i in range(len(self.records)) if self._length(i) <= row_len]
        if not fits:
            raise ValueError(f"{path}: no sample fits into a row of {row_len} tokens (seq_len x micro_bsz); "
                             f"the shortest has {min(self._length(i) for i in range(len(self.records)))}")

    def _shuffle(self, epoch: int) -> np.ndarray:
        return np.random.RandomState(self.seed + epoch).permutation(len(self.records))

    def _length(self, i: int) -> int:
        """Tokens of sample i (image placeholders expanded); images are only opened for their size."""
        if i not in self._lengths:
            from PIL import Image

            rec = self.records[i]
            sizes = []
            for p in rec["images"]:
                with Image.open(p) as im:
                    sizes.append((im.height, im.width))
            self._lengths[i] = len(encode_sample(self.processor, rec["messages"], sizes, rec["where"])[0])
        return self._lengths[i]

    def _next_samples(self) -> list[int]:
        """The sample indices of the next global row (advances the cursor; a new epoch reshuffles)."""
        while True:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            picked, used = [], 0
            while self.cursor < len(self._order):
                i = int(self._order[self.cursor])
                n = self._length(i)
                if n > self.row_len:
                    if self.epoch == 0:
                        self.stats["skipped_overlong"] += 1
                        if self.stats["skipped_overlong"] == 1:
                            warnings.warn(f"{self.records[i]['where']}: sample of {n} tokens is longer than a row "
                                          f"({self.row_len}); such samples are skipped (loader.stats counts them)",
                                          stacklevel=2)
                    self.cursor += 1
                    continue
                if picked and (used + n > self.row_len or self.one_per_row):
                    break
                picked.append(i)
                used += n
                self.cursor += 1
            if picked:
                return picked

    def __iter__(self):
        return self

    def __next__(self) -> list[MultimodalBatch]:
        rows = []
        while len(rows) < self.micro_num:
            picked = self._next_samples()
            mine = self.row % self.dp_size == self.dp_rank
            self.row += 1
            if mine:
                rows.append(pack_multimodal([self.records[i] for i in picked], self.processor, pad_to=self.row_len))
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "row": self.row}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.row = state["epoch"], state["cursor"], state["row"]
        self._order = self._shuffle(self.epoch)


def is_multimodal_folder(path: str | Path | None) -> bool:
    """True for a local model folder whose config has a vision encoder next to the language model (LLaVA)."""
    if path is None or not (Path(path) / "config.json").is_file():
        return False
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "vision_config" in config and "text_config" in config


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """The processor (tokenizer + image processor) saved with a multimodal model folder."""
    from transformers import AutoProcessor

    if not any((Path(path) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        raise ValueError(f"{path} holds a vision-language model but no processor (processor_config.json or "
                         "preprocessor_config.json); save one there with processor.save_pretrained(path)")
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not hasattr(processor, "image_processor") or not hasattr(processor, "image_token_id"):
        raise ValueError(f"{path}: {type(processor).__name__} is not an image-text processor with an image token "
                         "(LlavaProcessor)")
    return processor


def build_multimodal_loader(cfg, processor, topo) -> MultimodalLoader:
    """The loader of a ``seqpack train`` run on a vision-language model (``data.train_folder`` = JSONL)."""
    d = cfg.data
    if d.train_folder is None:
        raise ValueError("a vision-language model needs data.train_folder: a .jsonl of {\"image\": path, "
                         "\"messages\": [...]} records (or a folder of them)")
    if cfg.packing in ("cut", "into_one") and (d.packing is not None or d.pack_sample_into_one):
        warnings.warn(f"packing {cfg.packing!r} ignored: multimodal rows never cut a sample (its image "
                      "features belong to it); samples are packed whole", stacklevel=2)
    return MultimodalLoader(d.train_folder.removeprefix("local:"), processor, row_len=d.seq_len * d.micro_bsz,
                            micro_num=d.micro_num, one_per_row=cfg.packing == "padded", seed=d.seed,
                            dp_rank=topo.dp_rank, dp_size=topo.dp_size, max_docs=d.max_docs)

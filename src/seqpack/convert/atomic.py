"""Conversion output folders (all-or-nothing, with the --tgt / --overwrite policy) and --max_shard sizes."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from ..atomic import folder_swap


@contextlib.contextmanager
def staging(tgt: Path, overwrite: bool, holds_model: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it replaces ``tgt``, on any error it is deleted and ``tgt`` is
    untouched.

    ``tgt`` may be missing or empty. A ``tgt`` that ``holds_model`` is replaced only with ``overwrite``; any other
    non-empty ``tgt`` is refused (its files are not ours to delete).
    """
    tgt = Path(tgt)
    if tgt.exists():
        if not tgt.is_dir():
            raise ValueError(f"--tgt {tgt} exists and is not a folder")
        if any(tgt.iterdir()):
            if not holds_model(tgt):
                raise ValueError(f"--tgt {tgt} is a non-empty folder without a model; choose a new or empty folder")
            if not overwrite:
                raise ValueError(f"--tgt {tgt} already holds a model; pass --overwrite to replace it")
    with folder_swap(tgt) as tmp:
        yield tmp


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """``"10GB"`` -> 10**9 * 10 bytes (decimal units as in transformers' ``max_shard_size``; ``GiB`` is binary).

    >>> parse_size("2GB"), parse_size("500MiB"), parse_size(1000)
    (2000000000, 524288000, 1000)
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).upper() not in _UNITS:
        raise ValueError(f"--max_shard {text!r} is not a size like 10GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])

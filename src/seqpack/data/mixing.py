"""Data mixing: ``dataset_weights`` turns the files of a training folder into weighted groups, and a deterministic
schedule decides which group feeds each row.

Keys of ``dataset_weights`` name a type folder (``"en"`` matches ``en/**.bin``) or a glob over the relative path
(``"*/wiki-*.bin"``). Every file must match exactly one key; weight 0 leaves the files out.

The schedule is smooth weighted round-robin: every row, each group earns its weight in credit, the richest group
(lowest index on ties) is chosen and pays the total. After k rows, group i has been chosen within one row of
``k * w_i / sum(w)`` times — no randomness, so every rank computes the same sequence.

    >>> s = WeightedSchedule([3.0, 1.0])
    >>> [s.next() for _ in range(8)]
    [0, 0, 1, 0, 0, 0, 1, 0]
"""

from __future__ import annotations

import fnmatch
import math

from .ftdp import file_type


def key_matches(key: str, rel: str) -> bool:
    """A ``dataset_weights`` / ``min_length_dict``-style key matches a file by type folder or by glob."""
    return key == file_type(rel) or fnmatch.fnmatchcase(rel, key)


def group_files(rels: list[str], dataset_weights: dict[str, float] | None) -> tuple[list[str], list[int], list[float]]:
    """(group names, group index of each file (-1 = weight 0, left out), group weights > 0).
    ``None`` -> one group of all files."""
    if not dataset_weights:
        return ["all"], [0] * len(rels), [1.0]
    if not isinstance(dataset_weights, dict):
        raise TypeError("dataset_weights must be a dict {type folder or glob: weight}, got "
                        f"{type(dataset_weights).__name__}")
    keys = list(dataset_weights)
    for k, w in dataset_weights.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"dataset_weights[{k!r}] = {w!r}; weights must be finite numbers >= 0")
    if not any(w > 0 for w in dataset_weights.values()):
        raise ValueError(f"dataset_weights {dataset_weights} has no positive weight")
    active = [k for k in keys if dataset_weights[k] > 0]
    group_of, used = [], set()
    for rel in rels:
        hits = [k for k in keys if key_matches(k, rel)]
        if len(hits) > 1:
            raise ValueError(f"file {rel!r} matches several dataset_weights keys {hits}; make the keys disjoint")
        if not hits:
            raise ValueError(f"file {rel!r} matches no dataset_weights key (keys: {keys}); add its type folder "
                             f"{file_type(rel)!r} or a glob, with weight 0 to leave it out")
        used.add(hits[0])
        group_of.append(active.index(hits[0]) if hits[0] in active else -1)
    unused = [k for k in keys if k not in used]
    if unused:
        more = " ..." if len(rels) > 5 else ""
        raise ValueError(f"dataset_weights keys {unused} match no .bin file (files: {rels[:5]}{more})")
    return active, group_of, [float(dataset_weights[k]) for k in active]


class WeightedSchedule:
    """Deterministic weighted choice of a group per row (smooth weighted round-robin). Resumable via ``credits``."""

    def __init__(self, weights: list[float], credits: list[float] | None = None):
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.credits = list(credits) if credits is not None else [0.0] * len(weights)

    def next(self) -> int:
        best = 0
        for i, w in enumerate(self.weights):
            self.credits[i] += w
            if self.credits[i] > self.credits[best]:
                best = i
        self.credits[best] -= 1.0
        return best

"""Packing strategies: which token ranges of which documents form each pack, and how a pack becomes a batch row.

A *plan* is computed once from document lengths only (vectorized NumPy, no tokens read); tokens are read when a row
is built. Strategies (``L = seq_len * micro_bsz``):

- ``cut``      InternEvo ``PackedDatasetWithCut`` (``pack_sample_into_one=False``): the documents of each file are
               shuffled with ``RandomState(seed)``, concatenated, and cut every ``L`` tokens (the remainder is
               dropped). One unit = one row of ``L``. A document may continue into the next pack (its last label
               there is the next token); a fragment longer than ``seq_len`` is split into ``seq_len`` segments.
- ``into_one`` InternEvo ``PackedDatasetWithoutCuSeqlen`` (``pack_sample_into_one=True``): same tokens as ``cut``,
               but segments are the uniform ``seq_len`` windows (attention crosses documents inside a window);
               labels are -100 at every fragment end.
- ``bfd``      best-fit decreasing into packs of ``seq_len`` without cutting documents; a row is ``micro_bsz``
               packs, each padded to ``seq_len``. Longer-than-``seq_len`` documents are split into ``seq_len``
               pieces (``overlong="split"``) or dropped (``overlong="drop"``); the plan counts them.
- ``padded``   one document per ``seq_len`` pack, padded (the baseline); over-long documents as in ``bfd``.

Plan arrays (CSR layout, F fragments, U units): ``unit_ptr [U+1]``, ``doc [F]`` (index into the group's document
list), ``start [F]``, ``end [F]`` (token range inside the document).

    >>> p = plan_bfd(np.array([5, 3, 4, 2, 8]), unit_len=8)
    >>> [p.doc[p.unit_ptr[u]:p.unit_ptr[u + 1]].tolist() for u in range(p.num_units)]
    [[4], [0, 1], [2, 3]]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..batch import IGNORE_INDEX, PackedBatch

STRATEGIES = ("cut", "into_one", "bfd", "padded")
OVERLONG = ("split", "drop")


@dataclass
class Plan:
    """Units (packs) as fragments of documents. See the module docstring for the arrays."""

    unit_ptr: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    end: np.ndarray
    unit_len: int
    stats: dict = field(default_factory=dict)  # e.g. {"split": docs split, "dropped": docs dropped}

    @property
    def num_units(self) -> int:
        return len(self.unit_ptr) - 1

    def fragments(self, u: int) -> range:
        return range(int(self.unit_ptr[u]), int(self.unit_ptr[u + 1]))


def check_strategy(packing: str) -> str:
    if packing not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {packing!r}; choose one of {', '.join(STRATEGIES)}")
    return packing


def concat_plans(plans: list[Plan], doc_offsets: list[int]) -> Plan:
    """Concatenate per-file plans (units in file order, like InternEvo's ConcatDataset); ``doc_offsets[i]`` is
    added to the document indices of plan i."""
    unit_len = plans[0].unit_len if plans else 0
    ptrs, base = [np.zeros(1, np.int64)], 0
    for p in plans:
        ptrs.append(p.unit_ptr[1:] + base)
        base += len(p.doc)
    stats: dict = {}
    for p in plans:
        for k, v in p.stats.items():
            stats[k] = stats.get(k, 0) + v

    def cat(name, off):
        return np.concatenate([np.zeros(0, np.int64)] + [getattr(p, name) + o for p, o in zip(plans, off)])

    return Plan(np.concatenate(ptrs), cat("doc", doc_offsets), cat("start", [0] * len(plans)),
                cat("end", [0] * len(plans)), unit_len, stats)


def plan_cut(lengths: np.ndarray, unit_len: int, seed: int = 1024) -> Plan:
    """InternEvo cut packing of ONE file: shuffle with ``RandomState(seed)``, concatenate, cut every ``unit_len``
    tokens; ``num_tokens // unit_len`` units (the remainder is dropped). Also the plan of ``into_one``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.arange(len(lengths))
    np.random.RandomState(seed).shuffle(order)
    lens = lengths[order]
    cum = np.cumsum(lens)
    n_units = int(cum[-1] // unit_len) if len(cum) else 0
    if n_units == 0:
        return Plan(np.zeros(1, np.int64), *(np.zeros(0, np.int64),) * 3, unit_len, {"tail_tokens": int(lens.sum())})
    total = n_units * unit_len
    doc_starts = cum - lens  # [n] stream position where each shuffled document begins
    n_in = int(np.searchsorted(doc_starts, total, side="left"))  # documents that start before the cut-off
    s, e = doc_starts[:n_in], np.minimum(cum[:n_in], total)  # stream span of each document
    first = s // unit_len
    pieces = (e - 1) // unit_len - first + 1  # units each document touches
    j = np.repeat(np.arange(n_in), pieces)  # [F] shuffled position of the document of each fragment
    unit = first[j] + np.arange(len(j)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    lo, hi = np.maximum(s[j], unit * unit_len), np.minimum(e[j], (unit + 1) * unit_len)  # fragment stream span
    unit_ptr = np.searchsorted(unit, np.arange(n_units + 1), side="left")
    return Plan(unit_ptr, order[j], lo - s[j], hi - s[j], unit_len, {"tail_tokens": int(cum[-1] - total)})


def _split_overlong(lengths: np.ndarray, unit_len: int, overlong: str):
    """Items for bfd/padded: (doc, start, end) per piece. Over-long documents become full ``unit_len`` pieces plus
    a remainder (split) or disappear (drop). Returns (doc, start, end, stats)."""
    if overlong not in OVERLONG:
        raise ValueError(f"unknown overlong policy {overlong!r}; choose one of {', '.join(OVERLONG)}")
    lengths = np.asarray(lengths, dtype=np.int64)
    long = lengths > unit_len
    stats = {"overlong_docs": int(long.sum()), "dropped": 0, "split": 0}
    if overlong == "drop":
        keep = np.flatnonzero(~long)
        stats["dropped"] = int(long.sum())
        stats["dropped_tokens"] = int(lengths[long].sum())
        return keep, np.zeros_like(keep), lengths[keep], stats
    stats["split"] = int(long.sum())
    pieces = -(-lengths // unit_len)  # ceil: pieces per document
    doc = np.repeat(np.arange(len(lengths)), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = (np.arange(len(doc)) - first) * unit_len
    return doc, start, np.minimum(start + unit_len, lengths[doc]), stats


def plan_padded(lengths: np.ndarray, unit_len: int, overlong: str = "split") -> Plan:
    """One document (or over-long piece) per unit of ``unit_len``, in document order."""
    doc, start, end, stats = _split_overlong(lengths, unit_len, overlong)
    return Plan(np.arange(len(doc) + 1, dtype=np.int64), doc, start, end, unit_len, stats)


def plan_bfd(lengths: np.ndarray, unit_len: int, overlong: str = "split") -> Plan:
    """Best-fit decreasing: pieces sorted by length (longest first, ties by document order), each placed into the
    open pack with the least room that fits it, a new pack when none does. Documents are never cut unless
    over-long and ``overlong="split"``."""
    doc, start, end, stats = _split_overlong(lengths, unit_len, overlong)
    order = np.argsort(-(end - start), kind="stable")
    doc, start, end = doc[order], start[order], end[order]
    bins = best_fit_decreasing(end - start, unit_len)
    by_bin = np.argsort(bins, kind="stable")
    unit_ptr = np.searchsorted(bins[by_bin], np.arange(int(bins.max(initial=-1)) + 2), side="left")
    return Plan(unit_ptr, doc[by_bin], start[by_bin], end[by_bin], unit_len, stats)


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Bin index [n] of each item; ``sizes`` [n] must be sorted decreasing and <= capacity.

    Equal sizes are placed as a group: a bin with room r takes ``r // size`` of them at once, which is what
    item-by-item best fit would do (after one placement it stays the tightest fitting bin). Bins with the same
    room are interchangeable, so the loads equal item-by-item BFD's. Cost: O(distinct sizes + bin groups)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    bin_of = np.empty(len(sizes), dtype=np.int64)
    count = np.zeros(capacity + 1, dtype=np.int64)  # count[r]: open bins with room r
    stacks: list[deque] = [deque() for _ in range(capacity + 1)]  # FIFO of bin-id arrays per room
    n_bins, pos = 0, 0

    def push(room: int, ids: np.ndarray):
        if room > 0 and len(ids):
            stacks[room].append(ids)
            count[room] += len(ids)

    def pop(room: int, k: int) -> np.ndarray:
        out, q = [], stacks[room]
        while k:
            head = q[0]
            if len(head) <= k:
                out.append(q.popleft())
            else:
                out.append(head[:k])
                q[0] = head[k:]
            k -= len(out[-1])
        count[room] -= sum(len(o) for o in out)
        return np.concatenate(out)

    change = np.flatnonzero(np.diff(sizes)) + 1
    for lo, hi in zip(np.concatenate([[0], change]), np.concatenate([change, [len(sizes)]])):
        size, c = int(sizes[lo]), int(hi - lo)
        if size > capacity or size <= 0:
            raise ValueError(f"item size {size} outside 1..{capacity}")
        while c:
            avail = count[size:] > 0
            room = size + int(avail.argmax()) if avail.any() else capacity
            per = room // size
            if avail.any():
                ids = pop(room, min(-(-c // per), int(count[room])))
            else:  # open new bins
                ids = np.arange(n_bins, n_bins + -(-c // per))
                n_bins += len(ids)
            placed = min(c, len(ids) * per)
            bin_of[pos:pos + placed] = ids[np.arange(placed) // per]
            full, rest = divmod(placed, per)
            push(room - per * size, ids[:full])
            if rest:
                push(room - rest * size, ids[full:full + 1])
            pos, c = pos + placed, c - placed
    return bin_of


def render_row(plan: Plan, units, get_raw: Callable[[int], np.ndarray], seq_len: int, packing: str,
               pad_token_id: int = 0) -> PackedBatch:
    """Build one row from ``units`` (indices into ``plan``), concatenated. ``get_raw(doc)`` -> signed tokens.

    cut: segments <= seq_len per fragment (InternEvo); into_one: uniform seq_len windows; bfd/padded: one segment
    per fragment and a pad segment up to ``plan.unit_len`` in each unit."""
    ids, labels, seglens = [], [], []
    for u in units:
        used = 0
        for f in plan.fragments(u):
            raw = get_raw(int(plan.doc[f]))
            s, e = int(plan.start[f]), int(plan.end[f])
            chunk = raw[s:e]
            lab = np.empty_like(chunk)
            lab[:-1] = np.where(chunk[1:] > 0, chunk[1:], IGNORE_INDEX)
            nxt = raw[e] if e < len(raw) and packing != "into_one" else 0  # document continues in another pack
            lab[-1] = nxt if nxt > 0 else IGNORE_INDEX
            ids.append(np.abs(chunk))
            labels.append(lab)
            used += e - s
            if packing == "cut":
                full, rest = divmod(e - s, seq_len)
                seglens += [seq_len] * full + ([rest] if rest else [])
            elif packing != "into_one":
                seglens.append(e - s)
        if packing == "into_one":
            seglens += [seq_len] * (plan.unit_len // seq_len)
        elif used < plan.unit_len:
            ids.append(np.full(plan.unit_len - used, pad_token_id, dtype=np.int64))
            labels.append(np.full(plan.unit_len - used, IGNORE_INDEX, dtype=np.int64))
            seglens.append(plan.unit_len - used)
    seglens = np.asarray(seglens, dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(seglens)])
    positions = np.arange(cu[-1]) - np.repeat(cu[:-1], seglens)  # [T] restart at 0 per segment
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(ids))[None],
        shift_labels=torch.from_numpy(np.concatenate(labels))[None],
        position_ids=torch.from_numpy(positions)[None],
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(max(seglens)),
    )

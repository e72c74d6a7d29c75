"""The blocks of packed ring attention: which (query, key) segments one ring step computes, and their exact math.

Shape legend: T tokens of the padded row, C ring degree, L = T/(2C) chunk length, Tq = 2L local queries,
H query heads, Hkv key/value heads, D head dim, g = H / Hkv.

A ring rank holds chunks of the row (:mod:`seqpack.parallel.ring_split`); at each step it sees the key/value
chunks of one other rank. Chunks are disjoint ranges of the row, so for a (query chunk, key chunk) pair:

- the same chunk (step 0 only): causal attention within every document clipped to the chunk — one varlen call;
- a key chunk wholly after the query chunk: nothing (causal) — skipped;
- a key chunk wholly before: only a document that covers the gap between them can connect the two, and at most
  one document can, so the pair is one dense rectangle (every key earlier than every query; with a sliding
  window, trimmed to the keys and queries the window connects) or nothing — skipped, never computed and masked.

Bidirectional attention (``causal=False``, Flux's joint attention) drops the causal skip: a (query chunk, key
chunk) pair is one dense rectangle per document holding tokens of both — again at most one document for two
different chunks — with no mask inside it.

A :class:`Segment` is one such piece in local row numbers: queries ``[q0, q1)`` against keys ``[k0, k1)``, with
``offset`` = global position of query q0 minus that of key k0. Query i sees key j iff ``0 <= i + offset - j``
(and ``< W`` with a window W). The exact math computes in float32 whatever the input dtype and returns the
output with its log-sum-exp (natural log) so partial results merge exactly (:func:`merge_into`).
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import torch

from ..parallel.ring_split import ring_chunks


@dataclass(frozen=True)
class Segment:
    q0: int
    q1: int
    k0: int
    k1: int
    offset: int  # global position of query q0 minus global position of key k0
    diagonal: bool  # within one document, the same rows for queries and keys (causal: the causal triangle)
    causal: bool = True  # False: every query sees every key of the segment (bidirectional attention)


@functools.lru_cache(maxsize=256)
def block_segments(cu: tuple[int, ...], ring: int, q_rank: int, kv_rank: int,
                   window: int | None, causal: bool = True) -> tuple[Segment, ...]:
    """The segments ring rank ``q_rank`` computes against the key/value chunks of ``kv_rank`` (see the module
    docstring); ``()`` when no local query document reaches that block. ``causal=False`` (no window):
    bidirectional attention within documents, on the chunks of the split balanced for it."""
    out = []
    q_chunks, k_chunks = ring_chunks(cu, ring, q_rank, causal), ring_chunks(cu, ring, kv_rank, causal)
    q_local = k_local = 0
    for qa, qb in q_chunks:
        k_local = 0
        for ka, kb in k_chunks:
            if not causal:
                out += _bidirectional(cu, qa, qb, ka, kb, q_local, k_local)
            elif (qa, qb) == (ka, kb):
                first = bisect.bisect_right(cu, qa) - 1
                for d in range(first, len(cu) - 1):
                    s, e = max(cu[d], qa), min(cu[d + 1], qb)
                    if s >= e:
                        break
                    out.append(Segment(q_local + s - qa, q_local + e - qa, k_local + s - ka, k_local + e - ka, 0,
                                       True))
            elif kb <= qa:
                d = bisect.bisect_right(cu, qa) - 1  # the document holding the chunk's first query
                if cu[d] < kb:  # it starts before the key chunk ends: it covers the gap
                    k_start, q_end = max(cu[d], ka), min(cu[d + 1], qb)
                    if window is not None:
                        k_start = max(k_start, qa - window + 1)  # keys some query of the segment still sees
                        q_end = min(q_end, kb - 1 + window)  # queries that still see some key
                    if k_start < kb and qa < q_end:
                        out.append(Segment(q_local, q_local + q_end - qa, k_local + k_start - ka, k_local + kb - ka,
                                           qa - k_start, False))
            k_local += kb - ka
        q_local += qb - qa
    return tuple(out)


def _bidirectional(cu, qa: int, qb: int, ka: int, kb: int, q_local: int, k_local: int) -> list[Segment]:
    """Bidirectional segments of query chunk [qa, qb) against key chunk [ka, kb) (global ranges, local starts
    ``q_local`` / ``k_local``): one dense rectangle per document that holds tokens of both — the documents
    clipped to the chunk when it is the same chunk, at most one document (the one covering the gap) otherwise."""
    out = []
    d = bisect.bisect_right(cu, max(qa, ka)) - 1  # a document covering both starts at or before both starts
    while d < len(cu) - 1 and cu[d] < min(qb, kb):
        q0, q1, k0, k1 = max(cu[d], qa), min(cu[d + 1], qb), max(cu[d], ka), min(cu[d + 1], kb)
        if q0 < q1 and k0 < k1:
            out.append(Segment(q_local + q0 - qa, q_local + q1 - qa, k_local + k0 - ka, k_local + k1 - ka, q0 - k0,
                               (qa, qb) == (ka, kb), causal=False))
        d += 1
    return out


TILE = 512  # the exact path computes a segment in tiles of at most TILE x TILE (memory O(TILE^2), not O(L^2))


def tiles(seg: Segment, window: int | None, size: int = TILE):
    """The sub-segments of at most ``size`` x ``size`` of ``seg`` that hold a visible (query, key) pair; tiles
    wholly above the causal diagonal (or outside the window) are skipped (bidirectional: none is). Merging their
    partial results by log-sum-exp gives the segment's result exactly."""
    for i0 in range(seg.q0, seg.q1, size):
        i1 = min(i0 + size, seg.q1)
        for j0 in range(seg.k0, seg.k1, size):
            j1 = min(j0 + size, seg.k1)
            offset = seg.offset + (i0 - seg.q0) - (j0 - seg.k0)  # global query i0 minus global key j0
            if seg.causal and (i1 - i0 - 1) + offset < 0:  # the last query is before the first key
                continue
            if window is not None and offset - (j1 - j0 - 1) >= window:  # the first query is past every key
                continue
            yield Segment(i0, i1, j0, j1, offset, seg.diagonal and i0 - seg.q0 == j0 - seg.k0, seg.causal)


def _visible(seg: Segment, window: int | None, device) -> torch.Tensor | None:
    """[Lq, Lk] bool: query i sees key j; None when every query sees every key (bidirectional)."""
    if not seg.causal:
        return None
    diff = (torch.arange(seg.q1 - seg.q0, device=device)[:, None] + seg.offset
            - torch.arange(seg.k1 - seg.k0, device=device)[None, :])
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    return mask


def _scores(q, k, scale: float, softcap: float | None):
    """q [Lq, Hkv, g, D], k [Lk, Hkv, D] float32 -> (scores [Hkv, g, Lq, Lk], tanh term or None)."""
    s = torch.einsum("ihgd,jhd->hgij", q, k) * scale
    if softcap is None:
        return s, None
    t = torch.tanh(s / softcap)
    return t * softcap, t


def segment_forward(q, k, v, seg: Segment, scale: float, window: int | None, softcap: float | None):
    """Exact attention of one segment in float32. q [Tq, H, D], k/v [Tk, Hkv, D] (the whole local tensors) ->
    (out [Lq, H, D] float32, lse [Lq, H] float32)."""
    H, Hkv = q.shape[1], k.shape[1]
    qs = q[seg.q0:seg.q1].float().unflatten(1, (Hkv, H // Hkv))  # [Lq, Hkv, g, D]
    ks, vs = k[seg.k0:seg.k1].float(), v[seg.k0:seg.k1].float()  # [Lk, Hkv, D]
    s, _ = _scores(qs, ks, scale, softcap)
    visible = _visible(seg, window, q.device)
    if visible is not None:
        s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, g, Lq]; -inf for a row of a tile that sees no key
    p = torch.exp(s - lse.masked_fill(lse == -math.inf, 0.0)[..., None])  # such a row: 0
    out = torch.einsum("hgij,jhd->ihgd", p, vs).flatten(1, 2)  # [Lq, H, D]
    return out, lse.flatten(0, 1).transpose(0, 1)  # [Lq, H]


def segment_backward(q, k, v, dout, out, lse, seg: Segment, scale: float, window: int | None,
                     softcap: float | None, dq, dk, dv) -> None:
    """Add one segment's gradients to dq [Tq, H, D], dk/dv [Tk, Hkv, D] (float32, in place), recomputing its
    probabilities from the MERGED output ``out`` [Tq, H, D] and log-sum-exp ``lse`` [Tq, H] (float32), so the
    result is the exact gradient of attention over all keys (FlashAttention's backward, block by block)."""
    H, Hkv = q.shape[1], k.shape[1]
    g = H // Hkv
    qs = q[seg.q0:seg.q1].float().unflatten(1, (Hkv, g))  # [Lq, Hkv, g, D]
    ks, vs = k[seg.k0:seg.k1].float(), v[seg.k0:seg.k1].float()
    do = dout[seg.q0:seg.q1].float().unflatten(1, (Hkv, g))  # [Lq, Hkv, g, D]
    s, t = _scores(qs, ks, scale, softcap)
    rows = lse[seg.q0:seg.q1].transpose(0, 1).unflatten(0, (Hkv, g))[..., None]  # [Hkv, g, Lq, 1]
    p = torch.exp(s - rows)
    visible = _visible(seg, window, q.device)
    if visible is not None:
        p = p.masked_fill(~visible, 0.0)
    delta = (do * out[seg.q0:seg.q1].unflatten(1, (Hkv, g))).sum(-1)  # [Lq, Hkv, g]
    dv[seg.k0:seg.k1] += torch.einsum("hgij,ihgd->jhd", p, do)
    dp = torch.einsum("ihgd,jhd->hgij", do, vs)
    ds = p * (dp - delta.permute(1, 2, 0)[..., None])
    if t is not None:
        ds = ds * (1 - t * t)  # d(softcap * tanh(s / softcap)) / ds
    dq[seg.q0:seg.q1] += (torch.einsum("hgij,jhd->ihgd", ds, ks) * scale).flatten(1, 2)
    dk[seg.k0:seg.k1] += torch.einsum("hgij,ihgd->jhd", ds, qs) * scale


def merge_into(out_acc, lse_acc, rows: slice, out, lse) -> None:
    """Online-softmax merge of a partial result into the float32 accumulators, in place.
    out_acc [Tq, H, D], lse_acc [Tq, H] (-inf where nothing merged yet); out [l, H, D], lse [l, H] for ``rows``."""
    old_out, old_lse = out_acc[rows], lse_acc[rows]
    new_lse = torch.logaddexp(old_lse, lse)
    w_old = torch.exp(old_lse - new_lse).nan_to_num_(0.0)  # -inf - -inf: nothing merged before
    w_new = torch.exp(lse - new_lse).nan_to_num_(0.0)
    out_acc[rows] = old_out * w_old[..., None] + out * w_new[..., None]
    lse_acc[rows] = new_lse

"""Single-process checks of ring attention's parts: the balanced split, the block segments of every (query rank,
key rank) pair with their exact math (a virtual ring: all C ranks in one process, merged by log-sum-exp), tiles,
and the load balance on log-normal documents."""

import itertools
import math

import pytest
import torch

from seqpack.attention.ring_blocks import (Segment, block_segments, merge_into, segment_backward, segment_forward,
                                           tiles)
from seqpack.bench.packing import doc_lengths
from seqpack.parallel import ParallelDims
from seqpack.parallel.ring_split import CHUNKS_PER_RANK, attention_work, imbalance, ring_chunks, split_positions


def _reference(q, k, v, cu, scale, window, softcap):
    """Dense masked attention over the whole row (float64): the definition ring attention must reproduce."""
    T, H, _ = q.shape
    kk, vv = (x.repeat_interleave(H // k.shape[1], 1) for x in (k, v))
    s = torch.einsum("ihd,jhd->hij", q, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    mask = (doc[:, None] == doc[None]) & (j <= i)
    if window:
        mask &= i - j < window
    return torch.einsum("hij,jhd->ihd", s.masked_fill(~mask, -math.inf).softmax(-1), vv)


@pytest.mark.parametrize("C, window, softcap, tile", [(1, None, None, 512), (2, None, None, 3), (3, 3, None, 512),
                                                       (4, None, 2.0, 512), (3, 5, 1.5, 4), (2, 2, None, 512)])
def test_virtual_ring_equals_whole_row_forward_and_backward(C, window, softcap, tile):
    g = torch.Generator().manual_seed(C)
    T = CHUNKS_PER_RANK * C * 2
    cu = [0, 1, 2] + sorted(set(torch.randint(3, T - 1, (4,), generator=g).tolist())) + [T - 1, T]
    q, k, v = (torch.randn(T, h, 8, generator=g, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    ref = _reference(q, k, v, cu, 0.3, window, softcap)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(dout)
    pos = [split_positions(cu, C, 1, c) for c in range(C)]
    assert torch.equal(torch.cat(pos).sort().values, torch.arange(T))  # every token on exactly one rank
    dq, dk, dv = (torch.zeros(x.shape) for x in (q, k, v))
    for c in range(C):
        qc = q.detach()[pos[c]]
        out, lse = torch.zeros(qc.shape), torch.full(qc.shape[:2], -math.inf)
        for src in range(C):
            for seg in block_segments(tuple(cu), C, c, src, window):
                for t in tiles(seg, window, tile):
                    o, l = segment_forward(qc, k.detach()[pos[src]], v.detach()[pos[src]], t, 0.3, window, softcap)
                    merge_into(out, lse, slice(t.q0, t.q1), o, l)
        assert (out - ref.detach()[pos[c]]).abs().max() < 1e-5
        dqc = torch.zeros(qc.shape)
        for src in range(C):
            dks, dvs = torch.zeros(k[pos[src]].shape), torch.zeros(v[pos[src]].shape)
            for seg in block_segments(tuple(cu), C, c, src, window):
                for t in tiles(seg, window, tile):
                    segment_backward(qc, k.detach()[pos[src]], v.detach()[pos[src]], dout[pos[c]], out, lse, t, 0.3,
                                     window, softcap, dqc, dks, dvs)
            dk[pos[src]] += dks
            dv[pos[src]] += dvs
        dq[pos[c]] = dqc
    for name, got, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert (got - x.grad).abs().max() < 1e-5, name


def test_tiles_skip_what_nothing_sees():
    diag = Segment(0, 8, 0, 8, 0, True)
    assert len(list(tiles(diag, None, 4))) == 3  # the tile above the diagonal is skipped
    assert len(list(tiles(diag, 2, 2))) == 7  # window 2: only the diagonal tiles and the ones just below
    far = Segment(0, 4, 0, 4, 10, False)  # keys 6..10 positions before the queries
    assert list(tiles(far, 6, 4)) == [] and len(list(tiles(far, None, 4))) == 1


def test_short_documents_connect_no_other_rank():
    cu = tuple(range(0, 129, 2))  # 64 documents of 2 tokens, C = 4: chunks of 2 tokens
    assert sum(bool(block_segments(cu, 4, c, s, None)) for c in range(4) for s in range(4)) == 4


def test_balanced_split_on_log_normal_documents():
    """Per-rank attention work within 10 % of the mean (zigzag: far off) — the figures in ring_split's docstring
    on a smaller sample."""
    worst_balanced, worst_zigzag = 0.0, 0.0
    for median, T, C, seed in itertools.product((400, 4000), (32768,), (2, 4, 8), range(2)):
        cu = [0] + list(itertools.accumulate(doc_lengths(T, seed=seed, median=median)))
        worst_balanced = max(worst_balanced, imbalance(attention_work(cu, C)))
        worst_zigzag = max(worst_zigzag, imbalance(attention_work(cu, C, zigzag=True)))
    assert worst_balanced <= 0.10 and worst_zigzag > 0.3, (worst_balanced, worst_zigzag)
    assert sum(b - a for c in range(4) for a, b in ring_chunks((0, 256), 4, c)) == 256


def test_ring_degrees_are_checked():
    assert ParallelDims.check_ring(8, 2) == (2, 4)
    with pytest.raises(ValueError, match=r"ring degree ring=3 must divide the sequence parallel degree sp=8 "
                                         r"\(sp = ring x ulysses\); use ring in \[1, 2, 4, 8\]"):
        ParallelDims.check_ring(8, 3)
    with pytest.raises(ValueError, match="not a multiple of 64"):
        split_positions((0, 100), 2, 2, 0)

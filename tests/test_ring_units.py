"""Single-process checks of ring attention's parts: the balanced split, the block segments of every (query rank,
key rank) pair with their exact math (a virtual ring: all C ranks in one process, merged by log-sum-exp), tiles,
and the load balance on log-normal documents."""

import itertools
import math

import pytest
import torch

from seqpack.attention.kernels import AttnSpec, varlen_attention
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


def _virtual_ring(q, k, v, dout, cu, C, window, softcap, tile, causal=True):
    """All C ranks of a ring in one process: each rank's chunks (the split for ``causal``), every block's segments
    merged by log-sum-exp, and the blockwise backward. -> (output [T, H, D], dq, dk, dv) in row order."""
    T = q.shape[0]
    pos = [split_positions(cu, C, 1, c, causal=causal) for c in range(C)]
    assert torch.equal(torch.cat(pos).sort().values, torch.arange(T))  # every token on exactly one rank
    q, k, v = (x.detach() for x in (q, k, v))
    out_row, dq, dk, dv = (torch.zeros(x.shape) for x in (q, q, k, v))
    for c in range(C):
        qc = q[pos[c]]
        out, lse = torch.zeros(qc.shape), torch.full(qc.shape[:2], -math.inf)
        for src in range(C):
            for seg in block_segments(tuple(cu), C, c, src, window, causal):
                for t in tiles(seg, window, tile):
                    o, l = segment_forward(qc, k[pos[src]], v[pos[src]], t, 0.3, window, softcap)
                    merge_into(out, lse, slice(t.q0, t.q1), o, l)
        out_row[pos[c]] = out
        dqc = torch.zeros(qc.shape)
        for src in range(C):
            dks, dvs = torch.zeros(k[pos[src]].shape), torch.zeros(v[pos[src]].shape)
            for seg in block_segments(tuple(cu), C, c, src, window, causal):
                for t in tiles(seg, window, tile):
                    segment_backward(qc, k[pos[src]], v[pos[src]], dout[pos[c]], out, lse, t, 0.3,
                                     window, softcap, dqc, dks, dvs)
            dk[pos[src]] += dks
            dv[pos[src]] += dvs
        dq[pos[c]] = dqc
    return out_row, dq, dk, dv


def _row(C, seed, dtype=torch.float64):
    """Boundaries with one- and two-token documents and a few random ones, and q/k/v [T, 4 | 2 | 2, 8]."""
    g = torch.Generator().manual_seed(seed)
    T = CHUNKS_PER_RANK * C * 2
    cu = [0, 1, 2] + sorted(set(torch.randint(3, T - 1, (4,), generator=g).tolist())) + [T - 1, T]
    q, k, v = (torch.randn(T, h, 8, generator=g, dtype=dtype).requires_grad_() for h in (4, 2, 2))
    return cu, q, k, v, g


@pytest.mark.parametrize("C, window, softcap, tile", [(1, None, None, 512), (2, None, None, 3), (3, 3, None, 512),
                                                       (4, None, 2.0, 512), (3, 5, 1.5, 4), (2, 2, None, 512)])
def test_virtual_ring_equals_whole_row_forward_and_backward(C, window, softcap, tile):
    cu, q, k, v, g = _row(C, C)
    ref = _reference(q, k, v, cu, 0.3, window, softcap)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref.backward(dout)
    out, dq, dk, dv = _virtual_ring(q, k, v, dout, cu, C, window, softcap, tile)
    assert (out - ref.detach()).abs().max() < 1e-5
    for name, got, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert (got - x.grad).abs().max() < 1e-5, name


@pytest.mark.parametrize("C, softcap, tile", [(1, None, 512), (2, None, 3), (3, 1.5, 512), (4, None, 5)])
def test_bidirectional_virtual_ring_equals_the_non_causal_kernel(C, softcap, tile):
    """causal=False: every query attends to its whole document across ring blocks (no causal skip, the same merge
    and backward), equal to seqpack's unsharded non-causal per-document kernel — forward and every gradient."""
    cu, q, k, v, g = _row(C, 10 + C, torch.float32)
    spec = AttnSpec(scale=0.3, softcap=softcap, causal=False)
    ref = varlen_attention(q, k, v, cu, max(b - a for a, b in zip(cu, cu[1:])), spec, "sdpa")
    dout = torch.randn(ref.shape, generator=g)
    ref.backward(dout)
    out, dq, dk, dv = _virtual_ring(q, k, v, dout, cu, C, None, softcap, tile, causal=False)
    assert (out - ref.detach()).abs().max() < 1e-5
    for name, got, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert (got - x.grad).abs().max() < 1e-5, name
    causal_out = _virtual_ring(q, k, v, dout, cu, C, None, softcap, tile)[0]
    assert (causal_out - out).abs().max() > 1e-2, "the bidirectional result must differ from the causal one"


def test_bidirectional_blocks_connect_documents_in_both_directions():
    cu = (0, 64, 128)  # two documents, C = 2: every rank's chunks meet the other rank's in both documents
    segs = [block_segments(cu, 2, c, s, None, causal=False) for c in range(2) for s in range(2)]
    assert all(segs) and all(not x.causal for b in segs for x in b)
    seen = sum((x.q1 - x.q0) * (x.k1 - x.k0) for b in segs for x in b)
    assert seen == 64 * 64 * 2, "every (query, key) pair of a document exactly once"
    assert len(list(tiles(Segment(0, 8, 0, 8, 0, True, causal=False), None, 4))) == 4  # no tile skipped
    short = tuple(range(0, 129, 2))
    assert sum(bool(block_segments(short, 4, c, s, None, causal=False)) for c in range(4) for s in range(4)) == 4
    docs = [0] + list(itertools.accumulate(doc_lengths(32768, seed=0, median=4000)))
    for C in (2, 4, 8):  # the split balanced for bidirectional work
        assert imbalance(attention_work(docs, C, causal=False)) <= 0.05


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

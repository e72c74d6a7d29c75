"""Exact packed varlen ring attention over the context (ring) group of 2D sequence parallelism.

Shape legend: T tokens of the padded row, C ring degree, Tq = T/C local tokens (its chunks of the row), H query
heads, Hkv key/value heads, D head dim.

Every ring rank holds the queries, keys and values of its chunks of the row (:mod:`seqpack.parallel.ring_split`)
for H heads (after the Ulysses all-to-all when there is one). In C steps the key/value chunks travel once around
the ring; at each step the rank computes only the (query, key) segments that the GLOBAL ``cu_seqlens`` connect
(:mod:`seqpack.attention.ring_blocks`: a block no local query document reaches costs nothing), and merges the
partial output into float32 accumulators by online softmax with its log-sum-exp, whatever the compute dtype.

The backward is a :class:`torch.autograd.Function` of its own, not autograd through the ring: it recomputes every
segment's probabilities from the merged output and log-sum-exp (FlashAttention's backward, block by block), adds
dq locally and lets dk/dv travel around the ring with the key/value chunks back to their owner. The forward runs on
flash-attn / torch ``varlen_attn`` (both return the log-sum-exp) or on the exact float32 math on any device; the
backward recomputes with the exact float32 math. The exact math works in tiles of at most 512 × 512 (query,
key) pairs and skips tiles above the causal diagonal, so its memory does not grow with the document length.

Supported: causal attention, sliding window, GQA (KV heads never repeated on the exact path), logit softcap (exact
and flash-attn), and bidirectional attention within documents (``causal=False``, diffusion transformers' joint
attention: no causal skip, the same merge and blockwise backward, on the split balanced for it:
``split_positions(..., causal=False)``). Refused with a ValueError: attention dropout, ALiBi, a sliding window
with bidirectional attention.

    >>> out = ring_attention(q, k, v, cu, spec, ring_group)   # q [T/C, H, D] -> [T/C, H, D]  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ..parallel.comm import RingPass, group_rank, group_size
from . import backends
from .ring_blocks import block_segments, merge_into, segment_backward, segment_forward, tiles


def check_ring_spec(spec) -> None:
    """ValueError for what ring attention cannot do (before any work)."""
    if spec.dropout and torch.is_grad_enabled():
        raise ValueError(f"ring attention (sequence_2D context_size > 1) cannot apply attention dropout "
                         f"({spec.dropout}); set attention_dropout=0 or use Ulysses only (context_size=1)")
    if spec.alibi_slopes is not None:
        raise ValueError("ring attention (context_size > 1) does not support ALiBi biases; use Ulysses only")
    if not spec.causal and spec.sliding_window is not None:
        raise ValueError("ring attention (context_size > 1) runs bidirectional attention without a sliding window "
                         f"only (sliding_window={spec.sliding_window}); use Ulysses only (context_size=1)")


def _block_forward(q, kv, segs, spec, backend, out_acc, lse_acc):
    """Forward of one ring step: merge every segment of the key/value block ``kv`` [2, Tq, Hkv, D]."""
    k, v = kv[0], kv[1]
    W = spec.sliding_window
    if backend == "sdpa":
        for seg in segs:
            for tile in tiles(seg, W):
                out, lse = segment_forward(q, k, v, tile, spec.scale, W, spec.softcap)
                merge_into(out_acc, lse_acc, slice(tile.q0, tile.q1), out, lse)
        return
    kernel = backends.kernel(backend)
    diagonal = [s for s in segs if s.diagonal]
    if diagonal:  # step 0: every local document clipped to its chunk, one varlen call
        assert diagonal[0].q0 == 0 and diagonal[-1].q1 == q.shape[0], "diagonal segments cover the local rows"
        cu = torch.tensor([s.q0 for s in diagonal] + [diagonal[-1].q1], dtype=torch.int32, device=q.device)
        longest = max(s.q1 - s.q0 for s in diagonal)
        out, lse = kernel.with_lse(q, k, v, cu, cu, longest, longest, spec, causal=spec.causal)
        merge_into(out_acc, lse_acc, slice(0, q.shape[0]), out.float(), lse)
    for seg in segs:
        if seg.diagonal:
            continue
        Lq, Lk = seg.q1 - seg.q0, seg.k1 - seg.k0
        window = (-1, -1)
        if W is not None:  # keys i + offset - (W - 1) .. i + offset, in the kernel's i + Lk - Lq frame
            right = seg.offset - (Lk - Lq)
            window = (W - 1 - right, right)
        cu_q = torch.tensor([0, Lq], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, Lk], dtype=torch.int32, device=q.device)
        out, lse = kernel.with_lse(q[seg.q0:seg.q1], k[seg.k0:seg.k1], v[seg.k0:seg.k1], cu_q, cu_k, Lq, Lk, spec,
                                   causal=False, window=window)
        merge_into(out_acc, lse_acc, slice(seg.q0, seg.q1), out.float(), lse)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, spec, backend, group):
        C, c = group_size(group), group_rank(group)
        out_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [Tq, H, D]
        lse_acc = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)  # [Tq, H]
        kv = torch.stack([k, v])  # [2, Tq, Hkv, D]
        ring = RingPass(group) if C > 1 else None
        for step in range(C):
            if step < C - 1:
                ring.start([kv])  # the next block travels while this one is computed
            segs = block_segments(cu, C, c, (c - step) % C, spec.sliding_window, spec.causal)
            _block_forward(q, kv, segs, spec, backend, out_acc, lse_acc)
            if step < C - 1:
                kv = ring.wait()[0]
        ctx.save_for_backward(q, k, v, out_acc, lse_acc)
        ctx.cu, ctx.spec, ctx.group = cu, spec, group
        return out_acc.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        spec, group, cu = ctx.spec, ctx.group, ctx.cu
        C, c = group_size(group), group_rank(group)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # travels with its block
        ring = RingPass(group) if C > 1 else None
        for step in range(C):
            for seg in block_segments(cu, C, c, (c - step) % C, spec.sliding_window, spec.causal):
                for tile in tiles(seg, spec.sliding_window):
                    segment_backward(q, kv[0], kv[1], dout, out, lse, tile, spec.scale, spec.sliding_window,
                                     spec.softcap, dq, dkv[0], dkv[1])
            if C > 1:  # the last pass brings every block's dk/dv home to its owner
                kv, dkv = ring.start([kv, dkv]).wait() if step < C - 1 else (kv, ring.start([dkv]).wait()[0])
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(q, k, v, cu: list[int], spec, group, backend: str = "sdpa") -> torch.Tensor:
    """Packed attention over the ring ``group``, causal or (``spec.causal=False``) bidirectional within
    documents. q [T/C, H, D], k/v [T/C, Hkv, D] (this ring rank's chunks of the split balanced for that kind of
    attention, whole heads) -> [T/C, H, D] in the compute dtype; ``cu`` the GLOBAL boundaries 0 .. T (host
    list); ``backend`` a resolved backend name (``"sdpa"`` = exact float32 math, or a kernel returning the LSE)."""
    check_ring_spec(spec)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    C = group_size(group)
    if cu[-1] != q.shape[0] * C:
        raise ValueError(f"ring attention: cu_seqlens ends at {cu[-1]} but {C} ring ranks hold {q.shape[0]} tokens "
                         "each; pass the global cu_seqlens of the padded row")
    dtype = backends.compute_dtype(q)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    return _RingAttention.apply(q, k, v, tuple(cu), spec, backend, group)

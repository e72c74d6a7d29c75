"""Tiled attention backward: one key/value head group at a time (``model.tiled_attention``).

Shape legend: T tokens, N query heads, G key/value heads (the groups), r = N / G query heads per group, D head dim.

A varlen kernel's backward allocates buffers over all heads at once: flash-attn 2's ``mha_varlen_bwd`` keeps a
float32 dq accumulator [T, N, D] and, when key/value heads are shared (GQA), dk and dv expanded over the N query
heads [T, N, D] before it sums them per group — at a million tokens of an 8B model, more than all the layer's
saved tensors. Heads never interact in attention, so the backward can run one group (a key/value head and the r
query heads that share it) at a time: :class:`_TiledAttention` runs the forward once over all heads without a
graph, keeps only q, k, v, and in backward recomputes each group's forward with the kernel's own autograd and takes
its gradients, writing them into dq, dk, dv. The buffers of one call then cover r heads, not N (G times smaller),
for one more attention forward per layer (ALST's tiled MLP makes the same trade for the MLP).

Exact: every head's output and gradients come from the same kernel on the same numbers (bitwise equal to one call
on the kernels that compute heads independently, checked in tests/test_tiled_attention.py). Refused: attention
dropout (the recomputed forward would draw another mask).

    >>> out = tiled_attention(attend, q, k, v, spec)   # attend(q, k, v, spec) -> [T, N, D]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import replace

import torch


def _group_spec(spec, g: int, r: int):
    """``spec`` for query heads g*r .. (g+1)*r (ALiBi slopes are per query head)."""
    if spec.alibi_slopes is None:
        return spec
    return replace(spec, alibi_slopes=spec.alibi_slopes[g * r:(g + 1) * r])


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attend, spec):
        ctx.attend, ctx.spec = attend, spec
        device = q.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(q, k, v)
        return attend(q, k, v, spec)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        G = k.shape[1]
        r = q.shape[1] // G
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        device, enabled, dtype = ctx.autocast
        for g in range(G):
            heads = slice(g * r, (g + 1) * r)
            qg = q[:, heads].detach().contiguous().requires_grad_()  # [T, r, D]
            kg, vg = (x[:, g:g + 1].detach().contiguous().requires_grad_() for x in (k, v))  # [T, 1, D]
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.attend(qg, kg, vg, _group_spec(ctx.spec, g, r))
            gq, gk, gv = torch.autograd.grad(out, (qg, kg, vg), dout[:, heads])
            del out
            dq[:, heads], dk[:, g:g + 1], dv[:, g:g + 1] = gq, gk, gv
            del gq, gk, gv
        return dq, dk, dv, None, None


def tiled_attention(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec) -> torch.Tensor:
    """``attend(q, k, v, spec)`` whose backward runs one key/value head group at a time (see the module docstring).
    q [T, N, D], k/v [T, G, D] -> [T, N, D]. Without gradients (or with one group) it is ``attend`` itself."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not needs_grad or k.shape[1] == 1:
        return attend(q, k, v, spec)
    if spec.dropout:
        raise ValueError(f"model.tiled_attention recomputes attention in backward, so attention dropout "
                         f"({spec.dropout}) would draw a different mask there; set attention_dropout=0 or turn "
                         "tiled attention off")
    return _TiledAttention.apply(q, k, v, attend, spec)

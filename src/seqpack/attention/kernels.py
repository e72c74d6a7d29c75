"""Exact variable-length causal attention kernels, flash-attn layout.

Shape legend: T packed tokens, n documents, N query heads, Nkv key/value heads, D head dim, L bucket length.
Every kernel takes q [T, N, D], k/v [T, Nkv, D] and the host list ``cu`` (n+1 boundaries) and returns [T, N, D].
Token t attends to token s only when both are in the same document, s <= t, and (with a window W) t - s < W.

Backends (chosen per call by :func:`seqpack.attention.backends.resolve_backend`):
- ``flash_attn``: flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16): window, softcap, dropout, ALiBi, GQA.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, torch >= 2.10): window and GQA
  where the installed signature has them; no softcap, no dropout. Both adapted once in ``backends.py``.
- ``sdpa``: any device. Documents are grouped into buckets of similar length, right-padded to the bucket's
  longest, and run as one causal ``scaled_dot_product_attention`` batch per bucket. Right padding never changes a
  real token's result under a causal mask, so this is exact, and memory is O(sum of bucket L^2), never O(T^2).
  With ``causal=False`` (bidirectional, e.g. diffusion transformers) a key-padding mask hides the padding keys.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..batch import length_buckets
from . import backends
from .backends import BACKENDS, resolve_backend  # noqa: F401  (re-exported)
from .tiled import tiled_attention


@dataclass(frozen=True)
class AttnSpec:
    """What one attention call asks for (from the model's attention module)."""

    scale: float
    sliding_window: int | None = None  # attend to the last W tokens including itself
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap)
    dropout: float = 0.0
    alibi_slopes: torch.Tensor | None = None  # [N] fp32: score(t, s) += slope_h * (s - t) (Baichuan-13B style ALiBi)
    causal: bool = True  # False: every token attends to its whole document (flash_attn / torch_varlen)


def varlen_attention(q, k, v, cu: list[int], max_seqlen: int, spec: AttnSpec, backend: str = "auto",
                     cu_tensor: torch.Tensor | None = None, tiled: bool = False) -> torch.Tensor:
    """Attention within documents (causal unless ``spec.causal`` is False). q [T, N, D], k/v [T, Nkv, D] ->
    [T, N, D], in the compute dtype (the autocast dtype under ``torch.autocast``, else q's). ``tiled``: the
    backward runs one key/value head group at a time (:mod:`seqpack.attention.tiled`)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    dtype = backends.compute_dtype(q)  # under autocast: the autocast dtype (RoPE leaves q/k in float32 there)
    backend = backends.resolve_backend(backend, q.device, spec, dtype, q.shape[-1])
    if backend == "sdpa":
        attend = functools.partial(_bucketed_sdpa, cu=cu)
    else:
        if cu_tensor is None or cu_tensor.device != q.device:
            cu_tensor = torch.tensor(cu, dtype=torch.int32, device=q.device)
        q, k, v = (x.to(dtype) for x in (q, k, v))  # the kernel's dtype; the output stays in it, as with SDPA
        kernel, cu_tensor = backends.kernel(backend), cu_tensor.to(torch.int32)

        def attend(q, k, v, spec):
            return kernel(q, k, v, cu_tensor, max_seqlen, spec)
    return tiled_attention(attend, q, k, v, spec) if tiled else attend(q, k, v, spec)


def _bucketed_sdpa(q, k, v, spec: AttnSpec, cu: list[int]) -> torch.Tensor:
    T = q.shape[0]
    starts, lengths = cu[:-1], [b - a for a, b in zip(cu, cu[1:])]
    if len(lengths) == 1:  # one document spans the row: no gather needed
        return _dense_causal(q[None], k[None], v[None], spec)[0]
    outs, token_index = [], []
    for bucket in length_buckets(lengths):
        L = lengths[bucket[0]]
        first = torch.tensor([starts[i] for i in bucket], device=q.device)
        idx = (first[:, None] + torch.arange(L, device=q.device)).clamp_(max=T - 1)  # [nb, L]; pad slots reuse tokens
        valid = torch.arange(L, device=q.device)[None, :] < torch.tensor([lengths[i] for i in bucket],
                                                                            device=q.device)[:, None]
        key_valid = None if spec.causal or bool(valid.all()) else valid  # bidirectional: hide the padding keys
        out = _dense_causal(q[idx], k[idx], v[idx], spec, key_valid)  # [nb, L, N, D]
        outs.append(out[valid])  # [sum l, N, D]
        token_index.append(idx[valid])
    token_index = torch.cat(token_index)
    inverse = torch.empty_like(token_index)
    inverse[token_index] = torch.arange(T, device=q.device)
    return torch.cat(outs)[inverse]


def _dense_causal(q, k, v, spec: AttnSpec, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over equal-length rows. q [B, L, N, D], k/v [B, L, Nkv, D] -> [B, L, N, D].
    With ``spec.causal=False`` bidirectional, keys where ``key_valid`` [B, L] is False (right padding) hidden."""
    L = q.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D]
    dropout = spec.dropout if torch.is_grad_enabled() else 0.0
    if not spec.causal:
        return _dense_bidirectional(q, k, v, spec, key_valid, dropout).transpose(1, 2)
    window = spec.sliding_window if spec.sliding_window is not None and spec.sliding_window < L else None
    if spec.alibi_slopes is not None:
        mask = alibi_mask(causal_mask(L, L, window, q.device), spec.alibi_slopes, q.dtype)  # [N, L, L] float
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=spec.scale,
                                             enable_gqa=k.shape[1] != q.shape[1]) if spec.softcap is None else \
            _math_attention(q, k, v, causal_mask(L, L, window, q.device), spec, dropout)
    elif spec.softcap is None:
        mask = causal_mask(L, L, window, q.device) if window is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                             scale=spec.scale, enable_gqa=k.shape[1] != q.shape[1])
    else:
        out = _math_attention(q, k, v, causal_mask(L, L, window, q.device), spec, dropout)
    return out.transpose(1, 2)


def _dense_bidirectional(q, k, v, spec: AttnSpec, key_valid, dropout: float) -> torch.Tensor:
    """q [B, N, L, D], k/v [B, Nkv, L, D], key_valid [B, L] bool or None -> [B, N, L, D]."""
    if spec.sliding_window is not None or spec.alibi_slopes is not None:
        raise ValueError("causal=False (bidirectional attention) supports neither sliding_window nor alibi_slopes "
                         "on the sdpa backend")
    L = q.shape[2]
    mask = None if key_valid is None else key_valid[:, None, None, :].expand(-1, 1, L, -1)  # [B, 1, L, L]
    if spec.softcap is not None:
        return _math_attention(q, k, v, mask, spec, dropout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=spec.scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def causal_mask(q_len: int, kv_len: int, window: int | None, device) -> torch.Tensor:
    """[q_len, kv_len] bool, True = may attend; queries are the last q_len positions of the keys."""
    qpos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kpos = torch.arange(kv_len, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def alibi_mask(mask: torch.Tensor, slopes: torch.Tensor, dtype) -> torch.Tensor:
    """Additive ALiBi mask from a bool mask [Lq, Lk] or [B, 1, Lq, Lk] (True = attend; queries are the last Lq
    positions): slope_h * (s - t) where allowed, -inf elsewhere -> [N, Lq, Lk] or [B, N, Lq, Lk]."""
    Lq, Lk = mask.shape[-2:]
    rel = (torch.arange(Lk, device=mask.device)[None, :] - torch.arange(Lk - Lq, Lk, device=mask.device)[:, None])
    bias = slopes.to(mask.device, torch.float32)[:, None, None] * rel  # [N, Lq, Lk]
    return torch.where(mask, bias, -math.inf).to(dtype)


def _math_attention(q, k, v, mask, spec: AttnSpec, dropout: float) -> torch.Tensor:
    """Reference math with softcap and GQA without repeating KV. q [B, N, Lq, D], k/v [B, Nkv, Lk, D], mask
    broadcastable to [B, N, Lq, Lk] (True = attend) -> [B, N, Lq, D]."""
    B, N, Lq, D = q.shape
    Nkv = k.shape[1]
    qg = q.reshape(B, Nkv, N // Nkv, Lq, D)  # [B, Nkv, g, Lq, D]
    scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * spec.scale  # [B, Nkv, g, Lq, Lk]
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if spec.alibi_slopes is not None:
        rel = torch.arange(scores.shape[-1], device=q.device)[None, :] - \
            torch.arange(scores.shape[-1] - Lq, scores.shape[-1], device=q.device)[:, None]  # [Lq, Lk]: s - t
        scores = scores + (spec.alibi_slopes.to(q.device, torch.float32).reshape(Nkv, N // Nkv, 1, 1) * rel)
    if mask is not None:
        if mask.dim() == 4:  # [B or 1, N or 1, Lq, Lk] -> group layout
            mask = mask.reshape(mask.shape[0], -1, 1, Lq, mask.shape[-1]) if mask.shape[1] == 1 else \
                mask.reshape(mask.shape[0], Nkv, N // Nkv, Lq, mask.shape[-1])
        scores = scores.masked_fill(~mask, -math.inf)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = torch.nan_to_num(probs)  # rows with no visible key (fully masked padding) give 0, not NaN
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v[:, :, None]).reshape(B, N, Lq, D)


def masked_attention(q, k, v, mask: torch.Tensor | None, spec: AttnSpec) -> torch.Tensor:
    """Unpacked attention with a dense mask (generation with a cache, padded batches).
    q [B, N, Lq, D], k/v [B, Nkv, Lk, D], mask [B|1, 1, Lq, Lk] bool or None (causal) -> [B, N, Lq, D]."""
    if mask is None:
        mask = causal_mask(q.shape[2], k.shape[2], spec.sliding_window, q.device)
    dropout = spec.dropout if torch.is_grad_enabled() else 0.0
    if mask.dtype != torch.bool:
        mask = mask == 0  # additive float mask: 0 = attend
    if spec.softcap is None and spec.alibi_slopes is not None:
        mask = alibi_mask(mask, spec.alibi_slopes, q.dtype)  # [B|1, N, Lq, Lk] additive
        return torch.nan_to_num(F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=spec.scale, enable_gqa=k.shape[1] != q.shape[1]))
    if spec.softcap is None:
        return torch.nan_to_num(F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=spec.scale, enable_gqa=k.shape[1] != q.shape[1]))
    return _math_attention(q, k, v, mask, spec, dropout)

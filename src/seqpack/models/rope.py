"""Rotary position embeddings of the InternLM / InternLM2 / Baichuan2-7B checkpoints, packing-aware.

Shape legend: B batch rows, T tokens per row, D head dim, H heads.

Variants (as published in the checkpoints' modeling files):
- ``None`` ("origin"): angle(p, i) = p * base^(-2i/D).
- ``"linear"``: positions divided by ``factor``.
- ``"dynamic"`` (NTK): a sequence of length L > ``max_position_embeddings`` uses
  base' = base * (factor * L / max_pos - (factor - 1)) ^ (D / (D - 2)); shorter sequences use ``base``.
  In a packed row every document is its own sequence, so L is the length of the token's **document** (exactly what
  the document gets when run alone through the published code); without packing metadata L is the row length
  including the KV cache, as in the published code. InternLM's published code caches keys *unrotated* and, at
  every step, rotates all of them with the table of the current length L (``cached_key_positions``); its model
  does the same (``NativeModel.rotate_cached_keys``), so generation past ``max_position_embeddings`` matches.

The published code builds cos/sin tables with ``arange(L) (x) inv_freq`` in fp32; here each entry is the same fp32
product ``position * inv_freq``, so tables match bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

ROPE_TYPES = (None, "linear", "dynamic")


def inv_frequencies(base: float, dim: int, device=None) -> torch.Tensor:
    """[D/2] fp32 inverse frequencies base^(-2i/D) (same expression as the published code)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))


class RotaryEmbedding(nn.Module):
    """cos/sin for given positions. ``forward(position_ids [B, T], doc_lens [B, T] | None)`` -> fp32 [B, T, D]."""

    def __init__(self, dim: int, base: float, max_position_embeddings: int, rope_type: str | None = None,
                 factor: float = 1.0):
        super().__init__()
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rotary scaling type {rope_type!r}; seqpack supports 'linear' and 'dynamic' "
                             "(or none)")
        self.dim, self.base, self.max_pos = dim, float(base), int(max_position_embeddings)
        self.rope_type, self.factor = rope_type, float(factor)  # no buffers: nothing to re-create after meta init

    @property
    def needs_doc_lens(self) -> bool:
        return self.rope_type == "dynamic"

    def _dynamic_inv_freq(self, doc_lens: torch.Tensor) -> torch.Tensor:
        """[B, T] document lengths -> [B, T, D/2] per-token inverse frequencies."""
        inv = inv_frequencies(self.base, self.dim, doc_lens.device).expand(*doc_lens.shape, -1).clone()
        for L in doc_lens[doc_lens > self.max_pos].unique().tolist():  # few distinct long documents
            base = self.base * ((self.factor * L / self.max_pos) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
            inv[doc_lens == L] = inv_frequencies(base, self.dim, doc_lens.device)
        return inv

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, doc_lens: torch.Tensor | None = None):
        pos = position_ids.float()  # [B, T]
        if self.rope_type == "linear":
            pos = pos / self.factor
        if self.rope_type == "dynamic" and doc_lens is not None and bool((doc_lens > self.max_pos).any()):
            freqs = pos[..., None] * self._dynamic_inv_freq(doc_lens)  # [B, T, D/2]
        else:
            freqs = pos[..., None] * inv_frequencies(self.base, self.dim, pos.device)
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """x [B, H, T, D], cos/sin [B, T, D] -> x rotated (NeoX half-rotation).
    ``fp32=True`` rotates in fp32 and casts back (Baichuan2); else cos/sin are cast to x's dtype (InternLM)."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
    if fp32:
        return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp32: bool = False):
    """q [B, N, T, D], k [B, Nkv, T, D], cos/sin [B, T, D] -> rotated q, k (see :func:`rotate`)."""
    return rotate(q, cos, sin, fp32), rotate(k, cos, sin, fp32)


def cached_key_positions(position_ids: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, T] positions of the current tokens -> [B, kv_len] positions of every cached key, as InternLM's published
    ``apply_rotary_pos_emb`` rotates them: contiguous, ending at each row's last position (left padding: a row's
    real keys are its last ``position + 1``; the pad slots before them get negative positions and are masked)."""
    last = position_ids[:, -1:]  # [B, 1]
    return last - (kv_len - 1) + torch.arange(kv_len, device=position_ids.device)[None]


def document_lengths(position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None, past: int,
                     start: int = 0) -> torch.Tensor:
    """[B, T] length of the sequence each token belongs to (what dynamic NTK scales by).

    cu_seqlens [n+1] (packed row; with sequence parallel the row is global and this shard starts at token
    ``start``) -> its document's length; else a row whose position_ids restart at 0 -> the segment's length;
    else the whole row plus ``past`` cached tokens, as the published code does.
    """
    B, T = position_ids.shape
    if cu_seqlens is not None:
        lengths = cu_seqlens.diff().to(position_ids.device)
        per_token = torch.repeat_interleave(lengths, lengths)  # [T_global]
        return per_token[start:start + T].expand(B, T)
    if past == 0 and B == 1 and T > 1 and bool((position_ids[0, 1:] == 0).any()):
        starts = (position_ids[0] == 0).nonzero().reshape(-1).tolist()
        bounds = ([0] if starts[0] != 0 else []) + starts + [T]
        lengths = torch.tensor(bounds, device=position_ids.device).diff()
        return torch.repeat_interleave(lengths, lengths)[None]
    return torch.full((B, T), past + T, device=position_ids.device)

"""A compact forward pass of InternEvo's InternLM / InternLM2 written from InternEvo's math, run directly on the
tensor-parallel shards (each rank computes its own heads and partial MLP, row-parallel outputs are summed, vocab
shards concatenated) — the InternEvo side of ``--verify`` and of the tests.

Legend: ``T`` tokens, ``N``/``Nkv`` heads, ``n``/``g`` heads/kv groups on one tp rank, ``D`` head dim,
``H`` hidden, ``V`` vocab. Computed in float64; no dynamic-NTK scaling (inputs are shorter than max_pos).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .families import Arch


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotary(x: torch.Tensor, theta: float, interleaved: bool) -> torch.Tensor:
    """x: [T, heads, D] at positions 0..T-1; interleaved rotates pairs (2i, 2i+1), else (i, i + D/2)."""
    T, _, D = x.shape
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # [T, D/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [T, n, D], k/v: [T, g, D] with q head j using kv head j // (n/g); causal. -> [T, n·D]"""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    mask = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).flatten(1)


def internevo_logits(arch: Arch, ranks: list[dict[str, torch.Tensor]], input_ids: torch.Tensor, *,
                     interleaved: bool, embed_split_hidden: bool, rope_theta: float, eps: float,
                     norm_head: bool = False) -> torch.Tensor:
    """Logits ``[T, V]`` (float64) of ``input_ids`` ``[T]`` for InternEvo tp shards ``ranks`` (pp already joined,
    InternEvo names as in :func:`seqpack.convert.families.params`)."""
    ranks = [{k: v.double() for k, v in r.items()} for r in ranks]
    D, q_per_kv = arch.head_dim, arch.q_per_kv
    v2 = arch.family == "internlm2"
    emb = "tok_embeddings.weight" if v2 else "embedding.weight"
    if embed_split_hidden:
        x = torch.cat([r[emb][input_ids] for r in ranks], dim=-1)  # [T, H]
    else:
        x, start = 0, 0
        for r in ranks:
            local = input_ids - start
            inside = (local >= 0) & (local < r[emb].shape[0])
            x = x + r[emb][local.clamp(0, r[emb].shape[0] - 1)] * inside[:, None]
            start += r[emb].shape[0]
    up = "w3" if arch.mlp_down == "w2" else "w2"
    for i in range(arch.num_layers):
        p = f"layers.{i}." if v2 else f"blocks.{i}."
        attn_out = 0
        for r in ranks:
            h = _rms(x, r[p + ("attention_norm.weight" if v2 else "norm1.weight")], eps)
            if v2:
                qkv = F.linear(h, r[p + "attention.wqkv.weight"], r.get(p + "attention.wqkv.bias"))
                qkv = qkv.view(h.shape[0], -1, q_per_kv + 2, D)  # [T, g, q+2, D] group-major
                q, k, v = qkv[:, :, :q_per_kv].flatten(1, 2), qkv[:, :, -2], qkv[:, :, -1]
                wo, bo = r[p + "attention.wo.weight"], r.get(p + "attention.wo.bias")
            else:
                qkv = F.linear(h, r[p + "mixer.Wqkv.weight"], r[p + "mixer.Wqkv.bias"]).view(h.shape[0], 3, -1, D)
                q, k, v = qkv.unbind(1)
                wo, bo = r[p + "mixer.out_proj.weight"], r[p + "mixer.out_proj.bias"]
            q, k = _rotary(q, rope_theta, interleaved), _rotary(k, rope_theta, interleaved)
            attn_out = attn_out + F.linear(_attention(q, k, v), wo)  # row parallel: partial sums
        x = x + attn_out + (bo if bo is not None else 0)
        mlp_out = 0
        for r in ranks:
            m = p + ("feed_forward." if v2 else "mlp.")
            h = _rms(x, r[p + ("ffn_norm.weight" if v2 else "norm2.weight")], eps)
            act = F.silu(F.linear(h, r[m + "w1.weight"])) * F.linear(h, r[m + f"{up}.weight"])
            mlp_out = mlp_out + F.linear(act, r[m + f"{arch.mlp_down}.weight"])
        x = x + mlp_out
    x = _rms(x, ranks[0]["norm.weight"], eps)
    head = "output.weight" if v2 else "head.weight"
    heads = [F.normalize(r[head], dim=-1) if norm_head else r[head] for r in ranks]
    return torch.cat([F.linear(x, w) for w in heads], dim=-1)

"""Ulysses attention around any exact varlen kernel, for every head layout.

Shape legend: T tokens of the whole (padded) row, S SP degree, N query heads, Nkv key/value heads, D head dim.

Each of the S ranks holds a contiguous T/S slice of the row with all heads. Around attention an all-to-all
trades the sequence shard for a head shard, so the kernel sees the whole row (and the global ``cu_seqlens``)
for N/S of the heads; a second all-to-all trades back. Attention heads are independent, so this is exact.

Head layouts (``plan_heads``):

- ``N % S == 0`` and ``Nkv % S == 0``: q, k, v are exchanged as they are (GQA groups stay on one rank).
- ``N % S == 0`` and ``Nkv % S != 0`` (e.g. ``Nkv < S``, a single KV head): every KV head is repeated
  ``r = S / gcd(Nkv, S)`` times — the least repetition that gives every rank whole KV heads — so the
  ``Nkv * r`` KV heads still divide ``N`` and each query head keeps its own KV head.
- ``N % S != 0`` (e.g. 6 heads over 4 ranks, Qwen2-7B's 28 over 8): KV is expanded to N heads (plain MHA
  layout) and q, k, v get ``ceil(N/S)*S - N`` dummy heads of zeros appended. Heads never mix in attention, so a
  dummy head cannot change a real one; its output (zero) is dropped after the second all-to-all and it
  receives no gradient. Exact, at the cost of ``ceil(N/S)*S / N`` attention work.
- ``S > N`` is refused (some rank would hold only dummy heads): the error names the degrees that work. Past the
  head count, 2D sequence parallel splits S = U Ulysses × C ring ranks (``init_topology(sp=S, ring=C)``): the
  head plan is then made for U.
- ``N % Nkv != 0`` is not a valid GQA layout and is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .comm import group_size, heads_to_seq, seq_to_heads


@dataclass(frozen=True)
class HeadPlan:
    """How q/k/v heads are laid out before the seq->heads all-to-all."""

    num_heads: int  # N
    num_kv_heads: int  # Nkv
    sp: int  # S
    kv_repeat: int  # each KV head repeated this many times (1 = as is)
    pad_heads: int  # dummy zero heads appended to q, k and v (only when N % S != 0)

    def expand(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q [t, N, D], k/v [t, Nkv, D] -> q [t, N', D], k/v [t, Nkv', D] with N' and Nkv' divisible by S."""
        if self.kv_repeat > 1:
            k, v = (x.repeat_interleave(self.kv_repeat, dim=1) for x in (k, v))  # [t, Nkv*r, D]
        if self.pad_heads:
            q, k, v = (F.pad(x, (0, 0, 0, self.pad_heads)) for x in (q, k, v))  # [t, N + pad, D]
        return q, k, v


def plan_heads(num_heads: int, num_kv_heads: int, sp: int) -> HeadPlan:
    """Choose the head layout for SP degree ``sp`` (see the module docstring). Raises ValueError when impossible.

        >>> plan_heads(32, 8, 4).kv_repeat, plan_heads(32, 1, 4).kv_repeat, plan_heads(28, 4, 8).pad_heads
        (1, 4, 4)
    """
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"unsupported head layout: num_attention_heads={num_heads} is not a multiple of "
                         f"num_key_value_heads={num_kv_heads}; grouped-query attention needs N % Nkv == 0")
    if sp > num_heads:
        exact = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(f"sequence parallel degree sp={sp} exceeds the model's {num_heads} attention heads, so some "
                         f"rank would hold no real head; use sp <= {num_heads} (without dummy heads: sp in {exact}), "
                         f"or 2D sequence parallel with a Ulysses degree <= {num_heads} times a ring degree "
                         f"(init_topology(sp=S, ring=C), sequence_2D.context_size)")
    if num_heads % sp == 0:
        return HeadPlan(num_heads, num_kv_heads, sp, kv_repeat=sp // math.gcd(num_kv_heads, sp), pad_heads=0)
    padded = -(-num_heads // sp) * sp
    return HeadPlan(num_heads, num_kv_heads, sp, kv_repeat=num_heads // num_kv_heads, pad_heads=padded - num_heads)


def check_model_heads(config, sp: int) -> HeadPlan:
    """Validate a transformers config for SP degree ``sp`` before training starts; returns the head plan."""
    text = getattr(config, "get_text_config", lambda: config)()
    n = getattr(text, "num_attention_heads", None)
    if n is None:
        raise ValueError(f"{type(config).__name__} has no num_attention_heads; cannot plan sequence parallel heads")
    nkv = getattr(text, "num_key_value_heads", None) or n
    return plan_heads(n, nkv, sp)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group,
                      attn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sequence-parallel attention. q [T/S, N, D], k/v [T/S, Nkv, D] -> [T/S, N, D].

    ``attn(q, k, v)`` is the exact kernel over the whole row: q [T, N'/S, D], k/v [T, Nkv'/S, D] -> [T, N'/S, D]
    (it must use the global document boundaries).
    """
    S = group_size(group)
    N = q.shape[1]
    plan = plan_heads(N, k.shape[1], S)
    q, k, v = plan.expand(q, k, v)
    q, k, v = (seq_to_heads(x, group) for x in (q, k, v))  # [T/S, H, D] -> [T, H/S, D]
    out = attn(q, k, v)  # [T, N'/S, D]
    out = heads_to_seq(out, group)  # [T, N'/S, D] -> [T/S, N', D]
    return out[:, :N] if plan.pad_heads else out

"""transformers integration: ``attn_implementation="seqpack"``.

Registered with transformers' public ``AttentionInterface`` and ``AttentionMaskInterface`` on ``import seqpack``.
transformers calls the attention function with q/k/v as [B, N, T, D] / [B, Nkv, T, D] and forwards the varlen
metadata given to ``model(...)`` (``cu_seq_lens_q/k``, ``max_length_q/k``, ``position_ids``) as keyword arguments.

Packed path (B = 1, no dense mask): documents from ``cu_seq_lens_q`` (or, like transformers' flash path, from
restarting ``position_ids``) -> exact varlen kernel. Unpacked path (generation with a KV cache, padded batches):
the mask function builds the usual dense mask and attention runs on it, so ``generate()`` works unchanged.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..batch import check_cu_seqlens, positions_from_cu_seqlens
from .kernels import BACKENDS, AttnSpec, masked_attention, varlen_attention

NAME = "seqpack"


@dataclass
class AttentionOptions:
    """Per-model settings, attached to every submodule by :func:`dispatch` (read by the attention function)."""

    backend: str = "auto"
    sp_group: object | None = field(default=None, repr=False)  # sequence-parallel process group (parallel/)


DEFAULT_OPTIONS = AttentionOptions()


def seqpack_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              sliding_window=None, softcap=None, **kwargs):
    """AttentionInterface entry. query [B, N, T, D], key/value [B, Nkv, T, D] -> ([B, T, N, D], None)."""
    opts = getattr(module, "seqpack_options", DEFAULT_OPTIONS)
    spec = AttnSpec(
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        sliding_window=sliding_window,
        softcap=softcap,
        dropout=dropout,
    )
    if kwargs.get("is_causal") is False:
        raise ValueError("attn_implementation='seqpack' is causal-only; is_causal=False (bidirectional) was requested")
    if attention_mask is not None:  # dense mask built by our mask function: cache or padded batch
        if opts.sp_group is not None:
            raise ValueError("sequence parallel needs packed inputs without attention_mask or KV cache")
        out = masked_attention(query, key, value, attention_mask.bool() if attention_mask.dim() == 4 else None, spec)
        return out.transpose(1, 2), None
    cu_tensor = kwargs.get("cu_seq_lens_q")
    B, _, T, _ = query.shape
    if cu_tensor is None and B > 1:  # plain unpadded batch: every row is one causal sequence
        out = masked_attention(query, key, value, None, spec)
        return out.transpose(1, 2), None
    if B != 1:
        raise ValueError(f"packed metadata (cu_seq_lens_q) given with batch dimension {B}; a packed batch has "
                         "one row of shape [1, T] (concatenate the rows)")
    cu, max_seqlen = _documents(cu_tensor, kwargs.get("max_length_q"), kwargs.get("position_ids"), T)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [1, H, T, D] -> [T, H, D]
    out = varlen_attention(q, k, v, cu, max_seqlen, spec, opts.backend, cu_tensor)  # [T, N, D]
    return out[None], None


def seqpack_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: no mask at all for a packed training row (the kernel knows the documents);
    the usual dense causal / sliding / padding mask when there is a padding mask or a KV cache."""
    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)


_validated: tuple = (None, None)  # one-slot memo: (weakref to the cu_seqlens tensor, its host list)


def _documents(cu_tensor, max_length, position_ids, T: int) -> tuple[list[int], int]:
    """Host list of document boundaries, validated once per forward (all layers share the same tensor)."""
    global _validated
    if cu_tensor is not None:
        ref, cached = _validated
        if ref is not None and ref() is cu_tensor and cached[-1] == T:
            cu = cached
        else:
            cu = check_cu_seqlens(cu_tensor, T)
            if position_ids is not None:
                _check_positions(position_ids, cu)
            _validated = (weakref.ref(cu_tensor), cu)
    elif position_ids is not None:  # like transformers' flash path: a document starts where position_ids == 0
        starts = (position_ids.reshape(-1) == 0).nonzero().reshape(-1).tolist()
        cu = ([0] if not starts or starts[0] != 0 else []) + starts + [T]
    else:
        cu = [0, T]
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    if max_length is not None and int(max_length) < longest:
        raise ValueError(f"max_length_q={int(max_length)} is shorter than the longest document ({longest} tokens)")
    return cu, longest


def _check_positions(position_ids: torch.Tensor, cu: list[int]) -> None:
    pos = position_ids.reshape(-1)
    expected = positions_from_cu_seqlens(cu, device=pos.device)
    if pos.shape != expected.shape or not torch.equal(pos, expected):
        if pos.shape != expected.shape:
            raise ValueError(f"position_ids has {pos.numel()} entries but cu_seqlens describes {cu[-1]} tokens")
        bad = int((pos != expected).nonzero()[0])
        raise ValueError(f"position_ids inconsistent with cu_seqlens at token {bad}: got {int(pos[bad])}, expected "
                         f"{int(expected[bad])} (positions restart at 0 at every cu_seqlens boundary)")


def register() -> None:
    """Make ``attn_implementation="seqpack"`` available to every transformers model (done on import)."""
    AttentionInterface.register(NAME, seqpack_attention_forward)
    AttentionMaskInterface.register(NAME, seqpack_mask)


def dispatch(model, backend: str = "auto", sp_group=None):
    """Switch an existing model (e.g. from ``from_pretrained``) to seqpack attention, in place; returns it.

        >>> model = seqpack.dispatch(AutoModelForCausalLM.from_config(cfg))  # doctest: +SKIP
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel; seqpack.dispatch needs one")
    opts = AttentionOptions(backend=backend, sp_group=sp_group)
    for m in model.modules():
        m.seqpack_options = opts
    return model

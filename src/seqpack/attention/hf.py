"""transformers integration: ``attn_implementation="seqpack"``.

Registered with transformers' public ``AttentionInterface`` and ``AttentionMaskInterface`` on ``import seqpack``.
transformers calls the attention function with q/k/v as [B, N, T, D] / [B, Nkv, T, D] and forwards the varlen
metadata given to ``model(...)`` (``cu_seq_lens_q/k``, ``max_length_q/k``, ``position_ids``) as keyword arguments.

Packed path (B = 1, no dense mask): documents from ``cu_seq_lens_q`` (or, like transformers' flash path, from
restarting ``position_ids``) -> exact varlen kernel. Unpacked path (generation with a KV cache, padded batches):
the mask function builds the usual dense mask and attention runs on it, so ``generate()`` works unchanged.
Sequence parallel (``dispatch(model, sp_group=...)``): q/k/v are this rank's T/S slice; ``cu_seq_lens_q`` stays
global and :func:`seqpack.parallel.heads.ulysses_attention` runs the same kernel over the whole row.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field, replace

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..batch import check_cu_seqlens, positions_from_cu_seqlens
from ..parallel.comm import group_rank, group_size
from ..parallel.heads import check_model_heads, plan_heads, ulysses_attention
from ..parallel.ring_split import split_positions
from .backends import compute_dtype, resolve_backend
from .kernels import BACKENDS, AttnSpec, masked_attention, varlen_attention
from .multimodal import (attn_implementation_for, attn_implementations, bidirectional_attention, is_multimodal,
                         prepare_multimodal)
from .ring import check_ring_spec, ring_attention

NAME = "seqpack"


@dataclass
class AttentionOptions:
    """Per-model settings, attached to every submodule by :func:`dispatch` (read by the attention function)."""

    backend: str = "auto"
    sp_group: object | None = field(default=None, repr=False)  # Ulysses (head) process group (parallel/)
    ring_group: object | None = field(default=None, repr=False)  # ring (context) process group of 2D SP
    tiled: bool = False  # backward one key/value head group at a time (seqpack.attention.tiled)
    used: set = field(default_factory=set, repr=False)  # backends packed calls actually ran on ("torch_varlen", ...)


DEFAULT_OPTIONS = AttentionOptions()


def seqpack_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              sliding_window=None, softcap=None, alibi_slopes=None, **kwargs):
    """AttentionInterface entry. query [B, N, T, D], key/value [B, Nkv, T, D] -> ([B, T, N, D], None).
    ``alibi_slopes`` [N] (seqpack's native ALiBi models pass it) adds slope_h * (s - t) within each document."""
    opts = getattr(module, "seqpack_options", DEFAULT_OPTIONS)
    spec = AttnSpec(
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        sliding_window=sliding_window,
        softcap=softcap,
        dropout=dropout,
        alibi_slopes=alibi_slopes,
    )
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        return bidirectional_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)  # a vision encoder: SDPA; anything else: ValueError
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
    sp_size, sp_rank = group_size(opts.sp_group), group_rank(opts.sp_group)
    ring, ring_rank = group_size(opts.ring_group), group_rank(opts.ring_group)
    if sp_size * ring > 1 and cu_tensor is None:
        raise ValueError("sequence parallel needs the global cu_seq_lens_q/k of the packed row; pass "
                         "seqpack.parallel.shard_batch(batch, sp_size, sp_rank).model_inputs() to the model")
    cu, max_seqlen = _documents(cu_tensor, kwargs.get("max_length_q"), kwargs.get("position_ids"),
                                T * sp_size * ring, start=sp_rank * T, ring=(ring, sp_size, ring_rank, sp_rank))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [1, H, T, D] -> [T, H, D]
    backend = resolve_backend(opts.backend, q.device, spec, compute_dtype(q), q.shape[-1])  # errors before any work
    if opts is not DEFAULT_OPTIONS:
        opts.used.add(backend)
    if ring > 1:  # 2D: [T, N, D] -> Ulysses all-to-all -> [T*U, N/U, D] (this ring rank's chunks) -> ring -> back
        check_ring_spec(spec)
        attn = functools.partial(ring_attention, cu=cu, spec=spec, group=opts.ring_group, backend=backend)
        out = ulysses_attention(q, k, v, opts.sp_group, attn) if sp_size > 1 else attn(q, k, v)
    elif sp_size > 1:  # T is this rank's shard: [T, N, D] -> all-to-all -> [T*S, N/S, D] -> kernel -> back
        local = spec if alibi_slopes is None else replace(
            spec, alibi_slopes=_rank_alibi_slopes(alibi_slopes, k.shape[1], sp_size, sp_rank))
        out = ulysses_attention(q, k, v, opts.sp_group, lambda q, k, v: varlen_attention(
            q, k, v, cu, max_seqlen, local, backend, cu_tensor, tiled=opts.tiled))
    else:
        out = varlen_attention(q, k, v, cu, max_seqlen, spec, backend, cu_tensor, tiled=opts.tiled)  # [T, N, D]
    return out[None], None


def backends_used(model) -> str:
    """The backends the model's packed attention calls ran on so far, e.g. "torch_varlen" ("" before any call)."""
    opts = getattr(model, "seqpack_options", None)
    return "+".join(sorted(opts.used)) if opts is not None else ""


def _rank_alibi_slopes(slopes: torch.Tensor, num_kv_heads: int, sp_size: int, sp_rank: int) -> torch.Tensor:
    """The ALiBi slopes [N] of the heads this rank holds after the seq->heads all-to-all (dummy heads: 0)."""
    plan = plan_heads(slopes.shape[0], num_kv_heads, sp_size)
    return torch.nn.functional.pad(slopes, (0, plan.pad_heads)).chunk(sp_size)[sp_rank]


def seqpack_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: no mask at all for a packed training row (the kernel knows the documents);
    the usual dense causal / sliding / padding mask when there is a padding mask or a KV cache."""
    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)


_validated: tuple = (None, None)  # one-slot memo: (weakref to the cu_seqlens tensor, its host list)


def _documents(cu_tensor, max_length, position_ids, T: int, start: int = 0, ring=None) -> tuple[list[int], int]:
    """Host list of document boundaries, validated once per forward (all layers share the same tensor).
    ``T`` is the whole row; with sequence parallel ``position_ids`` is the local shard starting at token ``start``,
    or with ``ring`` = (C, U, ring_rank, ulysses_rank), C > 1, the chunks of the ring split."""
    global _validated
    if cu_tensor is not None:
        ref, cached = _validated
        if ref is not None and ref() is cu_tensor and cached[-1] == T:
            cu = cached
        else:
            with _real_metadata(cu_tensor, position_ids):
                cu = check_cu_seqlens(cu_tensor, T)
                if position_ids is not None:
                    if ring is not None and ring[0] > 1:
                        start = split_positions(cu, *ring)  # the global positions of this rank's tokens
                    _check_positions(position_ids, cu, start)
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


def _real_metadata(*tensors):
    """Inside ``FakeTensorMode`` (``seqpack plan --check-fake``) with real metadata tensors: check them as real
    tensors (their values exist); otherwise nothing changes."""
    from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

    real = all(t is None or not is_fake(t) for t in tensors)
    return unset_fake_temporarily() if real else contextlib.nullcontext()


def _check_positions(position_ids: torch.Tensor, cu: list[int], start=0) -> None:
    pos = position_ids.reshape(-1)
    row = positions_from_cu_seqlens(cu, device=pos.device)
    index = start.to(pos.device) if isinstance(start, torch.Tensor) else torch.arange(start, start + pos.numel(),
                                                                                       device=pos.device)
    if pos.shape != index.shape or int(index[-1]) >= row.numel():
        raise ValueError(f"position_ids has {pos.numel()} entries but cu_seqlens describes {cu[-1]} tokens")
    expected = row[index]
    if not torch.equal(pos, expected):
        bad = int((pos != expected).nonzero()[0])
        raise ValueError(f"position_ids inconsistent with cu_seqlens at token {int(index[bad])}: got {int(pos[bad])}, "
                         f"expected {int(expected[bad])} (positions restart at 0 at every cu_seqlens boundary)")


def register() -> None:
    """Make ``attn_implementation="seqpack"`` available to every transformers model (done on import)."""
    AttentionInterface.register(NAME, seqpack_attention_forward)
    AttentionMaskInterface.register(NAME, seqpack_mask)


def dispatch(model, backend: str = "auto", sp_group=None, ring_group=None, tiled_attention: bool = False):
    """Switch an existing model (e.g. from ``from_pretrained``) to seqpack attention, in place; returns it.
    A multimodal model (LLaVA) switches only its language model; its vision encoder keeps a bidirectional
    implementation (:mod:`seqpack.attention.multimodal`).
    Mamba / Mamba-2 have no attention: their mixers are adapted instead (:func:`seqpack.ssm.adapt_ssm`).
    Before it returns, the packing probe (:mod:`seqpack.attention.probe`) checks on two tiny packed documents that
    they stay apart; ValueError naming the model otherwise (its attention is restored).
    2D sequence parallel: ``sp_group`` is the Ulysses (head) group and ``ring_group`` the ring (context) group,
    as ``ParallelDims`` gives them (``topo.ulysses_group``, ``topo.ring_group``); a LLaVA then keeps each rank's
    chunks of the ring split of its merged embeddings.
    ``tiled_attention``: the attention backward runs one key/value head group at a time, recomputing that group's
    forward (:mod:`seqpack.attention.tiled`: the kernel's backward buffers shrink by the number of KV heads);
    ring attention has its own blockwise backward and ignores it.

        >>> model = seqpack.dispatch(AutoModelForCausalLM.from_config(cfg))  # doctest: +SKIP
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from ..ssm import adapt_ssm, is_ssm
    from .probe import check_packing

    ring = group_size(ring_group) > 1
    if is_ssm(model):  # Mamba / Mamba-2: no attention; the mixers restart at every document instead
        if ring:
            raise ValueError("ring attention (ring_group) does not apply to Mamba models: they have no attention")
        adapt_ssm(model, sp_group=sp_group)
        check_packing(model, NAME)
        return model
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel; seqpack.dispatch needs one")
    if group_size(sp_group) > 1:  # fail before training when the heads cannot be split over sp_group
        check_model_heads(model.config, group_size(sp_group))
    previous = attn_implementations(model.config)
    model.set_attn_implementation(attn_implementation_for(model.config, NAME))
    _install(model, AttentionOptions(backend="sdpa"))  # the probe: this process alone, the exact any-dtype kernel
    try:
        check_packing(model, NAME)
    except ValueError:
        model.set_attn_implementation(previous)
        raise
    _install(model, AttentionOptions(backend=backend, sp_group=sp_group if group_size(sp_group) > 1 else None,
                                     ring_group=ring_group if ring else None, tiled=bool(tiled_attention)))
    return model


def _install(model, opts: AttentionOptions) -> None:
    for m in model.modules():
        m.seqpack_options = opts
    if is_multimodal(model):  # encoders never see packed metadata; with SP the split follows the image merge
        prepare_multimodal(model, opts.sp_group, opts.ring_group)

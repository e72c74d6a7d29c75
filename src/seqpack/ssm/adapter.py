"""Packed rows for transformers' Mamba and Mamba-2, applied from outside, and the guard for unadapted ones.

transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` accept ``cu_seq_lens_q`` / ``position_ids`` in
``**kwargs`` and drop them: on a packed row the convolution and the recurrent state would run straight across
document boundaries. seqpack therefore never lets such a row run unadapted.

``adapt_ssm(model)`` (called by ``seqpack.dispatch``), on this model instance only:
1. a forward pre-hook on the model reads the packed metadata (``Segments``) of the call and keeps it, for the
   length of the call, in a ``PackedContext`` shared with the model's mixers (post-hook clears it);
2. every mixer's ``forward`` is replaced, on the instance, by :func:`packed_mixer_forward`: documents as padded
   rows through the mixer's own unmodified computation (Mamba-1 without CUDA kernels: the same computation in
   ``mamba1.py``, with a backward linear in the length), or on CUDA for Mamba-2 the fused kernel with ``seq_idx``;
   without packed metadata it calls the original forward (generation, padded batches: unchanged);
3. activation checkpointing: each block's checkpoint function is wrapped so the recomputation in backward sees the
   documents of *its* forward, whenever checkpointing was enabled and however micro-batches interleave.

The guard (``install_guard``): the same pre-hook without adaptation raises on a row of several documents. Where
it lives: transformers' classes swallow the metadata in ``**kwargs``, so neither ``PackedBatch.model_inputs()``
nor the batch can see which model receives it, and there is no per-class hook in torch short of patching the
classes. So seqpack registers, through transformers' public ``AutoModelForCausalLM.register`` (as it does for its
native families), a subclass of each Mamba class — same name, same weights and config — whose ``__init__``
installs the adapter when built with ``attn_implementation="seqpack"`` and the guard otherwise. A model built from
transformers' own class directly (``MambaForCausalLM(config)`` or ``.from_pretrained``) has neither; for it the
class's ``forward`` gains one check (``_guard_direct_instances``) that refuses a packed row and changes nothing
else. After ``import seqpack`` no Mamba / Mamba-2 causal LM runs a packed row of several documents unadapted.
"""

from __future__ import annotations

import functools
import types

import torch

from ..parallel.comm import group_size
from .config import SP_REFUSAL, is_ssm
from .kernels import fused_mamba2_kernel, mamba1_uses_kernels, mamba2_packed_fused
from .mamba1 import mamba1_rows_forward
from .segments import Segments, segments_from_inputs


class PackedContext:
    """Documents of the forward in flight, shared by one model's hooks and mixers (never global)."""

    def __init__(self, blocks: list[torch.nn.Module]):
        self.current: Segments | None = None
        self.adapted = False
        self.blocks = blocks


def _mixers(model) -> list[torch.nn.Module]:
    from transformers.models.mamba.modeling_mamba import MambaMixer
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    return [m for m in model.modules() if isinstance(m, (MambaMixer, Mamba2Mixer))]


def _context(model) -> PackedContext:
    """The model's PackedContext, creating it and its two hooks on first use."""
    ctx = model.__dict__.get("seqpack_ssm")
    if ctx is None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        ctx = PackedContext([m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)])
        model.seqpack_ssm = ctx
        model.register_forward_pre_hook(_enter, with_kwargs=True)
        model.register_forward_hook(_leave, always_call=True)
    return ctx


def adapt_ssm(model, sp_group=None):
    """Make ``model`` (Mamba / Mamba-2) run packed rows exactly, in place; returns it. Refuses sequence parallel."""
    if not is_ssm(model):
        raise TypeError(f"{type(model).__name__} is not a Mamba / Mamba-2 model")
    if group_size(sp_group) > 1:
        raise ValueError(SP_REFUSAL.format(name=type(model).__name__))
    ctx = _context(model)
    for mixer in _mixers(model):
        mixer.seqpack_ssm = ctx
        mixer.forward = types.MethodType(packed_mixer_forward, mixer)
    ctx.adapted = True
    return model


def install_guard(model):
    """Make a packed row of several documents given to the unadapted ``model`` raise instead of mixing them."""
    _context(model)
    return model


def _call_segments(args, kwargs) -> Segments | None:
    """The documents of a forward call's packed row (None: not packed)."""
    x = kwargs.get("input_ids", args[0] if args else None)
    x = x if x is not None else kwargs.get("inputs_embeds")
    return None if x is None else segments_from_inputs(kwargs, x.shape[1], x.shape[0])


def _not_adapted(model, segs: Segments) -> ValueError:
    return ValueError(
        f"{type(model).__name__} got a packed row of {segs.num_docs} documents, but this model is not adapted "
        "for packing: its causal convolution and recurrent state would run across document boundaries. Call "
        "seqpack.dispatch(model) first (or build it with attn_implementation='seqpack')")


def _enter(model, args, kwargs):
    ctx = model.seqpack_ssm
    segs = _call_segments(args, kwargs)
    ctx.current = None
    if segs is None:
        return None
    if not ctx.adapted:
        raise _not_adapted(model, segs)
    if kwargs.get("cache") is not None or kwargs.get("cache_params") is not None:
        raise ValueError("a packed row cannot continue from a cache: one recurrent state cannot hold several "
                         "documents; pass cache=None")
    ctx.current = segs
    for block in ctx.blocks:  # checkpointing may have been enabled (again) since the last call
        fn = block.__dict__.get("_gradient_checkpointing_func")
        if fn is not None and not getattr(fn, "seqpack_bound", False):
            block._gradient_checkpointing_func = _bind_documents(fn, ctx)
    return args, {**kwargs, "use_cache": False}  # no cache of a packed row (it would mix the documents' states)


def _leave(model, args, output):
    model.seqpack_ssm.current = None


def _bind_documents(checkpoint_fn, ctx: PackedContext):
    """Wrap a block's checkpoint function: the function it checkpoints (run in forward and again in backward)
    runs with the documents that were current when the block's forward was called."""

    @functools.wraps(checkpoint_fn)
    def checkpoint_with_documents(function, *args, **kwargs):
        segs = ctx.current

        def run(*a, **k):
            outer, ctx.current = ctx.current, segs
            try:
                return function(*a, **k)
            finally:
                ctx.current = outer

        return checkpoint_fn(run, *args, **kwargs)

    checkpoint_with_documents.seqpack_bound = True
    return checkpoint_with_documents


def packed_mixer_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Instance ``forward`` of an adapted mixer. hidden_states [1, T, H] -> [1, T, H] with every document's
    convolution and scan starting from zero state; without packed metadata: the original forward."""
    original = type(self).forward
    segs = self.seqpack_ssm.current
    if segs is None:
        return original(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    if cache is not None or attention_mask is not None:
        raise ValueError("a packed row takes neither a cache nor an attention_mask (documents are separated by "
                         "cu_seqlens); pass neither")
    if tuple(hidden_states.shape[:2]) != (1, segs.num_tokens):
        raise ValueError(f"mixer input of shape {tuple(hidden_states.shape)} does not match the packed row of "
                         f"{segs.num_tokens} tokens given to the model")
    if hasattr(self, "dt_bias"):  # Mamba-2: the fused kernel takes seq_idx; else its own forward on rows
        kernel = fused_mamba2_kernel(hidden_states)
        if kernel is not None:
            return mamba2_packed_fused(self, hidden_states, segs.seq_idx, kernel)
        return segs.per_document(hidden_states, lambda rows: original(self, rows, **kwargs))
    if mamba1_uses_kernels(hidden_states):  # Mamba-1 with mamba_ssm on CUDA: its kernels, one document per row
        return segs.per_document(hidden_states, lambda rows: original(self, rows, **kwargs))
    return segs.per_document(hidden_states, lambda rows: mamba1_rows_forward(self, rows))  # linear-time torch


_GUARDED: dict = {}


def _guarded_class(cls):
    """A subclass of transformers' ``cls`` (same name) that adapts or guards every instance it builds."""
    if cls not in _GUARDED:
        def __init__(self, config, *args, **kwargs):
            cls.__init__(self, config, *args, **kwargs)
            if getattr(self.config, "_attn_implementation", None) == "seqpack":
                adapt_ssm(self)
            else:
                install_guard(self)

        _GUARDED[cls] = type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": cls.__doc__,
                                                     "__module__": __name__})
    return _GUARDED[cls]


def _guard_direct_instances(cls) -> None:
    """transformers' own ``cls`` built directly (``MambaForCausalLM(config)``, ``MambaForCausalLM.from_pretrained``)
    refuses a packed row of several documents too: its ``forward`` gains that one check, for instances that have
    neither the adapter nor the guard (those check in their pre-hook). Results are never changed (idempotent)."""
    if getattr(cls.forward, "seqpack_guard", False):
        return
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if self.__dict__.get("seqpack_ssm") is None:
            segs = _call_segments(args, kwargs)
            if segs is not None:
                raise _not_adapted(self, segs)
        return original(self, *args, **kwargs)

    forward.seqpack_guard = True
    cls.forward = forward


def register_ssm_models() -> None:
    """Register the adapting/guarding Mamba and Mamba-2 classes with AutoModelForCausalLM, and guard instances of
    transformers' own classes built directly (idempotent)."""
    from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    for config_cls, cls in ((MambaConfig, MambaForCausalLM), (Mamba2Config, Mamba2ForCausalLM)):
        AutoModelForCausalLM.register(config_cls, _guarded_class(cls), exist_ok=True)
        _guard_direct_instances(cls)

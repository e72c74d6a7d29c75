"""Vision-language models (LLaVA-1.5): seqpack attention for the language model only, and the sequence split
after the image features are merged.

Shape legend: T tokens of the whole (padded) packed row, S SP degree, H text hidden size, I images.

A LLaVA is a bidirectional vision encoder (CLIP), a projector and a causal language model (Llama). Only the
language model sees packed rows: the vision encoder runs on a batch of images ``[I, C, H_img, W_img]`` that is
never packed. So:

- :func:`attn_implementation_for` gives transformers' per-sub-config form, e.g.
  ``{"text_config": "seqpack", "vision_config": "sdpa"}``: the text config gets seqpack; every other sub-config
  keeps its own implementation (``sdpa`` if it was ``seqpack``). ``seqpack.dispatch`` and
  ``seqpack.load_model`` use it.
- A model loaded with the plain string ``attn_implementation="seqpack"`` hands seqpack the vision encoder's
  bidirectional attention as well; :func:`bidirectional_attention` runs it with transformers' SDPA (a vision
  encoder's inputs are never packed), and refuses bidirectional attention anywhere else.
- Sequence parallel (:func:`prepare_multimodal` with an SP group): every rank of the SP group gets the WHOLE
  padded row (ids, pixel values, positions, global ``cu_seqlens``), computes the image features of all its
  images once and merges them into the embeddings; a forward pre-hook on the language model then keeps this
  rank's ``T/S`` tokens of ``inputs_embeds`` and ``position_ids`` (``[1, T, H] -> [1, T/S, H]``) — its
  contiguous slice with Ulysses alone, its chunks of the balanced ring split with 2D sequence parallel (the split
  :func:`seqpack.parallel.shard_batch` makes of the labels) — and seqpack's Ulysses / ring attention runs over the
  global ``cu_seqlens``. The cut's backward puts zeros elsewhere, so with gradients summed over ranks the vision
  tower and projector get exactly the one-process gradient.
"""

from __future__ import annotations

import torch

TEXT_ATTENTION = "seqpack"
VISION_ATTENTION = "sdpa"  # what a vision encoder falls back to when it was set to seqpack
PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def text_config_key(config) -> str | None:
    """The sub-config key holding the causal language model's config (``"text_config"`` for LLaVA), or None for a
    text-only model."""
    text = config.get_text_config()
    if text is config:
        return None
    for key in getattr(config, "sub_configs", {}):
        if getattr(config, key, None) is text:
            return key
    return None


def is_multimodal(model_or_config) -> bool:
    """True for a model (or config) whose language model is a sub-config next to other encoders (LLaVA)."""
    config = getattr(model_or_config, "config", model_or_config)
    return text_config_key(config) is not None


def attn_implementation_for(config, text: str = TEXT_ATTENTION) -> str | dict:
    """``text`` for a text-only config; for a multimodal one transformers' per-sub-config dict: ``text`` for the
    language model, every other sub-config its current implementation (``sdpa`` when that is seqpack).

        >>> attn_implementation_for(llava_config)                      # doctest: +SKIP
        {'text_config': 'seqpack', 'vision_config': 'sdpa'}
    """
    key = text_config_key(config)
    if key is None:
        return text
    out = {}
    for sub in config.sub_configs:
        sub_config = getattr(config, sub, None)
        if sub_config is None:
            continue
        current = sub_config._attn_implementation
        out[sub] = text if sub == key else (current if current not in (None, TEXT_ATTENTION) else VISION_ATTENTION)
    return out


def attn_implementations(config) -> dict:
    """Snapshot of the implementation of the config and of each sub-config, in the dict form
    ``set_attn_implementation`` and the config setter accept (to restore it after a temporary change)."""
    snap = {"": config._attn_implementation}
    for sub in getattr(config, "sub_configs", {}):
        if getattr(config, sub, None) is not None:
            snap[sub] = getattr(config, sub)._attn_implementation
    return snap


def is_vision_config(config) -> bool:
    model_type = getattr(config, "model_type", "") or ""
    return "vision" in model_type or type(config).__name__.endswith("VisionConfig")


def bidirectional_attention(module, query, key, value, attention_mask, **kwargs):
    """seqpack was asked for non-causal attention (``attn_implementation="seqpack"`` given to a whole LLaVA):
    a vision encoder's attention runs with transformers' SDPA (its image batch is never packed; the text row's
    packed metadata that transformers forwards to it is dropped); anything else is refused."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = getattr(module, "config", None)
    if not is_vision_config(config):
        raise ValueError(
            f"attn_implementation='seqpack' is causal-only, but {type(module).__name__} "
            f"({getattr(config, 'model_type', '?')}) asks for bidirectional attention; give that sub-model its own "
            "implementation, e.g. attn_implementation={'text_config': 'seqpack', 'vision_config': 'sdpa'}")
    for k in PACKED_KWARGS:
        kwargs.pop(k, None)
    kwargs.pop("is_causal", None)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, is_causal=False, **kwargs)


def language_model(model) -> torch.nn.Module:
    """The causal language model inside a multimodal model (LLaVA: ``model.model.language_model``)."""
    text = model.config.get_text_config()
    from transformers import PreTrainedModel

    for m in model.modules():
        if m is not model and isinstance(m, PreTrainedModel) and m.config is text:
            return m
    raise ValueError(f"{type(model).__name__}: no sub-model carries the text config; cannot find the language model")


def encoder_models(model) -> list[torch.nn.Module]:
    """The non-text sub-models (LLaVA: the vision tower)."""
    from transformers import PreTrainedModel

    text = model.config.get_text_config()
    return [m for m in model.modules()
            if m is not model and isinstance(m, PreTrainedModel) and m.config is not text
            and m.config is not model.config]


def prepare_multimodal(model, sp_group=None, ring_group=None) -> None:
    """Hooks of a multimodal model (called by ``seqpack.dispatch``; calling it again replaces them):
    the encoders never receive the text row's packed metadata, and with an SP group of S > 1 ranks (``sp_group``
    the Ulysses ranks, ``ring_group`` the ring ranks of 2D sequence parallel) the language model keeps this
    rank's ``T/S`` tokens of the merged embeddings (see the module docstring)."""
    from ..parallel.comm import group_rank, group_size
    from ..parallel.ring_split import SplitPlan

    for m in [language_model(model), *encoder_models(model)]:
        for handle in getattr(m, "_seqpack_hooks", ()):
            handle.remove()
        m._seqpack_hooks = []
    for enc in encoder_models(model):
        enc._seqpack_hooks.append(enc.register_forward_pre_hook(_drop_packed_kwargs, with_kwargs=True))
    plan = SplitPlan(ring=group_size(ring_group), ulysses=group_size(sp_group))
    if plan.size > 1:
        lm = language_model(model)
        sp_rank = group_rank(ring_group) * plan.ulysses + group_rank(sp_group)  # ParallelDims.sp_rank
        lm._seqpack_hooks.append(lm.register_forward_pre_hook(_SequenceSplit(plan, sp_rank), with_kwargs=True))


def _drop_packed_kwargs(module, args, kwargs):
    return args, {k: v for k, v in kwargs.items() if k not in PACKED_KWARGS}


class _SequenceSplit:
    """Forward pre-hook of the language model: whole row -> this rank's tokens, after the image merge; the same
    split as :func:`seqpack.parallel.shard_batch` (``SplitPlan.cut``: contiguous, or the ring's chunks)."""

    def __init__(self, plan, sp_rank: int):
        self.plan, self.sp_rank = plan, sp_rank

    def __call__(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or args:
            raise ValueError("sequence parallel LLaVA: the language model must be called with inputs_embeds as a "
                             "keyword (as LlavaModel does); call the whole model with the whole packed row")
        T = embeds.shape[1]
        cu = kwargs.get("cu_seq_lens_q")
        if embeds.shape[0] != 1 or cu is None or kwargs.get("position_ids") is None or int(cu[-1]) != T \
                or T % self.plan.multiple:
            raise ValueError(
                f"sequence parallel LLaVA gets the WHOLE packed row on every rank of the SP group (its image "
                f"features are merged before the split): inputs_embeds {tuple(embeds.shape)} must be [1, T] with T "
                f"= cu_seq_lens_q[-1] and a multiple of {self.plan.multiple} (sp={self.plan.size}"
                + (f", ring={self.plan.ring}" if self.plan.ring > 1 else "") + "), with position_ids; pass "
                "seqpack.parallel.shard_batch(row, sp_size, sp_rank, ring_size=...).model_inputs()")
        cut = self.plan.cut(cu.tolist(), self.sp_rank, embeds.device)
        kwargs["inputs_embeds"] = embeds[:, cut]  # [1, T, H] -> [1, T/S, H]
        kwargs["position_ids"] = kwargs["position_ids"][..., cut]  # [1, T/S]
        return args, kwargs

"""Registration of the native families with transformers' Auto classes, and ``load_model``.

After :func:`register_models` (called on ``import seqpack``), an official checkpoint folder of InternLM,
InternLM2 or Baichuan2 — its ``config.json`` with ``model_type`` and ``auto_map`` pointing at remote code —
loads with ``AutoModelForCausalLM.from_pretrained(path)`` into seqpack's native classes, without
``trust_remote_code`` (transformers prefers a registered local class over the ``auto_map``).
"""

from __future__ import annotations

import json
import os

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

from .baichuan import BaichuanConfig, BaichuanForCausalLM, BaichuanModel
from .internlm import InternLMConfig, InternLMForCausalLM, InternLMModel
from .internlm2 import InternLM2Config, InternLM2ForCausalLM, InternLM2Model

FAMILIES = {
    "internlm": (InternLMConfig, InternLMModel, InternLMForCausalLM),
    "internlm2": (InternLM2Config, InternLM2Model, InternLM2ForCausalLM),
    "baichuan": (BaichuanConfig, BaichuanModel, BaichuanForCausalLM),
}


def register_models() -> None:
    """Register the native configs/models with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    for model_type, (config_cls, model_cls, lm_cls) in FAMILIES.items():
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)


def load_model(path: str | os.PathLike, attn_implementation: str = "seqpack", **kwargs):
    """Load a causal LM from a local checkpoint folder (native family or any transformers model; a vision-language
    model such as LLaVA through ``AutoModelForImageTextToText``, seqpack on its language model only) with seqpack
    attention by default, checking that every weight in the folder has the shape its config implies.

        >>> model = seqpack.models.load_model("ckpt/internlm2-7b", dtype=torch.bfloat16)  # doctest: +SKIP

    Raises ValueError naming the tensor, its shape in the checkpoint and the shape the config implies (instead of
    transformers' silent re-initialisation), and naming config.json when it is missing or unreadable.
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{config_file} not found: load_model needs a checkpoint folder with config.json")
    try:
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file} is not readable JSON: {err}") from err
    register_models()
    auto = AutoModelForCausalLM
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        from transformers import AutoModelForImageTextToText

        from ..attention.multimodal import attn_implementation_for

        auto = AutoModelForImageTextToText  # LLaVA: seqpack for the language model, the vision tower stays SDPA
        config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
        attn_implementation = attn_implementation_for(config, attn_implementation)
    # transformers re-initialises mismatched tensors (or raises a RuntimeError naming none): collect them instead
    model, info = auto.from_pretrained(path, attn_implementation=attn_implementation, output_loading_info=True,
                                       ignore_mismatched_sizes=True, **kwargs)
    mismatched = sorted(info.get("mismatched_keys") or [])  # (name, checkpoint shape, model shape)
    if mismatched:
        lines = "; ".join(f"{k}: checkpoint {tuple(a)} vs config {tuple(b)}" for k, a, b in mismatched)
        raise ValueError(f"{path}: weights do not match the shapes implied by {config_file} (model_type "
                         f"{model_type!r}): {lines}. Fix config.json or the weights")
    missing = [k for k in info.get("missing_keys") or [] if "rotary_emb" not in k]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} weight(s) the config needs, e.g. "
                         f"{', '.join(sorted(missing)[:5])}; check model_type {model_type!r} in {config_file}")
    return model


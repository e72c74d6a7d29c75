"""Fused CUDA kernels from Liger (``pip install seqpack[cuda]``): RMSNorm, SwiGLU / GeGLU, RoPE and fused linear
cross-entropy, switched on per model instance from outside — the modeling code and other models of the same
family in the process are untouched.

Shape legend: T tokens, H hidden size, N query heads, D head dim, V vocabulary.

- RMSNorm and MLP: Liger's module ``forward`` (``LigerRMSNorm``, ``LigerSwiGLUMLP``, ``LigerPhi3SwiGLUMLP``,
  ``LigerGEGLUMLP``) bound to this model's instances, with the family's offset / casting mode (as Liger's own
  ``apply_liger_kernel_to_<family>(model=...)`` sets them). Parameter names are unchanged.
- RoPE: the family's ``apply_rotary_pos_emb`` is wrapped once so that it calls ``liger_rotary_pos_emb`` only while
  an attention module of a fused model is running (a ContextVar set by hooks on those modules). Packed rows work
  as they are: cos/sin [1, T, D] come from the model's rotary embedding of the restarting ``position_ids``.
- Loss: ``liger_fused_linear_cross_entropy(reduction="sum", softcap=...)`` in place of seqpack's chunked loss (see
  :mod:`seqpack.ops.chunked_loss`), for heads without a multiplicative logit scale.

    >>> kernels = apply_fused_kernels(model, "auto", torch.device("cuda"))   # doctest: +SKIP
    >>> kernels.swapped                                                     # doctest: +SKIP
    {'rms_norm': 5, 'mlp': 2, 'rope': 2}
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.util
from dataclasses import dataclass, field

import torch

from .chunked_loss import logit_postprocess
from .layers import decoder_layers

# model_type -> (RMSNorm offset, casting mode, in_place, MLP kind). As Liger's apply_liger_kernel_to_<family>.
FAMILIES = {
    "llama": (0.0, "llama", True, "swiglu"),
    "mistral": (0.0, "llama", True, "swiglu"),
    "mixtral": (0.0, "llama", True, None),  # experts keep their own MLPs
    "qwen2": (0.0, "llama", True, "swiglu"),
    "qwen3": (0.0, "llama", True, "swiglu"),
    "phi3": (0.0, "llama", True, "phi3_swiglu"),
    "gemma": (1.0, "gemma", False, "geglu"),
    "gemma2": (1.0, "gemma", False, "geglu"),
    "gemma3_text": (1.0, "gemma", False, "geglu"),
}
MLP_MODULES = {"swiglu": ("liger_kernel.transformers.swiglu", "LigerSwiGLUMLP"),
               "phi3_swiglu": ("liger_kernel.transformers.swiglu", "LigerPhi3SwiGLUMLP"),
               "geglu": ("liger_kernel.transformers.geglu", "LigerGEGLUMLP")}
MLP_ACTIVATION = {"swiglu": ("silu", "swish"), "phi3_swiglu": ("silu", "swish"), "geglu": ("gelu_pytorch_tanh",)}

_FUSED_ROPE = contextvars.ContextVar("seqpack_fused_rope", default=False)


@dataclass
class FusedKernels:
    """What :func:`apply_fused_kernels` switched on one model."""

    family: str
    swapped: dict = field(default_factory=dict)  # kernel -> number of modules
    linear_cross_entropy: object = None  # (hidden [N, H], weight [V, H], labels [N], bias) -> summed CE, or None

    def describe(self) -> str:
        parts = [f"{k} x{n}" for k, n in self.swapped.items()]
        if self.linear_cross_entropy is not None:
            parts.append("fused linear cross-entropy")
        return f"Liger kernels for {self.family}: " + ", ".join(parts)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def apply_fused_kernels(model: torch.nn.Module, setting, device: torch.device) -> FusedKernels | None:
    """Swap Liger kernels into ``model`` per ``setting`` (``model.fused_kernels``): "auto" = when ``device`` is CUDA,
    liger-kernel is installed and the family is supported; True = the same, but a ValueError says which condition
    fails; False = nothing. Returns what was done, or None."""
    if setting not in (True, False, "auto"):
        raise ValueError(f"model.fused_kernels={setting!r} is not supported: choose 'auto', True or False")
    if setting is False:
        return None
    family = getattr(model.config, "model_type", None)
    problem = None
    if device.type != "cuda":
        problem = f"it needs a CUDA device (this run is on {device.type}); Liger's kernels are Triton GPU kernels"
    elif not liger_available():
        problem = "it needs the liger-kernel package: pip install 'seqpack[cuda]'"
    elif family not in FAMILIES:
        problem = f"Liger kernels are wired for {', '.join(sorted(FAMILIES))}, not {family!r}"
    if problem:
        if setting is True:
            raise ValueError(f"model.fused_kernels=True: {problem}; or set model.fused_kernels='auto' or False")
        return None
    return _swap(model, family)


def _swap(model, family: str) -> FusedKernels:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    offset, casting, in_place, mlp_kind = FAMILIES[family]
    done = FusedKernels(family)
    norms = [m for m in model.modules()
             if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None]
    for norm in norms:  # the attributes LigerRMSNorm.forward reads, then its forward on this instance
        norm.variance_epsilon = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
        norm.offset, norm.casting_mode, norm.in_place, norm.row_mode = offset, casting, in_place, None
        norm.forward = LigerRMSNorm.forward.__get__(norm)
    done.swapped["rms_norm"] = len(norms)

    act = getattr(model.config, "hidden_act", None) or getattr(model.config, "hidden_activation", None)
    if mlp_kind is not None and act in MLP_ACTIVATION[mlp_kind]:
        module_name, cls_name = MLP_MODULES[mlp_kind]
        liger_mlp = getattr(importlib.import_module(module_name), cls_name)
        mlps = [layer.mlp for layer in decoder_layers(model)]
        for mlp in mlps:
            mlp.forward = liger_mlp.forward.__get__(mlp)
        done.swapped["mlp"] = len(mlps)

    attention = [layer.self_attn for layer in decoder_layers(model) if hasattr(layer, "self_attn")]
    modeling = importlib.import_module(type(model).__module__)
    if attention and _wrap_rope(modeling):
        for module in attention:
            module.register_forward_pre_hook(_rope_on)
            module.register_forward_hook(_rope_off)
        done.swapped["rope"] = len(attention)

    post = logit_postprocess(model.config)
    if post is not None and post.scale is None and post.divisor is None:
        done.linear_cross_entropy = _liger_linear_cross_entropy(post.softcap)
    return done


def _wrap_rope(modeling) -> bool:
    """Wrap ``modeling.apply_rotary_pos_emb`` once: Liger's RoPE while a fused model's attention runs, else the
    original function. False when the modeling file has no such function."""
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None:
        return False
    if getattr(original, "_seqpack_original", None) is not None:
        return True

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):  # q [1, N, T, D], cos/sin [1, T, D]
        if _FUSED_ROPE.get():
            from liger_kernel.transformers import rope

            return rope.liger_rotary_pos_emb(q, k, cos, sin, *args, **kwargs)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._seqpack_original = original
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def _rope_on(module, args):
    module._seqpack_rope_token = _FUSED_ROPE.set(True)


def _rope_off(module, args, output):
    token = getattr(module, "_seqpack_rope_token", None)
    if token is not None:
        _FUSED_ROPE.reset(token)
        module._seqpack_rope_token = None


def _liger_linear_cross_entropy(softcap):
    def linear_cross_entropy(hidden, weight, labels, bias=None):
        from liger_kernel.transformers import functional

        return functional.liger_fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index=-100,
                                                           reduction="sum", softcap=softcap)

    return linear_cross_entropy

"""Build the model of a run: from a local Hugging Face folder or from a config, then parallelise it from outside.

Order (torchtitan's): seqpack attention (with the SP group) -> fused kernels (Liger, CUDA) -> tiled MLP -> chunked
loss -> activation checkpointing -> FSDP2 over all ranks. The model is built directly on the run's device (no fp32
copy on the CPU first). Weights stay fp32 (master weights); on CUDA the forward runs under bf16 autocast
(``model.dtype``).

    >>> cfg = load_config(None, ["--model.hidden_size", "32", "--model.num_layers", "2"])   # doctest: +SKIP
    >>> model = build_model(cfg, vocab_size=300)                                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

import seqpack

from ..ops import apply_fused_kernels, apply_tiled_mlp, enable_chunked_loss
from ..ops.layers import decoder_layers
from ..parallel import apply_fsdp, check_model_heads
from ..ssm.config import SSM_MODEL_TYPES, is_ssm, ssm_hf_config
from .config import Config
from .config_rules import from_hf, transformers_model_type


def hf_config(cfg: Config, vocab_size: int):
    """transformers config of a from-scratch model from the ``model`` section."""
    from transformers import AutoConfig

    m = cfg.model
    if transformers_model_type(cfg) in SSM_MODEL_TYPES:  # Mamba / Mamba-2: no attention or MLP sizes
        return ssm_hf_config(transformers_model_type(cfg), m, m.vocab_size or vocab_size, m.tie_embeddings)
    inter = m.multiple_of * math.ceil(m.mlp_ratio * m.hidden_size / m.multiple_of)
    if m.hidden_size % m.num_attention_heads:
        raise ValueError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
                         f"{m.num_attention_heads}")
    return AutoConfig.for_model(
        transformers_model_type(cfg), vocab_size=m.vocab_size or vocab_size, hidden_size=m.hidden_size,
        intermediate_size=inter, num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_kv_attention_heads or m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings or max(4096, cfg.data.seq_len * cfg.data.micro_bsz),
        rms_norm_eps=m.layer_norm_epsilon, rope_theta=m.rope_base, tie_word_embeddings=m.tie_embeddings,
        attention_dropout=m.attention_dropout,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def model_source(cfg: Config) -> str | None:
    """The local HF folder the weights come from, or None for a from-scratch model."""
    info = cfg.ckpt.load_ckpt_info
    return info.path.removeprefix("local:") if info is not None else None


def build_model(cfg: Config, vocab_size: int, topo=None) -> torch.nn.Module:
    """The model of ``cfg`` in fp32 on ``topo.device`` (CPU without topology), seqpack attention, fused kernels,
    tiled MLP, chunked loss, activation checkpointing and FSDP2 applied. Every rank initialises identically (seed
    ``train.seed``)."""
    from transformers import AutoModelForCausalLM

    path = model_source(cfg)
    torch.manual_seed(cfg.train.seed)
    device = topo.device if topo is not None else torch.device("cpu")
    if path is not None:
        from ..models import load_model  # native InternLM/InternLM2/Baichuan2 or any transformers model, shapes checked

        model = load_model(path, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code,
                           **({"device_map": device} if device.type != "cpu" else {}))  # weights straight to device
        arch = ("hidden_size", "num_layers", "num_attention_heads", "num_kv_attention_heads", "mlp_ratio",
                "vocab_size", "max_position_embeddings", "rope_base", "tie_embeddings", "attention_dropout")
        given = [f"model.{k}" for k in arch if getattr(cfg.model, k) != getattr(type(cfg.model)(), k)]
        if given:
            warnings.warn(f"{', '.join(given)} ignored: the architecture comes from {path}/config.json",
                          stacklevel=2)
        if not from_hf(cfg) and model.config.model_type != transformers_model_type(cfg):
            warnings.warn(f"model_type={cfg.model_type!r} but {path} holds a {model.config.model_type!r} model; "
                          "the folder's architecture is used", stacklevel=2)
    else:
        with device:  # parameters are created and initialised on the device
            model = AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size), dtype=torch.float32)
    model_vocab = model.config.get_text_config().vocab_size  # LLaVA: its language model's
    if model_vocab < vocab_size:
        raise ValueError(f"the model's vocab_size={model_vocab} is smaller than the tokenizer's "
                         f"{vocab_size}; set model.vocab_size >= {vocab_size} or use the model's own tokenizer")
    model.train()
    if topo is not None and topo.sp_size > 1 and not is_ssm(model):  # an SSM: dispatch below refuses sp > 1
        # an impossible head layout fails before training (2D: the heads are split over the Ulysses ranks only)
        check_model_heads(model.config, getattr(topo, "ulysses_size", topo.sp_size))
    # 1) attention: packed varlen, Ulysses over topo.ulysses_group x ring attention over topo.ring_group (Mamba:
    #    mixers reset per document)
    groups = topo.attention_groups() if hasattr(topo, "attention_groups") else \
        dict(sp_group=getattr(topo, "sp_group", None))
    seqpack.dispatch(model, backend=cfg.model.attn_backend, **groups)
    # 2) fused kernels (Liger on CUDA): RMSNorm, SwiGLU/GeGLU, RoPE forwards swapped on the instances
    fused = apply_fused_kernels(model, cfg.model.fused_kernels, device)
    say = (lambda text: print(f"seqpack train: {text}", flush=True)) if getattr(topo, "rank", 0) == 0 else \
        (lambda text: None)
    if fused is not None:
        say(fused.describe())
    # 3) tiled MLP: every decoder layer's MLP over sequence tiles
    if cfg.model.tiled_mlp:
        apply_tiled_mlp(model, model.config.hidden_size if cfg.model.tiled_mlp is True else int(cfg.model.tiled_mlp))
    # 4) chunked loss (or Liger's fused linear cross-entropy) inside the forward: no [T, V] logits
    if cfg.loss.chunked:
        enable_chunked_loss(model, cfg.loss.chunk_size, fused=fused.linear_cross_entropy if fused else None,
                            notice=say)
    # 5) activation checkpointing (a fraction of the layers, from the first)
    apply_activation_checkpointing(model, cfg.model.checkpoint)
    # 6) FSDP2 over all ranks (no-op with one process)
    if topo is not None:
        model.to(topo.device)
        apply_fsdp(model, topo)
    return model


def uses_chunked_loss(model) -> bool:
    """Whether ``model(..., chunked_loss_labels=...)`` returns the summed loss (see seqpack.enable_chunked_loss)."""
    return getattr(model, "_seqpack_chunked_loss", None) is not None


def apply_activation_checkpointing(model, checkpoint: bool | float) -> None:
    """Recompute the first ``round(fraction * layers)`` decoder layers in backward (True = all, False = none)."""
    fraction = float(checkpoint)
    if fraction <= 0:
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    keep = round(fraction * len(layers))
    for i, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i < keep


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The bf16/fp16 autocast dtype ``model.dtype`` asks for on CUDA; None (fp32, no autocast) on CPU."""
    dtype = {"torch.bfloat16": torch.bfloat16, "bfloat16": torch.bfloat16, "torch.float16": torch.float16,
             "float16": torch.float16, "torch.half": torch.float16}.get(cfg.model.dtype)
    return dtype if device.type == "cuda" else None


def autocast(cfg: Config, device: torch.device):
    """bf16/fp16 autocast on CUDA as ``model.dtype`` asks; fp32 (no autocast) on CPU."""
    dtype = autocast_dtype(cfg, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def precision(cfg: Config, device: torch.device) -> str:
    """For the startup line: "bfloat16 autocast (fp32 weights)" or "float32"."""
    dtype = autocast_dtype(cfg, device)
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast (fp32 weights)"


def count_params(model) -> tuple[int, int]:
    """(all parameters, parameters excluding the input embedding) — the latter drives the 6·N·tokens FLOP count."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel() if model.get_input_embeddings() is not None else 0
    tied = model.get_output_embeddings() is not None and model.config.tie_word_embeddings
    return total, total - (0 if tied else emb)

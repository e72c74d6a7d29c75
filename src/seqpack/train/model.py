"""Build the model of a run: from a local Hugging Face folder or from a config, then parallelise it from outside.

Order (torchtitan's): seqpack attention (with the SP group) -> fused kernels (Liger, CUDA) -> tiled MLP -> chunked
loss -> activation checkpointing (-> its offload to host memory) -> FSDP2 over all ranks (mixed precision, optimizer
offload). The model is built directly on the run's device (no fp32 copy on the CPU first). Weights stay fp32
(master weights); on CUDA the forward runs in ``model.dtype`` by FSDP2's mixed precision (``model.mixed_precision``).

    >>> cfg = load_config(None, ["--model.hidden_size", "32", "--model.num_layers", "2"])   # doctest: +SKIP
    >>> model = build_model(cfg, vocab_size=300)                                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

import seqpack

from ..ops import apply_fused_kernels, apply_tiled_mlp, enable_chunked_loss, offload_checkpoints
from ..ops.layers import decoder_layers
from ..parallel import apply_fsdp, check_model_heads
from ..parallel.fsdp import move_model
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
    seqpack.dispatch(model, backend=cfg.model.attn_backend, tiled_attention=cfg.model.tiled_attention, **groups)
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
    # 5) activation checkpointing (a fraction of the layers, from the first), their inputs offloaded to the host
    apply_activation_checkpointing(model, cfg.model.checkpoint)
    if cfg.model.offload_checkpoints:
        offload_checkpoints(model)
    # 6) FSDP2 over all ranks (one process: no-op, or a one-rank group for mixed precision / optimizer offload)
    if topo is not None:
        move_model(model, topo.device)
        apply_fsdp(model, topo, mp_policy=mixed_precision_policy(cfg, topo.device),
                   offload_policy=optimizer_offload_policy(cfg, topo.device))
    return model


def compute_mode(cfg: Config, device: torch.device) -> tuple[str | None, torch.dtype]:
    """(how ``model.dtype`` is applied, that dtype): ("fsdp", bf16) = FSDP2 mixed precision, ("autocast", bf16) =
    torch.autocast over fp32 weights, (None, float32) = float32 throughout (CPU by default, or model.dtype fp32)."""
    dtype = DTYPES.get(cfg.model.dtype, torch.float32)
    mode = cfg.model.mixed_precision
    if mode == "auto":
        mode = "fsdp" if device.type == "cuda" else None
    return (None, torch.float32) if dtype == torch.float32 or mode is None else (mode, dtype)


def mixed_precision_policy(cfg: Config, device: torch.device):
    """FSDP2's ``MixedPrecisionPolicy(param_dtype=model.dtype, reduce_dtype=float32)`` when the run computes in
    ``model.dtype`` that way (see :func:`compute_mode`), else None."""
    mode, dtype = compute_mode(cfg, device)
    if mode != "fsdp":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def optimizer_offload_policy(cfg: Config, device: torch.device):
    """FSDP2's ``CPUOffloadPolicy`` for ``hybrid_zero_optimizer.cpu_offload`` (pinned host memory on CUDA)."""
    if not cfg.hybrid_zero_optimizer.cpu_offload:
        return None
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy(pin_memory=device.type == "cuda")


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


DTYPES = {"torch.bfloat16": torch.bfloat16, "bfloat16": torch.bfloat16, "torch.float16": torch.float16,
          "float16": torch.float16, "torch.half": torch.float16}


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``model.mixed_precision="autocast"`` run; None otherwise (no autocast)."""
    mode, dtype = compute_mode(cfg, device)
    return dtype if mode == "autocast" else None


def autocast(cfg: Config, device: torch.device):
    """torch.autocast to ``model.dtype`` for an "autocast" run; a no-op otherwise (FSDP2 casts, or float32)."""
    dtype = autocast_dtype(cfg, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def precision(cfg: Config, device: torch.device) -> str:
    """For the startup line: "bfloat16 (FSDP2 mixed precision, fp32 weights)", "bfloat16 autocast (fp32 weights)",
    "float32"; "+ optimizer offload" / "+ checkpoint offload" when on."""
    mode, dtype = compute_mode(cfg, device)
    name = str(dtype).removeprefix("torch.")
    text = {None: "float32", "fsdp": f"{name} (FSDP2 mixed precision, fp32 weights)",
            "autocast": f"{name} autocast (fp32 weights)"}[mode]
    if cfg.hybrid_zero_optimizer.cpu_offload:
        text += " + optimizer offload"
    if cfg.model.offload_checkpoints:
        text += " + checkpoint offload"
    return text


def count_params(model) -> tuple[int, int]:
    """(all parameters, parameters excluding the input embedding) — the latter drives the 6·N·tokens FLOP count."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel() if model.get_input_embeddings() is not None else 0
    tied = model.get_output_embeddings() is not None and model.config.tie_word_embeddings
    return total, total - (0 if tied else emb)

"""What seqpack does with each InternEvo config key it does not implement, and the checks of allowed values.

``IGNORED[section][key]`` = why a key InternEvo knows has no effect in seqpack (accepted with a warning, so
InternEvo config files load unchanged). Everything else unknown is an error (config.py). ``check_choices`` rejects
values seqpack cannot honour, naming the key and what to do instead.
"""

from __future__ import annotations

import warnings

from ..ssm.config import SP_REFUSAL, SSM_MODEL_TYPES
from .config_diffusion import check_diffusion, is_flux

_PIPE = "pipeline parallel is not supported"
IGNORED: dict[str, dict[str, str]] = {
    "": {
        "JOB_NAME": "name of the run folder comes from train.run_dir",
        "DO_ALERT": "no alerting", "monitor": "no feishu alerts / light monitor; metrics go to RUN_DIR",
        "grad_scaler": "fp16 loss scaling; seqpack trains in fp32 or bf16 autocast, which needs no scaler",
        "beta2_scheduler": "beta2 is constant (adam.adam_beta2_c must be 0)",
        "use_fp32_norm": "norms run in the model's own precision handling",
        "enable_tb": "TensorBoard is train.tensorboard",
    },
    "data": {
        "valid_folder": "no validation loop yet", "valid_micro_num": "no validation loop yet",
        "valid_every": "no validation loop yet", "skip_batches": "not supported; data order is resumed exactly",
        "rampup_batch_size": "no batch-size ramp-up (must be empty)",
        "empty_cache_and_diag_interval": "no diagnosis hooks", "diag_outlier_ratio": "no diagnosis hooks",
        "use_shm": "metadata is read directly", "shm_path": "metadata is read directly",
        "num_worker": "the packer runs in the training process", "packed_length": "always seq_len * micro_bsz",
        "fixed_random_dataset_seqlen": "no random dummy data", "content_name": "train_folder is ftdp",
        "subset_name": "train_folder is ftdp", "split": "train_folder is ftdp", "buffer_size": "train_folder is ftdp",
    },
    "model": {
        "embed_split_hidden": "tensor-parallel embedding layout; no tensor parallel",
        "parallel_output": "vocab-parallel head; the full-vocab loss is exact",
        "use_flash_attn": "attention backend is model.attn_backend (auto picks flash-attn when installed)",
        "qk_interleaved": "HF models use rotate-half RoPE; convert InternEvo weights with seqpack convert",
        "adapt_hf": "HF models are loaded unchanged", "embed_grad_scale": "must be 1 (no embedding grad scaling)",
        "apply_post_layer_norm": "pre-norm transformers decoders only", "no_bias": "comes from the model family",
        "inject_info": "seqpack hooks attention through transformers' AttentionInterface; nothing is injected",
    },
    "ckpt": {
        "async_upload": "local filesystem only", "async_upload_tmp_folder": "local filesystem only",
        "oss_snapshot_freq": "checkpoints are atomic; no snapshots", "stop_file_path": "stop with Ctrl-C",
        "load_ckpt_folder": "use load_ckpt_info (hf_model) or auto_resume",
    },
    "hybrid_zero_optimizer": {k: "FSDP2 handles communication" for k in (
        "overlap_sync_grad", "overlap_sync_param", "reduce_bucket_size", "use_split_tensor_optim", "all_gather_size",
        "zero_overlap_communication")},
    "lr_scheduler": {},
    "parallel": {"expert": "expert parallel is not supported (experts run data parallel)"},
    "parallel.weight": {"launch_allgather_before": "FSDP2 prefetching", "forward_overlap_per": "FSDP2 prefetching",
                        "early_reduce_scatter_release": "FSDP2 reduce-scatter"},
}
_MUST = {  # key: (value that is the only one supported, what to do)
    "data.rampup_batch_size": ("", "remove it (no batch-size ramp-up)"),
    "model.embed_grad_scale": (1, "remove it"),
    "model.apply_post_layer_norm": (False, "use a pre-norm model"),
}
MODES = ("isp",)
PACKINGS = ("cut", "into_one", "bfd", "padded")
DATA_TYPES = ("tokenized", "hf", "streaming")
MIXED_PRECISION = ("auto", "fsdp", "autocast")
DTYPES = ("torch.bfloat16", "torch.float32", "torch.float16", "torch.half", "torch.tf32", "bfloat16", "float32")


def check_choices(cfg, source: str = "config") -> None:
    """Reject values seqpack cannot honour. ValueError names the key, the value and the alternative."""

    def bad(key, value, what):
        raise ValueError(f"{source}: {key}={value!r} is not supported: {what}")

    d, m, p, c = cfg.data, cfg.model, cfg.parallel, cfg.ckpt
    for key, value in (("data.seq_len", d.seq_len), ("data.micro_num", d.micro_num), ("data.micro_bsz", d.micro_bsz),
                       ("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers),
                       ("model.num_attention_heads", m.num_attention_heads),
                       ("ckpt.checkpoint_every", c.checkpoint_every),
                       ("parallel.tensor.size", p.tensor.size), ("parallel.weight.size", p.weight.size),
                       ("train.log_every", cfg.train.log_every), ("ckpt.keep_last", c.keep_last)):
        if value < 1:
            bad(key, value, "must be a positive integer")
    if cfg.total_steps < 1:
        bad("lr_scheduler.total_steps", cfg.total_steps, "must be a positive integer")
    check_ranges(cfg, bad)
    if d.packing is not None and d.packing not in PACKINGS:
        bad("data.packing", d.packing, f"choose one of {', '.join(PACKINGS)}")
    if d.type not in DATA_TYPES:
        bad("data.type", d.type, f"choose one of {', '.join(DATA_TYPES)} (dummy/random data is not provided)")
    if d.total_steps and cfg.lr_scheduler.total_steps and d.total_steps != cfg.lr_scheduler.total_steps:
        bad("data.total_steps", d.total_steps, f"it differs from lr_scheduler.total_steps="
            f"{cfg.lr_scheduler.total_steps}; set one of them")
    if p.pipeline.size != 1:
        bad("parallel.pipeline.size", p.pipeline.size, "pipeline parallel is not implemented; set it to 1 and use "
            "parallel.tensor=dict(size=S, mode='isp') and FSDP2 (zero1) to fit large models")
    if p.tensor.mode not in MODES and p.tensor.size > 1:
        bad("parallel.tensor.mode", p.tensor.mode, f"seqpack implements only mode='isp' (sequence parallel) for "
            f"tensor.size={p.tensor.size}; set mode='isp' or size=1")
    if p.tensor.mode not in MODES + ("mtp", "msp", "fsp"):
        bad("parallel.tensor.mode", p.tensor.mode, "InternEvo modes are mtp, msp, fsp, isp; seqpack implements isp")
    if m.num_chunks != 1:
        bad("model.num_chunks", m.num_chunks, "interleaved pipeline chunks need pipeline parallel; set 1")
    if m.norm_type != "rmsnorm":
        bad("model.norm_type", m.norm_type, "from-scratch models use the family's RMSNorm; set 'rmsnorm'")
    if m.dtype not in DTYPES:
        bad("model.dtype", m.dtype, f"choose one of {', '.join(DTYPES)}")
    if m.mixed_precision not in MIXED_PRECISION:
        bad("model.mixed_precision", m.mixed_precision, f"choose one of {', '.join(MIXED_PRECISION)}")
    if m.offload_checkpoints and not m.checkpoint:
        bad("model.offload_checkpoints", m.offload_checkpoints, "it offloads the inputs of checkpointed layers; set "
            "model.checkpoint=True (or a fraction of layers) as well")
    if isinstance(m.checkpoint, float) and not 0.0 <= m.checkpoint <= 1.0:
        bad("model.checkpoint", m.checkpoint, "a fraction of layers must be within 0..1")
    if not isinstance(m.tiled_mlp, bool) and m.tiled_mlp < 1:
        bad("model.tiled_mlp", m.tiled_mlp, "give True, False or a tile length in tokens >= 1")
    if m.fused_kernels not in (True, False, "auto"):
        bad("model.fused_kernels", m.fused_kernels, "choose 'auto', True or False")
    if cfg.loss.chunk_size < 1:
        bad("loss.chunk_size", cfg.loss.chunk_size, "must be a positive number of tokens (e.g. 1024)")
    if cfg.adam.adam_beta2_c != 0:
        bad("adam.adam_beta2_c", cfg.adam.adam_beta2_c, "beta2 scheduling is not implemented; set 0")
    if cfg.loss.label_smoothing != 0:
        bad("loss.label_smoothing", cfg.loss.label_smoothing, "label smoothing is not implemented; set 0")
    if cfg.lr_scheduler.last_epoch != -1:
        bad("lr_scheduler.last_epoch", cfg.lr_scheduler.last_epoch, "resume from a checkpoint instead; set -1")
    if not 0.0 <= cfg.lr_scheduler.warmup_ratio <= 1.0:
        bad("lr_scheduler.warmup_ratio", cfg.lr_scheduler.warmup_ratio, "must be within 0..1")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        bad("train.device", cfg.train.device, "choose auto, cpu or cuda")
    info = c.load_ckpt_info
    if info is not None:
        if info.ckpt_type != "hf_model":
            bad("ckpt.load_ckpt_info.ckpt_type", info.ckpt_type, "only 'hf_model' (a local Hugging Face folder); "
                "convert InternEvo checkpoints first with `seqpack convert`")
        if tuple(info.content) != ("model",):
            bad("ckpt.load_ckpt_info.content", info.content, "an hf_model folder holds only ('model',); optimizer, "
                "scheduler and sampler state resume through ckpt.auto_resume")
        if not info.path:
            bad("ckpt.load_ckpt_info.path", info.path, "give the local folder of the Hugging Face model")
    if is_flux(cfg):
        check_diffusion(cfg, source)
    elif not from_hf(cfg):
        transformers_model_type(cfg)  # raises for a name transformers does not know
        if transformers_model_type(cfg) in SSM_MODEL_TYPES and p.tensor.size > 1:  # folders: refused at dispatch
            bad("parallel.tensor.size", p.tensor.size, SP_REFUSAL.format(name=cfg.model_type))
    if from_hf(cfg) and info is None:
        bad("model_type", cfg.model_type, "a *_FROM_HF model needs ckpt.load_ckpt_info=dict(path=FOLDER, "
            "content=('model',), ckpt_type='hf_model')")
    check_sequence_2d(p, bad, source)
    if p.zero1.size not in (-1, 0, 1):
        warnings.warn(f"{source}: parallel.zero1.size={p.zero1.size}: seqpack shards parameters, gradients and "
                      "optimizer state with FSDP2 over the whole data-parallel dimension (the update is identical; "
                      "sharding groups smaller than dp are not built)", stacklevel=3)


def check_ranges(cfg, bad) -> None:
    """Numbers outside the range they have a meaning in (optimizer, schedule, sizes): ``bad(key, value, why)``."""
    a, m, d = cfg.adam, cfg.model, cfg.data
    finite = (lambda v: v == v and abs(v) != float("inf"))
    rules = [  # (key, value, ok, what it must be); None = not set
        ("adam.lr", a.lr, finite(a.lr) and a.lr >= 0, "must be a finite number >= 0 (e.g. 3e-4)"),
        ("adam.adam_beta1", a.adam_beta1, 0 <= a.adam_beta1 < 1, "must be within [0, 1) (e.g. 0.9)"),
        ("adam.adam_beta2", a.adam_beta2, 0 <= a.adam_beta2 < 1, "must be within [0, 1) (e.g. 0.95)"),
        ("adam.adam_eps", a.adam_eps, finite(a.adam_eps) and a.adam_eps >= 0, "must be a number >= 0 (e.g. 1e-8)"),
        ("adam.weight_decay", a.weight_decay, finite(a.weight_decay) and a.weight_decay >= 0,
         "must be a number >= 0 (e.g. 0.01)"),
        ("lr_scheduler.eta_min", cfg.lr_scheduler.eta_min, cfg.lr_scheduler.eta_min >= 0, "must be >= 0"),
        ("lr_scheduler.init_steps", cfg.lr_scheduler.init_steps, cfg.lr_scheduler.init_steps >= 0, "must be >= 0"),
        ("hybrid_zero_optimizer.clip_grad_norm", cfg.hybrid_zero_optimizer.clip_grad_norm,
         cfg.hybrid_zero_optimizer.clip_grad_norm >= 0, "must be >= 0 (0 = no clipping)"),
        ("train.max_steps", cfg.train.max_steps, cfg.train.max_steps is None or cfg.train.max_steps >= 1,
         "must be >= 1 (or None = run to lr_scheduler.total_steps)"),
        ("data.min_length", d.min_length, d.min_length >= 0, "must be >= 0"),
        ("data.max_docs", d.max_docs, d.max_docs is None or d.max_docs >= 1, "must be >= 1 or None (all)"),
        ("data.total_steps", d.total_steps, d.total_steps is None or d.total_steps >= 1, "must be >= 1 or None"),
        ("model.attention_dropout", m.attention_dropout, 0 <= m.attention_dropout < 1, "must be within [0, 1)"),
        ("model.layer_norm_epsilon", m.layer_norm_epsilon, m.layer_norm_epsilon > 0, "must be > 0 (e.g. 1e-5)"),
        ("model.rope_base", m.rope_base, m.rope_base > 0, "must be > 0 (e.g. 10000)"),
        ("model.mlp_ratio", m.mlp_ratio, m.mlp_ratio > 0, "must be > 0 (e.g. 8/3)"),
        ("model.multiple_of", m.multiple_of, m.multiple_of >= 1, "must be >= 1"),
        ("model.num_kv_attention_heads", m.num_kv_attention_heads,
         m.num_kv_attention_heads is None or m.num_kv_attention_heads >= 1, "must be >= 1 or None"),
        ("model.vocab_size", m.vocab_size, m.vocab_size is None or m.vocab_size >= 1, "must be >= 1 or None"),
        ("model.max_position_embeddings", m.max_position_embeddings,
         m.max_position_embeddings is None or m.max_position_embeddings >= 1, "must be >= 1 or None"),
    ]
    for key, value, ok, what in rules:
        if not ok:
            bad(key, value, what)
    for name, value in (d.min_length_dict or {}).items():  # (dataset_weights: checked with the files, mixing.py)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            bad(f"data.min_length_dict[{name!r}]", value, "must be a number of tokens >= 0")


def check_sequence_2d(p, bad, source: str) -> None:
    """InternEvo's rule head_size x context_size == tensor.size, and what the window and placement mean here."""
    s2 = p.sequence_2D
    if not s2.enable:
        return
    S = p.tensor.size
    for key, value in (("head_size", s2.head_size), ("context_size", s2.context_size),
                       ("window_size", s2.window_size)):
        if value < 1:
            bad(f"parallel.sequence_2D.{key}", value, "must be a positive integer")
    if s2.head_size * s2.context_size != S:
        splits = ", ".join(f"head_size={S // c}, context_size={c}" for c in range(1, S + 1) if S % c == 0)
        bad("parallel.sequence_2D", f"head_size={s2.head_size}, context_size={s2.context_size}",
            f"head_size x context_size must equal parallel.tensor.size={S}; use one of: {splits}")
    if s2.context_size % s2.window_size:
        bad("parallel.sequence_2D.window_size", s2.window_size,
            f"must divide context_size={s2.context_size}")
    if s2.window_size not in (1, s2.context_size) or s2.device_placement_strategy.interleaved:
        warnings.warn(f"{source}: parallel.sequence_2D.window_size={s2.window_size} / interleaved="
                      f"{s2.device_placement_strategy.interleaved} schedule InternEvo's double ring; seqpack runs one "
                      "ring over the context group (identical results, a different communication schedule)",
                      stacklevel=4)


def check_ignored(key: str, value, source: str) -> None:
    """An InternEvo key seqpack ignores: raise if its value asks for something seqpack cannot do."""
    if key in _MUST and value != _MUST[key][0]:
        raise ValueError(f"{source}: {key}={value!r} is not supported: {_MUST[key][1]}")


def from_hf(cfg) -> bool:
    """True when the model comes from ckpt.load_ckpt_info (InternEvo's *_FROM_HF / HF model types)."""
    t = cfg.model_type.upper()
    return t == "HF" or t.endswith("_FROM_HF") or t.startswith("HUGGINGFACE")


MODEL_TYPE_ALIASES = {"LLAMA2": "llama", "LLAMA": "llama", "QWEN2": "qwen2", "MISTRAL": "mistral"}


def transformers_model_type(cfg) -> str:
    """The transformers model type of a from-scratch run (InternEvo names like "LLAMA2" mapped)."""
    from transformers import CONFIG_MAPPING

    name = MODEL_TYPE_ALIASES.get(cfg.model_type.upper(), cfg.model_type)
    if name not in CONFIG_MAPPING:
        close = [k for k in CONFIG_MAPPING if k.startswith(name[:3].lower())][:8]
        raise ValueError(f"model_type={cfg.model_type!r} is not supported: not a transformers model type (e.g. "
                         f"{', '.join(close) or 'llama'}); or load a local folder with model_type='HF' and "
                         "ckpt.load_ckpt_info=dict(path=..., ckpt_type='hf_model')")
    return name

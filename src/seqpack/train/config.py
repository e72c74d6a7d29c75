"""Training settings: typed dataclasses filled from a Python config file in InternEvo's shape.

A config file is plain Python; its lower-case top-level names are sections (``data = dict(...)``, ``parallel =
dict(...)``, ...) or top-level keys (``model_type``); UPPER_CASE names are helper constants and are not read.

    >>> from seqpack.train import load_config
    >>> cfg = load_config(None, ["--data.seq_len", "128", "--lr_scheduler.total_steps", "5"])
    >>> cfg.data.seq_len, cfg.total_steps, cfg.packing
    (128, 5, 'cut')

Loading and validation (config_load.py, config_rules.py) happen once: unknown or misspelled keys, wrong types and
unsupported choices (pipeline size > 1, tensor modes other than "isp" with size > 1, ...) raise ValueError naming
the key (``data.seq_lenn``) and what to do. InternEvo keys that have no meaning in seqpack (``async_upload``,
``monitor``, ...) are accepted with one warning that lists them. The docstring under each field is the reference
(``seqpack train --help`` prints them).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from .config_diffusion import DiffusionConfig


@dataclass
class DataConfig:
    """``data = dict(...)``: what is read and how it is packed."""

    seq_len: int = 256
    """Tokens per packed sample; a micro-batch row holds ``seq_len * micro_bsz`` tokens (InternEvo's packed_length)."""
    micro_num: int = 2
    """Micro-batches per optimizer step (gradient accumulation)."""
    micro_bsz: int = 1
    """Packed samples concatenated into one micro-batch row."""
    pack_sample_into_one: bool = False
    """InternEvo: True = uniform seq_len boundaries regardless of documents (packing "into_one"), False = "cut"."""
    use_packed_dataset: bool = True
    """InternEvo: False = one document per row, padded (packing "padded")."""
    packing: typing.Optional[str] = None
    """seqpack strategy ("cut", "into_one", "bfd", "padded"); when set it overrides the two InternEvo flags above."""
    min_length: int = 0
    """Documents shorter than this many tokens are dropped."""
    min_length_dict: typing.Optional[dict] = None
    """Per-file override of min_length: {substring of the file path: min_length}."""
    train_folder: typing.Optional[str] = None
    """ftdp folder (``*.bin`` + ``*.bin.meta``, per-type subfolders); None = the embedded stdlib-source corpus.
    For a vision-language model folder (LLaVA): a JSONL of {"image": path, "messages": [...]} or a folder of them."""
    dataset_weights: typing.Optional[dict] = None
    """Sampling proportion per type folder / file pattern (data mixing)."""
    data_order_file: typing.Optional[str] = None
    """Text file listing the ``.bin`` files to use, relative to train_folder."""
    tokenizer_path: typing.Optional[str] = None
    """Local tokenizer folder (AutoTokenizer); None = the model folder's tokenizer, else the embedded one."""
    type: str = "tokenized"
    """InternEvo data type: "tokenized" (ftdp). "hf"/"streaming" need a local folder already tokenized with
    ``seqpack tokenize``."""
    seed: int = 1024
    """Shuffle seed of the packer and sampler (InternEvo's fixed 1024)."""
    max_docs: typing.Optional[int] = None
    """Use only the first max_docs documents (quick runs, tests)."""
    total_steps: typing.Optional[int] = None
    """InternEvo keeps total_steps here; same as lr_scheduler.total_steps (set one of them)."""


@dataclass
class ModelConfig:
    """``model = dict(...)``: architecture for from-scratch runs, and how the model is run."""

    hidden_size: int = 128
    """Hidden size (from-scratch runs only; a loaded HF folder brings its own)."""
    num_layers: int = 4
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_kv_attention_heads: typing.Optional[int] = None
    """Key/value heads (GQA); None = num_attention_heads."""
    mlp_ratio: float = 8 / 3
    """intermediate_size = round(mlp_ratio * hidden_size) rounded up to a multiple of multiple_of."""
    multiple_of: int = 32
    """Rounding of intermediate_size."""
    vocab_size: typing.Optional[int] = None
    """Vocabulary; None = the tokenizer's length."""
    max_position_embeddings: typing.Optional[int] = None
    """None = max(4096, seq_len * micro_bsz)."""
    rope_base: float = 10000.0
    """RoPE theta."""
    layer_norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    norm_type: str = "rmsnorm"
    """Only "rmsnorm" (the transformers decoder families use it)."""
    tie_embeddings: bool = False
    """Share input embedding and output head weights."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities in training (from-scratch runs)."""
    checkpoint: typing.Union[bool, float] = False
    """Activation checkpointing: True/False, or the fraction of layers (0..1) that recompute."""
    dtype: str = "torch.bfloat16"
    """Compute dtype (InternEvo's meaning): the dtype of the forward and backward; weights stay float32 (master
    weights) and the optimizer updates them in float32. How it is applied: model.mixed_precision."""
    mixed_precision: str = "auto"
    """How model.dtype is applied. "fsdp": FSDP2 casts the float32 weights to model.dtype for forward and backward
    and reduces gradients in float32 (torchtitan's), so activations, the residual stream and the inputs kept by
    checkpointed layers are in model.dtype — half the bytes of "autocast"; one process runs FSDP2 on a one-rank
    group. "autocast": torch.autocast over float32 weights (the residual stream stays float32). "auto": "fsdp" on
    CUDA, float32 on the CPU. An explicit choice applies on the CPU too."""
    offload_checkpoints: bool = False
    """Keep the inputs of checkpointed layers in (pinned) host memory between forward and backward, copied on a
    side CUDA stream and fetched back one layer ahead; exact (the same tensors come back). Needs
    model.checkpoint."""
    attn_backend: str = "auto"
    """seqpack attention backend: "auto", "flash_attn", "torch_varlen", "sdpa"."""
    tiled_mlp: typing.Union[bool, int] = False
    """Tiled MLP (DeepSpeed ALST): each decoder layer's MLP runs over sequence tiles and recomputes one tile at a
    time in backward, so its activation memory stops growing with T (costs one more MLP forward). False = off,
    True = tiles of hidden_size tokens, N = tiles of N tokens."""
    tiled_attention: bool = False
    """Tiled attention backward: each attention call's backward runs one key/value head group at a time (the
    query heads sharing a KV head), recomputing that group's forward, so the kernel's backward buffers (flash
    attention's float32 dq accumulator and its dk/dv expanded over the query heads) shrink by the number of KV
    heads; exact, costs one more attention forward. Ring attention (sequence_2D context_size > 1) has its own
    blockwise backward and does not use it."""
    fused_kernels: typing.Union[bool, str] = "auto"
    """Liger kernels on CUDA (RMSNorm, SwiGLU/GeGLU, RoPE, fused linear cross-entropy; ``pip install
    seqpack[cuda]``): "auto" = on when CUDA and liger-kernel are present and the family is supported, True =
    required (error otherwise), False = off."""
    trust_remote_code: bool = False
    """Allow modeling code shipped inside the HF folder."""
    num_chunks: int = 1
    """InternEvo interleaved-pipeline chunks; only 1 (no pipeline parallel)."""


@dataclass
class Zero1Config:
    """``parallel.zero1``: optimizer/parameter sharding (see the FSDP2 mapping in the module docstring of parallel)."""

    size: int = -1
    """-1/0 = shard over the whole data-parallel dimension (FSDP2); 1 = InternEvo's "no ZeRO"; other values: see
    the report of the run (seqpack always shards over the full data-parallel dimension)."""
    fsdp: bool = False
    """InternEvo's switch to torch FSDP; seqpack always uses FSDP2, so both values behave the same."""


@dataclass
class TensorConfig:
    """``parallel.tensor``: InternEvo's tensor/sequence parallel; seqpack supports mode "isp" (sequence parallel)."""

    size: int = 1
    """Sequence-parallel degree S (Ulysses / ISP all-to-all around attention)."""
    mode: str = "isp"
    """Only "isp" when size > 1 ("mtp", "msp", "fsp" are tensor-parallel modes seqpack does not implement)."""


@dataclass
class PipelineConfig:
    """``parallel.pipeline``: not supported beyond size 1."""

    size: int = 1
    """Pipeline stages; must be 1."""
    interleaved_overlap: bool = False
    """InternEvo pipeline option; meaningless without pipeline parallel."""


@dataclass
class WeightConfig:
    """``parallel.weight``: InternEvo weight parallel (per-layer all-gather / reduce-scatter of ISP linears)."""

    size: int = 1
    """FSDP2 already all-gathers each layer's weights and reduce-scatters its gradients over the data-parallel
    dimension, which is what weight parallel does; values > 1 must divide the data-parallel size."""
    overlap: bool = False
    """InternEvo communication overlap switch; FSDP2 always prefetches the next layer."""
    memory_pool: bool = False
    """InternEvo memory pool switch; no effect in seqpack."""


@dataclass
class PlacementConfig:
    """``parallel.sequence_2D.device_placement_strategy``: which group of 2D sequence parallel gets consecutive
    ranks (one node)."""

    head_first: bool = True
    """True: the Ulysses (head) ranks are consecutive, so the all-to-all stays on a node and the ring crosses
    nodes; False: the ring (context) ranks are consecutive."""
    interleaved: bool = False
    """InternEvo's placement of the double ring's inner windows; seqpack runs one ring, so this changes nothing."""


@dataclass
class Sequence2DConfig:
    """``parallel.sequence_2D``: 2D sequence parallel, Ulysses (head_size) × packed ring attention (context_size),
    head_size × context_size == tensor.size."""

    enable: bool = False
    """Use 2D sequence parallel instead of Ulysses over the whole tensor.size group."""
    head_size: int = 1
    """Ulysses degree U (heads split U ways by an all-to-all)."""
    context_size: int = 1
    """Ring degree C (the row split in chunks balanced over C ranks; keys/values travel around the ring)."""
    window_size: int = 1
    """InternEvo's double-ring window (a communication schedule); seqpack runs one ring over the context group:
    the results are identical; must divide context_size."""
    device_placement_strategy: PlacementConfig = field(default_factory=PlacementConfig)
    """Which group gets consecutive ranks."""


@dataclass
class ParallelConfig:
    """``parallel = dict(zero1=..., tensor=..., pipeline=..., weight=...)``. dp = world_size / tensor.size."""

    zero1: Zero1Config = field(default_factory=Zero1Config)
    """Optimizer/parameter sharding."""
    tensor: TensorConfig = field(default_factory=TensorConfig)
    """Sequence parallel (mode "isp")."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Pipeline parallel (size 1 only)."""
    weight: WeightConfig = field(default_factory=WeightConfig)
    """Weight parallel (mapped onto FSDP2)."""
    sequence_2D: Sequence2DConfig = field(default_factory=Sequence2DConfig)
    """2D sequence parallel (Ulysses × ring attention over packed documents)."""

    @property
    def ring_size(self) -> int:
        """The ring degree C of the run (1 without sequence_2D)."""
        return self.sequence_2D.context_size if self.sequence_2D.enable else 1


@dataclass
class LoadCkptInfo:
    """``ckpt.load_ckpt_info``: initial weights."""

    path: str = ""
    """Local Hugging Face model folder (config.json + weights)."""
    content: tuple = ("model",)
    """What to load; only ("model",) for an HF folder (optimizer/scheduler come from auto_resume checkpoints)."""
    ckpt_type: str = "hf_model"
    """Only "hf_model"; InternEvo checkpoints: convert them first with ``seqpack convert``."""


@dataclass
class CkptConfig:
    """``ckpt = dict(...)``: saving, resuming, export."""

    enable_save_ckpt: bool = True
    """Write checkpoints every checkpoint_every steps and at the end."""
    save_ckpt_folder: typing.Optional[str] = None
    """Checkpoint folder ("local:" prefix accepted); None = RUN_DIR/checkpoints."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    auto_resume: bool = True
    """Resume from the latest complete checkpoint in save_ckpt_folder if there is one."""
    load_ckpt_info: typing.Optional[LoadCkptInfo] = None
    """Initial weights from a local HF folder; None = from scratch (model_type + model.*)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a new one is committed."""
    export_hf: bool = True
    """Export the final model as a Hugging Face folder RUN_DIR/hf (safetensors, config, tokenizer)."""


@dataclass
class AdamConfig:
    """``adam = dict(...)``: AdamW."""

    lr: float = 3e-3
    """Peak learning rate."""
    adam_beta1: float = 0.9
    """beta1."""
    adam_beta2: float = 0.95
    """beta2."""
    adam_beta2_c: float = 0.0
    """InternEvo beta2 schedule coefficient; only 0 (constant beta2)."""
    adam_eps: float = 1e-8
    """eps."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norm weights)."""


@dataclass
class LrSchedulerConfig:
    """``lr_scheduler = dict(...)``: linear warmup then cosine decay to eta_min."""

    total_steps: typing.Optional[int] = None
    """Optimizer steps of the run (or data.total_steps); default 1000."""
    warmup_ratio: float = 0.05
    """Fraction of total_steps spent in linear warmup from 0."""
    eta_min: float = 1e-4
    """Learning rate at the end of the cosine."""
    init_steps: int = 0
    """InternEvo: steps before warmup starts (lr held at 0)."""
    last_epoch: int = -1
    """InternEvo scheduler argument; only -1 (resume comes from checkpoints)."""


@dataclass
class HybridZeroOptimizerConfig:
    """``hybrid_zero_optimizer = dict(...)``: gradient clipping and optimizer offload."""

    clip_grad_norm: float = 1.0
    """Clip the global gradient 2-norm to this value; 0 = no clipping (the norm is still logged)."""
    cpu_offload: bool = False
    """Optimizer and master-weight offload (InternEvo's key): FSDP2 keeps the float32 parameter shards,
    gradients and AdamW moments in host memory and the optimizer step runs on the CPU (torch's fused AdamW); the
    GPU holds only the parameters gathered for the layers being computed. Exact: the same update."""


@dataclass
class LossConfig:
    """``loss = dict(...)``."""

    label_smoothing: float = 0.0
    """Only 0."""
    chunked: bool = True
    """Compute the loss from the final hidden states in chunks of chunk_size tokens, never holding the [T, vocab]
    logits (same loss and gradients to float32 round-off). Families whose logit post-processing seqpack does not
    know fall back to full logits with a one-line notice."""
    chunk_size: int = 1024
    """Tokens per chunk of the chunked loss: its extra memory is about 2 x chunk_size x vocab floats (2.5 under
    bf16), plus the output head's float32 gradient."""


@dataclass
class TrainConfig:
    """``train = dict(...)`` (seqpack's own section): run folder, device, logging."""

    run_dir: typing.Optional[str] = None
    """Run folder; None = runs/<UTC timestamp>."""
    seed: int = 0
    """Seed of model initialisation and of dropout."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda"."""
    log_every: int = 10
    """Steps between printed log lines when the terminal shows no progress bar."""
    tensorboard: bool = True
    """Write TensorBoard events to RUN_DIR/tb."""
    max_steps: typing.Optional[int] = None
    """Stop after this step even if total_steps is larger (the schedule still follows total_steps)."""


@dataclass
class Config:
    """A whole training job. Sections mirror InternEvo's config files."""

    model_type: str = "llama"
    """transformers model type for from-scratch runs ("llama", "qwen2", ...; InternEvo's "LLAMA2" = llama), or
    a name ending in "_FROM_HF" / "HF" = the model comes from ckpt.load_ckpt_info (ckpt_type "hf_model"), or
    "flux" = a diffusers Flux transformer trained with rectified flow on images (section ``diffusion``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallelism."""
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    """Checkpoints."""
    adam: AdamConfig = field(default_factory=AdamConfig)
    """Optimizer."""
    lr_scheduler: LrSchedulerConfig = field(default_factory=LrSchedulerConfig)
    """Schedule."""
    hybrid_zero_optimizer: HybridZeroOptimizerConfig = field(default_factory=HybridZeroOptimizerConfig)
    """Gradient clipping."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run options."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Flux (diffusion transformer) runs: model_type="flux"."""
    cudnn_deterministic: bool = False
    """torch.backends.cudnn.deterministic."""
    cudnn_benchmark: bool = False
    """torch.backends.cudnn.benchmark."""

    @property
    def total_steps(self) -> int:
        steps = self.lr_scheduler.total_steps if self.lr_scheduler.total_steps is not None else self.data.total_steps
        return 1000 if steps is None else steps

    @property
    def packing(self) -> str:
        """The seqpack packing strategy the InternEvo flags select."""
        if self.data.packing is not None:
            return self.data.packing
        if not self.data.use_packed_dataset:
            return "padded"
        return "into_one" if self.data.pack_sample_into_one else "cut"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

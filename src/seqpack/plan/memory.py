"""Per-rank peak memory and FLOPs of one seqpack training step, counted from what the step allocates.

Shape legend: T tokens of the packed row, S SP degree, W ranks (FSDP2 shards over all of them), t = ceil(T/S)
tokens per rank, h hidden, L layers, N/Nkv query/kv heads, D head dim, q = N*D, kv = Nkv*D, i MLP size, V vocab.
Byte sizes: p parameter/gradient, s residual stream, a linear outputs and attention tensors (``Precision``).

What a Llama-shaped decoder layer keeps for backward, per local token (checked tensor by tensor with
``torch.autograd.graph.saved_tensors_hooks`` in tests/test_plan.py; peaks in ``seqpack bench plan``):

- each RMSNorm: its input in fp32 (the stream itself, or an fp32 copy of a bf16 stream) 4h, the normalised
  tensor s*h, its output a*h (under autocast one bf16 copy per consuming linear: 3 for q/k/v, 2 for gate/up),
  and 1/rms (4 bytes);
- attention: the kernel's q, k, v a*(q + 2kv) and output a*q (the output is also o_proj's input when S = 1),
  its log-sum-exp 4N; under SP the heads->seq all-to-all output is o_proj's input, another a*q;
- MLP: gate output, SiLU output, up output, their product: 4*a*i (tiled MLP: nothing but its input).

With Liger's fused kernels (``model.fused_kernels``, on CUDA by default when liger-kernel is installed) each
RMSNorm keeps its input itself (no fp32 copy), its output and 1/rms in fp32 (``LigerRMSNormFunction`` saves X, W,
RSTD [rows] float32; its backward writes dX into dY); the SwiGLU product keeps gate and up outputs (its backward
overwrites them with their gradients), so the MLP keeps 3*a*i with the product; RoPE rotates q and k in place and
keeps cos/sin; with the chunked loss, Liger's fused linear cross-entropy replaces seqpack's (see ``loss_bytes``).

Checkpointed layers keep only their input (s*h). The loss on full logits holds the log-softmax output, the NLL
gradient and the log-softmax gradient in fp32 at once (12V per token) — plus the logits themselves when the
caller keeps them (``seqpack train``'s loop does). The peak is the largest of: the loss backward, each layer's
backward (its saved tensors, recomputed under checkpointing, plus its backward temporaries), and the end of the
backward (all gradients). Model states under FSDP2: sharded parameters, gradients and AdamW moments (1/W each),
plus, in backward, the gathered root (embedding, head) and two gathered layers (current + prefetched); during the
loss only the last layer, which FSDP2 keeps gathered after forward (measured: the root is resharded).

    >>> from seqpack.plan import ModelShape, PlanOptions, plan_memory
    >>> tiny = ModelShape("llama", 2048, 22, 32, 4, 64, 5632, 32000)
    >>> opts = PlanOptions(16384, precision="bf16", optimizer="none", keep_logits=False)  # the H100 run
    >>> round(plan_memory(tiny, opts).allocated / 2**30, 2)   # measured: 9.6 GiB
    9.54
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace

from ..parallel.ring_split import CHUNKS_PER_RANK
from .shape import ModelShape

GiB = 2**30


@dataclass(frozen=True)
class Precision:
    """Byte sizes of one training precision."""

    name: str
    param: int  # parameter and gradient as the forward and backward use them (gathered by FSDP2)
    stream: int  # residual stream, RMSNorm input/normalised tensor
    act: int  # linear outputs, attention kernel tensors, logits
    autocast: bool  # linear inputs are cast (one copy per linear) and weights cast once per forward
    master: int = 0  # stored (sharded) parameters and reduced gradients; 0 = param
    fsdp: bool = False  # applied by FSDP2, so FSDP2 runs even on one rank

    @property
    def stored(self) -> int:
        return self.master or self.param


PRECISIONS = {
    "fp32": Precision("fp32", 4, 4, 4, False),  # CPU, or a float32 run
    "bf16": Precision("bf16", 2, 2, 2, False),  # bf16 parameters (model.to(torch.bfloat16))
    "bf16-autocast": Precision("bf16-autocast", 4, 4, 2, True),  # fp32 master weights + bf16 autocast
    # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) over fp32 master shards (train on CUDA)
    "bf16-mixed": Precision("bf16-mixed", 2, 2, 2, False, master=4, fsdp=True),
}


@dataclass(frozen=True)
class PlanOptions:
    """One training step's settings. ``seqpack plan`` fills them from the config or ``seqpack train``'s defaults;
    the defaults here (a GPU run, full checkpointing, the full-logits loss) are for calling the planner directly."""

    seq_len: int  # T: tokens of one packed row (micro-batch)
    gpus: int = 1  # W: ranks; FSDP2 shards parameters, gradients and optimizer state over all of them
    sp: int = 1  # S: sequence-parallel degree
    ring: int = 1  # C: ring (context) degree of 2D sequence parallel, S = C x U Ulysses ranks
    checkpoint: float = 1.0  # fraction of decoder layers with activation checkpointing (0..1)
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"  # "adamw" (two fp32 moments) or "none"
    device: str = "cuda"  # "cuda" or "cpu" (no allocator slack, no context reserve, no flash workspace)
    micro_num: int = 1  # micro-batches per step; > 1 keeps gradients resident across micro-batches
    keep_logits: bool = True  # the caller holds the logits through backward (seqpack train does)
    chunked_loss: bool = False  # loss over sequence chunks of loss_chunk tokens, never all [t, V] logits
    loss_chunk: int = 4096
    tiled_mlp: bool = False  # MLP over tiles of mlp_tile tokens, recomputed in backward
    mlp_tile: int | None = None  # None: hidden_size tokens (DeepSpeed ALST's choice)
    tiled_attention: bool = False  # attention backward one KV head group at a time (model.tiled_attention)
    kv_repeat: bool = False  # the attention kernel cannot share KV heads (torch 2.11 varlen_attn): k, v get N heads
    fused_kernels: bool = False  # Liger's RMSNorm, SwiGLU, RoPE and linear cross-entropy (model.fused_kernels)
    doc_len: int | None = None  # document length (attention FLOPs; CPU attention's gather); None: one fills the row
    slack: float = 0.10  # allocator fragmentation, as a fraction of the allocated peak
    reserve_gib: float = 1.0  # CUDA context + NCCL buffers, outside the allocator
    offload_checkpoints: bool = False  # checkpointed layer inputs in pinned host memory (model.offload_checkpoints)
    offload_optimizer: bool = False  # fp32 weights, gradients, AdamW on the host (hybrid_zero_optimizer.cpu_offload)
    gpus_per_node: int | None = None  # for host memory per node; None: min(gpus, 8)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {self.seq_len!r}")
        if self.gpus < 1 or self.sp < 1:
            raise ValueError(f"gpus and sp must be >= 1, got gpus={self.gpus}, sp={self.sp}")
        if self.gpus % self.sp:
            ok = [d for d in range(1, self.gpus + 1) if self.gpus % d == 0]
            raise ValueError(f"sp={self.sp} does not divide the {self.gpus} GPUs (dp = gpus / sp); use sp in {ok}")
        if self.ring < 1 or self.sp % self.ring:
            ok = [d for d in range(1, self.sp + 1) if self.sp % d == 0]
            raise ValueError(f"ring={self.ring} does not divide sp={self.sp} (sp = ring x ulysses); use ring in {ok}")
        if not 0.0 <= self.checkpoint <= 1.0:
            raise ValueError(f"checkpoint must be a fraction of layers within 0..1, got {self.checkpoint}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.optimizer not in ("adamw", "none"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adamw or none")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"unknown device {self.device!r}; choose cuda or cpu")
        if self.micro_num < 1 or self.loss_chunk < 1 or (self.mlp_tile is not None and self.mlp_tile < 1):
            raise ValueError("micro_num, loss_chunk and mlp_tile must be >= 1")

    @property
    def ulysses(self) -> int:
        """U: the Ulysses (head) degree."""
        return self.sp // self.ring


@dataclass
class Plan:
    """Predicted per-rank memory (bytes) and FLOPs of one step. ``components`` add up to ``allocated``."""

    shape: ModelShape
    options: PlanOptions
    local_tokens: int  # t
    peak_phase: str  # where the peak happens
    components: dict[str, int]  # at the peak
    allocated: int  # peak of live tensors (torch.cuda.max_memory_allocated)
    resident: int  # live before the step: parameters, optimizer state (and gradients when accumulating)
    reserved: int  # allocated * (1 + slack) + reserve: what the GPU must hold
    phases: dict[str, int] = field(default_factory=dict)  # allocated at each candidate peak
    model_flops: float = 0.0  # per rank: 6 * params * tokens + causal attention (MFU convention of train)
    hardware_flops: float = 0.0  # + recomputation (checkpointing, tiled MLP, chunked loss)
    phase_components: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)  # every phase's parts
    host: dict[str, int] = field(default_factory=dict)  # per rank, in host memory (offloads)
    host_per_node: int = 0  # host bytes of all ranks of one node

    @property
    def host_per_rank(self) -> int:
        return sum(self.host.values())

    @property
    def step_peak(self) -> int:
        """Peak growth during the step over what was live before it (what ``seqpack bench plan`` measures)."""
        return self.allocated - self.resident

    def to_dict(self) -> dict:
        return dict(shape=asdict(self.shape), options=asdict(self.options), local_tokens=self.local_tokens,
                    peak_phase=self.peak_phase, components=self.components, allocated=self.allocated,
                    resident=self.resident, reserved=self.reserved, step_peak=self.step_peak, phases=self.phases,
                    model_flops=self.model_flops, hardware_flops=self.hardware_flops, host=self.host,
                    host_per_node=self.host_per_node)


def check_sp(shape: ModelShape, sp: int, ring: int = 1) -> None:
    """SP degrees the planner counts: the Ulysses degree sp / ring divides the query heads (seqpack also runs
    other degrees with dummy heads, at ceil(N/U)*U/N the attention cost; plan those as the next divisor)."""
    if shape.num_heads % (sp // ring):
        ok = [d for d in range(1, shape.num_heads + 1) if shape.num_heads % d == 0]
        what = "sp" if ring == 1 else f"the Ulysses degree sp/ring={sp // ring}"
        raise ValueError(f"{what}={sp // ring} does not divide the model's {shape.num_heads} attention heads; the "
                         f"planner counts exact head splits: use {'sp' if ring == 1 else 'sp/ring'} in {ok}"
                         + ("" if ring > 1 else " (or a ring degree: --ring)"))


def fused(shape: ModelShape, opts: PlanOptions) -> bool:
    """Whether Liger's kernels replace the family's RMSNorm, SwiGLU MLP and RoPE (seqpack.ops.fused's families)."""
    from ..ops.fused import FAMILIES

    return opts.fused_kernels and shape.model_type in FAMILIES


# float32 [t, h] temporaries an HF RMSNorm's backward holds at its peak besides its fp32 input (dY is freed): dX's first
# term (through 1/rms) and, in the backward of x.pow(2).mean(-1), the expanded mean gradient, x^1, 2x and their
# product (traced operator by operator with seqpack.bench.budget in tests/test_plan.py)
NORM_BACKWARD_FP32 = 5


def norm_bytes(width: int, consumers: int, prec: Precision, liger: bool) -> int:
    """Bytes per token one RMSNorm keeps for backward: its fp32 input, the normalised tensor, its output (under
    autocast one bf16 copy per consuming linear; ``consumers=0``: the output itself, in the stream's dtype, as the
    tiled MLP and the chunked loss keep it) and 1/rms; Liger's: X, Y and RSTD."""
    a, s = prec.act, prec.stream
    output = s * width if consumers == 0 else (consumers if prec.autocast else 1) * a * width
    return s * width + output + 4 if liger else 4 * width + s * width + output + 4


def layer_saved_bytes(shape: ModelShape, opts: PlanOptions) -> dict[str, int]:
    """Bytes one decoder layer keeps for backward, per local token, by part (norms, attention, mlp)."""
    from ..parallel.heads import plan_heads

    prec = PRECISIONS[opts.precision]
    liger = fused(shape, opts)
    a, s, h, D = prec.act, prec.stream, shape.hidden_size, shape.head_dim
    q = shape.num_heads * D
    nkv = shape.num_heads if opts.kv_repeat else shape.num_kv_heads * plan_heads(
        shape.num_heads, shape.num_kv_heads, opts.ulysses).kv_repeat
    kv = nkv * D

    def norm(width: int, consumers: int) -> int:
        return norm_bytes(width, consumers, prec, liger)

    # q, k, v, the output (ring attention: its float32 merge) and the fp32 log-sum-exp; the Ulysses all-to-all's
    out = 4 * q if opts.ring > 1 else a * q
    # o_proj's input: the Ulysses all-to-all's output; on the CPU's per-document attention the outputs gathered
    # back into row order when the row holds several documents (a kernel's varlen output is o_proj's input itself)
    several = opts.doc_len is not None and opts.doc_len < opts.seq_len
    proj_input = a * q if opts.ulysses > 1 or (opts.device == "cpu" and opts.ring == 1 and several) else 0
    attn = a * (q + 2 * kv) + out + 4 * shape.num_heads + proj_input
    if shape.qk_norm:  # per-head norms of the projections (their outputs go into RoPE, which keeps only cos/sin)
        width = q + shape.num_kv_heads * D  # Liger: the projection itself (its output is rotated in place)
        attn += (0 if liger else 4 * width) + a * width + 4 * (shape.num_heads + shape.num_kv_heads)
    return dict(norms=norm(h, 3) + norm(h, 0 if opts.tiled_mlp else 2), attention=attn,
                mlp=0 if opts.tiled_mlp else (3 if liger else 4) * a * shape.intermediate_size)


def attention_groups(shape: ModelShape, opts: PlanOptions) -> int:
    """How many key/value head groups one attention backward runs one at a time: the KV heads of one rank after
    the Ulysses split with ``tiled_attention`` (1 without it, with repeated KV heads, or with a ring)."""
    local_kv_heads = shape.num_kv_heads // opts.ulysses
    tiled = opts.tiled_attention and not opts.kv_repeat and opts.ring == 1
    return local_kv_heads if tiled and local_kv_heads > 1 else 1


def attention_workspace(shape: ModelShape, opts: PlanOptions, q: int, kv: int) -> int:
    """Bytes per local token of one attention backward's buffers beyond the layer's saved tensors, for q query and
    kv key/value elements per token (all heads; under Ulysses the kernel sees S x the tokens and 1/S of the heads:
    the same bytes). On CUDA, flash-attn 2's ``mha_varlen_bwd``: the output's
    gradient (its input), dq, dk, dv, dk/dv over all query heads when KV heads are shared (summed after), the fp32
    dq accumulator and softmax_d. With ``tiled_attention`` (one KV head group at a time,
    :mod:`seqpack.attention.tiled`) the full dq, dk, dv stay and those buffers shrink to one group's, plus the
    group's contiguous q/k/v and output-gradient copies and its recomputed output and log-sum-exp. On the CPU the per-document SDPA
    backward (measured by ``seqpack bench plan``), and under tiling one group's of it."""
    a = PRECISIONS[opts.precision].act
    D = shape.head_dim
    heads, groups = q // D, attention_groups(shape, opts)
    qg, kvg, hg = q // groups, kv // groups, heads // groups
    if opts.device == "cuda":
        kernel = a * (qg + 2 * kvg + (2 * qg if kvg < qg else 0)) + 4 * qg + 4 * hg  # one call's buffers
        if groups == 1:
            return a * q + kernel  # + the output's gradient
        return a * (q + q + 2 * kv) + a * (qg + 2 * kvg) + 2 * a * qg + 4 * hg + kernel
    if groups == 1:
        return a * (3 * q + 2 * kv)
    return a * (q + q + 2 * kv) + a * (qg + 2 * kvg) + a * (3 * qg + 2 * kvg) + a * qg + 4 * hg


RING_TILE = 512  # seqpack.attention.ring_blocks.TILE


def parts_kv(shape: ModelShape, opts: PlanOptions) -> int:
    """Key (or value) elements per local token after the head layout: Nkv' x D (Nkv' = N with kv_repeat)."""
    from ..parallel.heads import plan_heads

    nkv = shape.num_heads if opts.kv_repeat else shape.num_kv_heads * plan_heads(
        shape.num_heads, shape.num_kv_heads, opts.ulysses).kv_repeat
    return nkv * shape.head_dim


def plan_memory(shape: ModelShape, opts: PlanOptions) -> Plan:
    """Predict the per-rank peak memory of one training step (forward + loss + backward, and the optimizer)."""
    check_sp(shape, opts.sp, opts.ring)
    prec = PRECISIONS[opts.precision]
    p, m, s, a = prec.param, prec.stored, prec.stream, prec.act  # m: stored (master) parameter/gradient bytes
    h, L, V, i = shape.hidden_size, shape.num_layers, shape.vocab_size, shape.intermediate_size
    q = shape.num_heads * shape.head_dim
    multiple = opts.sp if opts.ring == 1 else CHUNKS_PER_RANK * opts.sp  # shard_batch pads to a multiple of it
    t = -(-opts.seq_len // multiple) * multiple // opts.sp
    W = opts.gpus
    sharded = W > 1 or prec.fsdp or opts.offload_optimizer  # FSDP2 (on a one-rank group for one process)
    cuda = opts.device == "cuda"
    # offloaded to the host: parameter shards, reduced gradients and AdamW moments; checkpointed inputs. On a CPU
    # run host and device are one memory: the offloaded tensors stay in the device parts (and are reported as host)
    on_host = opts.offload_optimizer and cuda

    parts = layer_saved_bytes(shape, opts)
    liger = fused(shape, opts)
    flce = liger and opts.chunked_loss  # Liger's fused linear cross-entropy (it keeps no final-norm output)
    A = sum(parts.values())  # one layer's saved tensors per token
    n_ckpt = round(opts.checkpoint * L)
    offload = opts.offload_checkpoints and n_ckpt > 0 and cuda
    ckpt_input = 0 if offload else s * h
    held = [ckpt_input if j < n_ckpt else A for j in range(L)]  # per token, layer j
    # the final norm (its output: the chunked loss keeps it, in the stream's dtype; the head, a cast copy)
    final = (s * h + (0 if flce else a * h) + 4) if liger else norm_bytes(h, 0 if opts.chunked_loss else 1, prec,
                                                                             False)
    rope = 2 * shape.head_dim * s  # cos, sin shared by every layer
    tile = min(opts.mlp_tile or h, t)

    # model states
    P, P_layer = shape.params, shape.layer_params
    P_head = V * h  # the head's gradient (or the tied embedding's) appears first in backward
    shard = W if sharded else 1
    stored_params = P * m // shard
    stored_optimizer = 8 * P // shard if opts.optimizer == "adamw" else 0
    stored_grads = P * m // shard if opts.micro_num > 1 else 0
    resident_params, optimizer, resident_grads = (0, 0, 0) if on_host else \
        (stored_params, stored_optimizer, stored_grads)
    gathered = (shape.root_params + 2 * P_layer) * p if sharded else 0
    linear_per_layer = P_layer - 2 * h - (2 * shape.head_dim if shape.qk_norm else 0)
    # FSDP2 reduces a bf16 gradient in fp32: one fp32 copy of the layer's gradients while it reduce-scatters
    reduce_copy = P_layer * 4 if sharded and m != p else 0

    def grads(done_params: int, current_layer: bool, root_unsharded: int = P_head, root_reduced: bool = False) -> int:
        """Gradient bytes once the head, final norm and ``done_params`` more have their gradients; under FSDP2 the
        root's unsharded gradients wait for its reduce-scatter at the end of backward (``root_reduced``: its
        reduced shards exist too), a layer's for its own."""
        if not sharded:
            return max(resident_grads, (P_head + h + done_params) * p)
        reduced = 0 if on_host else ((P_head + h if root_reduced else 0) + done_params) * m // W
        return resident_grads + reduced + root_unsharded * p + \
            ((P_layer * p + reduce_copy) if current_layer else 0)

    def casts(layers_held: int) -> int:  # autocast's bf16 weight copies kept by linears awaiting backward
        return 2 * (linear_per_layer * layers_held + V * h) if prec.autocast else 0

    if flce:  # Liger: one chunk's logits (the CE kernel writes their gradient in place), the gradients made in
        # forward (the hidden's [t, h] in its dtype, the head's [V, h] in the weight's) and the fp32 per-token loss;
        rows = -(-t // -(-V // h))  # chunks of next_power_of_2(ceil(t / ceil(V / h))) tokens
        c = min(1 << (rows - 1).bit_length(), t)
        loss_bytes = c * V * a + t * a * h + V * h * p + 4 * t
        logits_kept = 0
    elif opts.chunked_loss:  # one chunk's logits, their fp32 copy (none in fp32) and one fp32 softmax/CE buffer,
        c = min(opts.loss_chunk, t)  # + the gradients made in forward: the head's in fp32 [V, h], the hidden's [t, h]
        loss_bytes = c * V * (a + 4 + (4 if a != 4 else 0)) + 4 * V * h + t * s * h
        logits_kept = 0
    else:
        loss_bytes, logits_kept = t * 12 * V, (t * a * V if opts.keep_logits else 0)

    base = dict(parameters=resident_params, optimizer=optimizer, fsdp_gathered=gathered)
    phases: dict[str, dict[str, int]] = {}
    # FSDP2 reshards the root after forward (gathers it again for the head's backward); the last layer stays gathered
    # (the chunked loss runs inside the forward, while the root - embedding, head - is still gathered)
    phases["loss backward"] = dict(
        base, fsdp_gathered=(P_layer + (shape.root_params if opts.chunked_loss else 0)) * p if sharded else 0,
        gradients=resident_grads,
        held_activations=t * (sum(held) + final + rope), layer_working=0,
        attention_workspace=0, sp_all_to_all=0, ring_buffers=0, logits_loss=loss_bytes + logits_kept,
        autocast_casts=casts(L - n_ckpt))
    kv_local = t * parts_kv(shape, opts)  # k (or v) elements of one ring rank's block: T/C tokens x Nkv'/U heads
    # ring backward: the key/value block and the one arriving, their float32 dk/dv (travelling and arriving), the
    # float32 dq, and one tile's scores, probabilities and their gradients (5 fp32 [N/U, TILE, TILE])
    ring = (2 * 2 * kv_local * a + 2 * 2 * kv_local * 4 + 4 * t * q
            + 5 * 4 * (shape.num_heads // opts.ulysses) * RING_TILE ** 2) if opts.ring > 1 else 0
    kvp = parts_kv(shape, opts)
    norm2 = norm_bytes(h, 0 if opts.tiled_mlp else 2, prec, liger)  # the second RMSNorm's saved tensors
    norm_backward = 4 * h + NORM_BACKWARD_FP32 * 4 * h  # its fp32 input and float32 temporaries (dY is freed)
    if not liger:  # the final RMSNorm's backward: every held input, its output's gradient (made in forward by the
        # chunked loss, by the head's backward otherwise) and the same temporaries
        phases["final norm backward"] = dict(
            base, fsdp_gathered=(P_layer + shape.root_params) * p if sharded else 0, gradients=grads(0, False),
            held_activations=t * (sum(held) + rope), layer_working=t * norm_backward,
            attention_workspace=0, sp_all_to_all=0, ring_buffers=0, logits_loss=logits_kept,
            autocast_casts=casts(L - n_ckpt))
    for k in reversed(range(L)):  # backward of layer k: layers < k still held, layer k's tensors (recomputed)
        # a checkpointed layer's input: a bf16 input is not the HF norm's fp32 copy (it is Liger's saved X)
        extra_input = s * h if k < n_ckpt and s != 4 and not liger else 0
        if k < n_ckpt and offload:  # its input came back from the host, the next layer's is on its way
            extra_input = s * h * ((1 if k > 0 else 0) + (0 if liger else 1))
        if liger:  # the product's gradient; the gate and up outputs take their own gradients in place
            mlp_temps = a * i * t if not opts.tiled_mlp else 4 * a * i * tile  # + one tile's gate, up, product
        else:  # grads of the SiLU*up product
            mlp_temps = 2 * a * i * t if not opts.tiled_mlp else 7 * a * i * tile
        mlp_phase = t * (A + extra_input + s * h) + mlp_temps  # + the gradient flowing in
        # the second RMSNorm's backward (not Liger's, which writes dX into dY): MLP freed, the norm's fp32 input,
        # its output's gradient and its float32 temporaries at once (NORM_BACKWARD_FP32 x 4h)
        norm_phase = 0 if liger else t * (A - parts["mlp"] - norm2 + extra_input + s * h + norm_backward)
        # attention backward: MLP and second norm freed; under SP the send + receive buffers of one all-to-all
        attn_phase = t * (A - parts["mlp"] - parts["norms"] // 2 + extra_input + s * h)
        workspace = t * attention_workspace(shape, opts, q, kvp)
        if opts.ring > 1:  # the exact blockwise backward: dq, dk, dv live in the ring buffers
            workspace = t * a * q
        a2a = 2 * t * a * q if opts.ulysses > 1 else 0
        working, workspace, a2a, ring_bufs = (max(mlp_phase, norm_phase), 0, 0, 0) \
            if max(mlp_phase, norm_phase) >= attn_phase + workspace + a2a + ring else (attn_phase, workspace, a2a, ring)
        phases[f"layer {k} backward"] = dict(
            base, gradients=grads((L - k) * P_layer, sharded), held_activations=t * (sum(held[:k]) + rope),
            layer_working=working, attention_workspace=workspace, sp_all_to_all=a2a, ring_buffers=ring_bufs,
            logits_loss=logits_kept,
            autocast_casts=casts(sum(1 for j in range(k + 1) if j >= n_ckpt) + (1 if k < n_ckpt else 0)))
    phases["embedding backward"] = dict(
        base, gradients=grads(L * P_layer + shape.embedding_params * (0 if shape.tie_embeddings else 1), False,
                              shape.root_params, root_reduced=True), held_activations=t * s * h, layer_working=0,
        attention_workspace=0, sp_all_to_all=0, logits_loss=logits_kept, ring_buffers=0, autocast_casts=0)
    if opts.optimizer == "adamw" and not opts.offload_optimizer:
        # CUDA: foreach AdamW, one fp32 copy of all (sharded) parameters; CPU: per-tensor AdamW, whose update holds
        # two fp32 temporaries of the largest parameter (measured: 2.0 x its bytes)
        largest = max(V * h, h * i, h * q) // shard
        phases["optimizer step"] = dict(
            parameters=resident_params, optimizer=optimizer, fsdp_gathered=0, gradients=P * m // shard,
            held_activations=0, layer_working=4 * (P // shard) if cuda else 2 * 4 * largest,
            attention_workspace=0, sp_all_to_all=0, logits_loss=logits_kept, ring_buffers=0, autocast_casts=0)

    totals = {name: sum(c.values()) for name, c in phases.items()}
    peak_phase = max(totals, key=totals.get)
    allocated = totals[peak_phase]
    reserved = int(allocated * (1 + (opts.slack if cuda else 0))) + int((opts.reserve_gib if cuda else 0) * GiB)
    model, hardware = step_flops_estimate(shape, opts, n_ckpt)
    host = host_bytes(shape, opts, t, n_ckpt, s, stored_params, stored_optimizer, P * m // shard)
    per_node = sum(host.values()) * (opts.gpus_per_node or min(W, 8))
    return Plan(shape, opts, t, peak_phase, phases[peak_phase], allocated, resident_params + optimizer + resident_grads,
                reserved, totals, model, hardware, phases, host, per_node)


def pinned_size(nbytes: int) -> int:
    """Bytes torch's pinned-memory cache hands out for a request (rounded up to a power of two)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def host_bytes(shape: ModelShape, opts: PlanOptions, t: int, n_ckpt: int, s: int, params: int, optimizer: int,
               grads: int) -> dict[str, int]:
    """Host memory of one rank: the offloaded checkpoint inputs (pinned on CUDA, one per checkpointed layer) and
    the offloaded optimizer (fp32 parameter shards, gradients and AdamW moments)."""
    out = {}
    if opts.offload_checkpoints and n_ckpt:
        nbytes = t * s * shape.hidden_size
        out["checkpoint_inputs"] = n_ckpt * (pinned_size(nbytes) if opts.device == "cuda" else nbytes)
    if opts.offload_optimizer:
        out.update(parameters=params, gradients=grads, optimizer=optimizer)
    return out


def step_flops_estimate(shape: ModelShape, opts: PlanOptions, n_ckpt: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per rank for one packed row — ``seqpack.train.metrics.step_flops``'s count
    (6 * non-embedding params * T + causal attention) on documents of ``doc_len``; hardware adds recomputation."""
    import torch

    from ..train.metrics import step_flops

    T, d = opts.seq_len, min(opts.doc_len or opts.seq_len, opts.seq_len)
    cu = list(range(0, T, d)) + [T]
    config = SimpleNamespace(num_hidden_layers=shape.num_layers, head_dim=shape.head_dim,
                             hidden_size=shape.hidden_size, num_attention_heads=shape.num_heads)
    flop_params = shape.params - (0 if shape.tie_embeddings else shape.embedding_params)
    row = SimpleNamespace(cu_seqlens=torch.tensor(cu), num_tokens=T)
    model = step_flops(config, flop_params, [row], opts.sp)
    # a recomputed forward costs a third of forward + backward
    attn_fwd = (model * opts.sp - 6.0 * flop_params * T) / 3 / shape.num_layers
    layer_fwd = 2.0 * shape.layer_params * T + attn_fwd
    extra = n_ckpt * layer_fwd
    if attention_groups(shape, opts) > 1:  # tiled attention: every group's forward once more in backward
        extra += shape.num_layers * attn_fwd
    if opts.tiled_mlp:
        extra += shape.num_layers * 2.0 * 3 * shape.hidden_size * shape.intermediate_size * T
    if opts.chunked_loss:
        extra += 2.0 * shape.vocab_size * shape.hidden_size * T
    return model, model + extra / opts.sp


def longest_fit(shape: ModelShape, opts: PlanOptions, gpu_bytes: int, multiple: int = 1024,
                host_bytes_per_node: int | None = None) -> Plan | None:
    """The plan with the longest ``seq_len`` (a multiple of ``multiple * sp``) whose reserved memory fits
    ``gpu_bytes`` per rank (and its host memory ``host_bytes_per_node``, when given), or None when not even one
    multiple fits. Memory grows with T, so this bisects."""
    step = multiple * opts.sp * (CHUNKS_PER_RANK if opts.ring > 1 else 1)

    def fits(n: int) -> Plan | None:
        plan = plan_memory(shape, replace(opts, seq_len=n * step))
        host_ok = host_bytes_per_node is None or plan.host_per_node <= host_bytes_per_node
        return plan if plan.reserved <= gpu_bytes and host_ok else None

    best = fits(1)
    if best is None:
        return None
    lo, hi = 1, 2
    while fits(hi) is not None:
        lo, hi = hi, hi * 2
        if hi * step > 1 << 34:
            raise ValueError("no memory limit reached below 16G tokens; check --gpu-mem")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) is not None else (lo, mid)
    return fits(lo)


def sp_candidates(shape: ModelShape, gpus: int) -> list[int]:
    """SP degrees that divide both the GPU count and the query heads."""
    return [d for d in range(1, gpus + 1) if gpus % d == 0 and shape.num_heads % d == 0]


def split_candidates(shape: ModelShape, gpus: int, sp: int | None = None) -> list[tuple[int, int]]:
    """(sp, ring) pairs to search: sp divides the GPUs (or is ``sp``), ring divides sp, and the Ulysses degree
    sp / ring divides the query heads — so sp may exceed the head count."""
    sps = [sp] if sp is not None else [d for d in range(1, gpus + 1) if gpus % d == 0]
    return [(s, c) for s in sps for c in range(1, s + 1) if s % c == 0 and shape.num_heads % (s // c) == 0]


def parse_memory(text: str, flag: str = "--gpu-mem") -> int:
    """'80GiB', '80GB', '81920MiB', '80G' (= GiB) -> bytes. Raises ValueError naming the text otherwise."""
    units = {"gib": GiB, "g": GiB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}
    raw = str(text).strip().lower().replace(" ", "")
    num = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = math.nan
    if unit not in units or not value > 0:
        raise ValueError(f"{flag} {text!r}: give a positive number with a unit, e.g. 80GiB, 80GB, 81920MiB")
    return int(value * units[unit])

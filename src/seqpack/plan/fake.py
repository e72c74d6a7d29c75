"""The plan checked against seqpack's real training step at full size, with no memory allocated.

Shape legend: T tokens of the packed row, S SP degree, W ranks, t = T/S tokens per rank, N/Nkv query/kv heads (of
one rank after the Ulysses all-to-all), D head dim.

:func:`fake_step` builds the model the way ``seqpack train`` does (``seqpack.train.model.build_model``: seqpack
attention with the SP group, tiled MLP, chunked loss, activation checkpointing and its offload, FSDP2 with bf16
mixed precision) and runs one step (forward, the loss, backward, AdamW) under torch's ``FakeTensorMode``: every
tensor has its shape, dtype and storage size but no data, so an 8B model at a million tokens runs on a laptop.
The process is rank 0 of a fake process group of W ranks (torch's ``FakeStore`` and ``"fake"`` backend: every
collective returns at once with outputs of the right shapes), as torchtitan's memory estimation does. torch's
``FSDPMemTracker`` counts the live storages after every operator: its peak is the counterpart of
``torch.cuda.max_memory_allocated`` on that rank, which :func:`compare` sets next to ``plan_memory``'s
``allocated``.

What differs from the GPU run, and how it is handled:

- device: the fake tensors are CPU tensors (the CUDA streams FSDP2 and the offload use would need a GPU); sizes do
  not depend on the device. The tracker does not round storages to the CUDA allocator's 512-byte blocks.
- attention: seqpack's CPU path (bucketed SDPA) reads the document boundaries from the data, and on a GPU the
  kernel is flash-attn's, so :class:`FlashVarlenStandIn` takes its place — ``flash_attn_varlen_func``'s exact
  signature (adapted by seqpack as the real one is), allocating what flash-attn 2's varlen forward and backward
  allocate (see its docstring). The batch's metadata (``cu_seqlens``, positions) stays real, so seqpack validates
  the documents as in a real step.
- AdamW: foreach, as torch picks on CUDA (on the CPU it steps tensor by tensor).
- offloads: on the CPU the host is the device, so the offloaded tensors stay in the tracked memory; the tracker
  cannot tell them apart. :func:`compare` refuses them; their bytes are checked by the offload's own record
  (tests/test_memory_features.py).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import torch

from .memory import GiB, Plan, PlanOptions, plan_memory
from .shape import ModelShape


class _FlashVarlenFunction(torch.autograd.Function):
    """Allocations of flash-attn 2's varlen kernels (``mha_varlen_fwd`` / ``mha_varlen_bwd`` and the Python
    wrapper's dq, dk, dv), no arithmetic: the tensors are fake."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q):
        out = torch.empty_like(q)  # [T, N, D]
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)  # softmax_lse [N, T]
        ctx.save_for_backward(q, k, v, out, lse, cu_q)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q = ctx.saved_tensors
        T, N, D = q.shape
        batch = cu_q.shape[0] - 1
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # mha_varlen_bwd: the fp32 dq accumulator and softmax_d over total_q + 128 * batch rows, and under GQA dk/dv
        # for all N heads, summed down to Nkv after the kernel
        rows = T + 128 * batch
        dq_accum = torch.empty(rows, N, D, dtype=torch.float32, device=q.device)
        softmax_d = torch.empty(N, rows, dtype=torch.float32, device=q.device)
        if k.shape[1] != N:
            dk_expanded = torch.empty(T, N, D, dtype=k.dtype, device=k.device)
            dv_expanded = torch.empty(T, N, D, dtype=v.dtype, device=v.device)
            torch.sum(dk_expanded.view(T, k.shape[1], N // k.shape[1], D), 2, out=dk)
            torch.sum(dv_expanded.view(T, v.shape[1], N // v.shape[1], D), 2, out=dv)
            del dk_expanded, dv_expanded
        del dq_accum, softmax_d
        return dq, dk, dv, None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Stand-in of flash-attn 2.6's ``flash_attn_varlen_func`` (same parameters) for fake tensors only:
    q [T, N, D], k/v [T, Nkv, D] -> out [T, N, D]. Forward allocates out and the fp32 log-sum-exp [N, T] and keeps
    q, k, v, out, lse for backward; backward allocates dq, dk, dv, the fp32 dq accumulator [T + 128 b, N, D] and
    softmax_d [N, T + 128 b] (b documents), and under GQA dk, dv of all N heads before their sum to Nkv."""
    from torch._subclasses.fake_tensor import is_fake

    if not is_fake(q):
        raise RuntimeError("the flash-attn stand-in only allocates: it runs on fake tensors (FakeTensorMode)")
    if return_attn_probs:
        raise NotImplementedError("the flash-attn stand-in returns the output only (no ring attention)")
    return _FlashVarlenFunction.apply(q, k, v, cu_seqlens_q)


flash_attn_varlen_func.__module__ = "flash_attn"  # as seqpack names the installed kernel in its messages


@contextlib.contextmanager
def flash_stand_in():
    """seqpack attention resolves ``flash_attn`` to :func:`flash_attn_varlen_func`, on CPU tensors too."""
    from ..attention import backends

    saved = backends.kernel, backends.KERNEL_DEVICE_TYPES
    adapter = backends.adapt_flash_attn(flash_attn_varlen_func)
    backends.kernel = lambda name: adapter if name == "flash_attn" else None
    backends.KERNEL_DEVICE_TYPES = ("cuda", "cpu")
    try:
        yield
    finally:
        backends.kernel, backends.KERNEL_DEVICE_TYPES = saved


@contextlib.contextmanager
def fake_world(world: int, rank: int = 0):
    """A fake default process group of ``world`` ranks, this process being ``rank``."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; the fake run needs its own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_config(shape: ModelShape, opts: PlanOptions):
    """The ``seqpack train`` Config of one planned step (the model from the config's sizes, no weights)."""
    from ..train.config_load import from_dict

    if shape.model_type not in ("llama", "qwen2") or shape.qk_norm:
        raise ValueError(f"the fake run builds Llama and Qwen2 shapes, got model_type {shape.model_type!r}")
    if opts.ring > 1 or opts.kv_repeat:
        raise ValueError("the fake run covers Ulysses sequence parallel with flash-attn (no --ring, no --kv-repeat)")
    multiple = shape.intermediate_size & -shape.intermediate_size  # its largest power-of-two divisor
    precision = {"bf16-mixed": dict(mixed_precision="fsdp", dtype="torch.bfloat16"), "fp32": dict(dtype="torch.float32")}
    if opts.precision not in precision:
        raise ValueError(f"the fake run covers precision bf16-mixed and fp32, got {opts.precision!r}")
    model = dict(
        hidden_size=shape.hidden_size, num_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_kv_attention_heads=shape.num_kv_heads, mlp_ratio=shape.intermediate_size / shape.hidden_size,
        multiple_of=multiple, vocab_size=shape.vocab_size, tie_embeddings=shape.tie_embeddings,
        max_position_embeddings=opts.seq_len, checkpoint=opts.checkpoint,
        tiled_mlp=(opts.mlp_tile or True) if opts.tiled_mlp else False, offload_checkpoints=opts.offload_checkpoints,
        tiled_attention=opts.tiled_attention,
        attn_backend="flash_attn", fused_kernels=False, **precision[opts.precision])
    return from_dict(dict(
        model_type=shape.model_type, model=model, loss=dict(chunked=opts.chunked_loss, chunk_size=opts.loss_chunk),
        parallel=dict(tensor=dict(size=opts.sp)), data=dict(seq_len=opts.seq_len, micro_bsz=1, micro_num=opts.micro_num),
        hybrid_zero_optimizer=dict(cpu_offload=opts.offload_optimizer)), source="seqpack plan")


@dataclass
class FakeResult:
    """The tracked peak of one fake step on rank 0 (bytes), where it happened, and its breakdown."""

    peak: int
    where: str  # the innermost module active at the peak, and forward / backward / optimizer step
    breakdown: dict[str, int]  # FSDPMemTracker's categories at the peak (parameters, gradients, activations, ...)
    seconds: float


def _peak_place(tracker, peak: int, dev) -> str:
    """Where the tracked step reached ``peak``: the innermost FSDP module (a decoder layer, else the root) whose
    forward or backward peak snapshot holds it; else the optimizer step (outside every module)."""
    best = None
    for stats in tracker.memory_tracking.values():
        for state, snaps in stats.snapshots.items():
            if "Peak" not in state.value or not snaps or snaps[-1].get(dev, {}).get("Total") != peak:
                continue
            depth, name = stats.mod_fqn.count("."), stats.mod_fqn.split(".")
            phase = "backward" if "Backward" in state.value else "forward"
            where = f"layer {name[-1]} {phase}" if depth else f"{phase} outside the layers (embedding, head, loss)"
            if best is None or depth > best[0]:
                best = (depth, where)
    return best[1] if best else "between modules"


def fake_step(shape: ModelShape, opts: PlanOptions, rank: int = 0) -> FakeResult:
    """One ``seqpack train`` step of ``shape`` with ``opts`` (one packed row holding one document) on ``rank`` of
    ``opts.gpus``, every tensor fake, tracked by ``FSDPMemTracker``. The tracked peak counts every tensor of the
    step, model states included (``plan_memory(...).allocated``'s counterpart)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    import seqpack

    from ..parallel import ParallelDims, StepLoss, shard_batch
    from ..train.loop import build_optimizer
    from ..train.model import build_model, uses_chunked_loss

    cfg = train_config(shape, opts)
    start = time.perf_counter()
    row = seqpack.pack([torch.arange(opts.seq_len) % max(shape.vocab_size - 3, 1) + 3])  # real metadata
    with fake_world(opts.gpus, rank), flash_stand_in():
        topo = ParallelDims(sp=opts.sp, device="cpu")
        mesh = topo.fsdp_mesh()  # a DeviceMesh holds real rank tensors: built before the fake mode, reused
        topo.fsdp_mesh = lambda: mesh
        micro = [shard_batch(row, topo.sp_size, topo.sp_rank) if topo.sp_size > 1 else row] * opts.micro_num
        # valid targets counted on the real labels, as train does; this rank's only (a fake all-reduce does not sum)
        step_loss = StepLoss(micro, None)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = build_model(cfg, shape.vocab_size, topo)
            optimizer = build_optimizer(model, cfg) if opts.optimizer == "adamw" else None

            def forward_backward():  # seqpack train's step (CausalLMTask.step) on this rank's micro-batches
                logits = None
                for b in micro:
                    if uses_chunked_loss(model):
                        out = model(**b.model_inputs(), use_cache=False, chunked_loss_labels=b.shift_labels)
                        part = step_loss.sum_loss(out.loss)
                        del out
                    else:
                        logits = model(**b.model_inputs(), use_cache=False).logits
                        part = step_loss(logits, b)
                    part.backward()  # train's loop holds the logits through backward
                    logits = None

            if optimizer is not None:  # the first step creates AdamW's moments, which later steps find resident
                forward_backward()
                optimizer.step()
                model.zero_grad(set_to_none=True)
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs(tuple(b.input_ids for b in micro))
            with tracker:
                forward_backward()
            dev = next(iter(tracker.get_tracker_snapshot("peak")))
            snap = tracker.get_tracker_snapshot("peak")[dev]
            peak = snap["Total"]
            where = _peak_place(tracker, peak, dev)
    breakdown = {str(getattr(k, "value", k)): v for k, v in snap.items() if k != "Total" and v}
    return FakeResult(peak, where, breakdown, time.perf_counter() - start)


@dataclass
class Check:
    """``plan_memory``'s allocated peak next to the fake step's tracked peak."""

    plan: Plan
    fake: FakeResult

    @property
    def error(self) -> float:
        return self.plan.allocated / self.fake.peak - 1

    def to_dict(self) -> dict:
        return dict(planned=self.plan.allocated, tracked=self.fake.peak, error=self.error,
                    planned_peak=self.plan.peak_phase, tracked_peak=self.fake.where, breakdown=self.fake.breakdown,
                    seconds=self.fake.seconds)

    def report(self) -> str:
        """The check as ``seqpack plan --check-fake`` prints it."""
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.fake.breakdown.items())
        return (f"\nchecked on fake tensors (rank 0 of {self.plan.options.gpus}, {self.fake.seconds:.0f} s): "
                f"allocated peak planned {self.plan.allocated / GiB:.2f} GiB ({self.plan.peak_phase}), tracked "
                f"{self.fake.peak / GiB:.2f} GiB ({self.fake.where}), error {self.error:+.1%}\n"
                f"tracked at the peak, GiB: {parts}")

    def row(self) -> str:
        o = self.plan.options
        return (f"| {o.seq_len:,} | {o.sp} | {self.plan.local_tokens:,} | {self.plan.allocated / GiB:.2f} | "
                f"{self.fake.peak / GiB:.2f} | {self.error:+.1%} | {self.plan.peak_phase} | {self.fake.where} |")


HEADER = ("| T | sp | tokens/rank | planned GiB | tracked GiB | error | planned peak | tracked peak |\n"
          "|---:|---:|---:|---:|---:|---:|---|---|")


def compare(shape: ModelShape, opts: PlanOptions) -> Check:
    """The plan of ``opts`` (device cuda) and the fake step of the same settings."""
    if opts.offload_checkpoints or opts.offload_optimizer:
        raise ValueError("the fake run cannot tell offloaded tensors from device memory (on the CPU both are the "
                         "same memory): check without --offload-checkpoints / --offload-optimizer")
    if opts.fused_kernels:
        raise ValueError("the fake run uses PyTorch's own RMSNorm, MLP and loss (Liger's Triton kernels do not run on "
                         "fake CPU tensors): check with --no-fused-kernels")
    opts = replace(opts, device="cuda")
    return Check(plan_memory(shape, opts), fake_step(shape, opts))

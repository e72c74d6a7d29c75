"""The training engine's loop: AdamW, warmup + cosine, clipping, divergence stop, checkpoints and metrics, around
the steps of the run's task (:mod:`seqpack.train.task`: the causal LM by default).

One optimizer step (every rank), for the causal LM task:

    micro_num packed rows [1, T] from the loader (this dp rank's), read ahead on a thread
      -> shard_batch (sp > 1): [1, T/S] slices, global cu_seqlens; non-blocking copies to the device
      -> StepLoss: C = valid targets of the whole step over all ranks (one all-reduce)
      -> per micro-batch: model(**inputs) -> summed CE (chunked from the hidden states, or from logits
         [1, T/S, V]) / C -> backward (FSDP2 sums gradients); the loss stays on the device until the step ends
      -> clip global grad norm -> stop if loss or norm is NaN/Inf -> AdamW -> lr schedule

    >>> result = train(load_config("configs/demo.py"))     # doctest: +SKIP
    >>> result.final_loss < result.first_loss               # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..compat.internevo import gpc
from ..parallel import init_topology
from .checkpoint import remove_partial, resume_checkpoint, save_checkpoint
from .config import Config
from .guard import (RunLock, StopSignals, TrainingStopped, check_folders, check_free_space, checkpoint_bytes,
                    rank0_then_share)
from .metrics import DevicePeak, MetricsLogger, peak_memory_mib
from .prefetch import LoaderAt, Prefetcher
from .task import CausalLM


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; the weights of that step were not updated."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    checkpoint: Path | None
    hf_dir: Path | None
    model: torch.nn.Module  # the trained model (FSDP2-sharded with several processes)


class WarmupCosine:
    """Linear warmup from 0 to the peak lr over ``warmup`` steps (after ``init_steps`` at 0), then cosine decay to
    ``eta_min`` at ``total`` steps. State: the number of steps taken."""

    def __init__(self, optimizer, peak: float, total: int, warmup: int, eta_min: float, init_steps: int = 0):
        self.optimizer, self.peak, self.total, self.warmup = optimizer, peak, total, warmup
        self.eta_min, self.init_steps, self.taken = eta_min, init_steps, 0
        self._apply()

    def lr_at(self, taken: int) -> float:
        """Learning rate of the optimizer step that follows ``taken`` completed steps."""
        s = taken - self.init_steps
        if s < 0:
            return 0.0
        if s < self.warmup:
            return self.peak * (s + 1) / self.warmup
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.init_steps - self.warmup))
        return self.eta_min + (self.peak - self.eta_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.taken)

    def step(self) -> None:
        self.taken += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = state["taken"]
        self._apply()


def build_schedule(optimizer, cfg: Config) -> WarmupCosine:
    """The config's learning-rate schedule: linear warmup (``lr_scheduler.warmup_ratio``), cosine to ``eta_min``."""
    total, sched = cfg.total_steps, cfg.lr_scheduler
    return WarmupCosine(optimizer, cfg.adam.lr, total, round(sched.warmup_ratio * total), sched.eta_min,
                        sched.init_steps)


def build_optimizer(model, cfg: Config) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms and biases). With the optimizer offloaded
    (``hybrid_zero_optimizer.cpu_offload``) the parameters are host tensors and torch's fused CPU AdamW steps them."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    a = cfg.adam
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if cfg.hybrid_zero_optimizer.cpu_offload else {}
    return torch.optim.AdamW(groups, lr=a.lr, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_eps, **fused)


def resolve_run_dir(cfg: Config) -> Path:
    """train.run_dir, or runs/<UTC timestamp> decided by rank 0 and shared with every rank."""
    name = [cfg.train.run_dir or f"runs/{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def clip_grad_norm(model, max_norm: float) -> float:
    """Global gradient 2-norm over all ranks (FSDP2 DTensor grads included); clipped to max_norm if > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def train(cfg: Config, task=None) -> TrainResult:
    """Run (or resume) the job ``cfg`` describes with ``task`` (default: a causal LM,
    :class:`seqpack.train.task.CausalLM`); one process or every rank of a torchrun launch. LLaVA and Flux configs:
    :func:`seqpack.tasks.train` picks their task."""
    task = task if task is not None else CausalLM()
    topo = init_topology(sp=cfg.parallel.tensor.size, device=cfg.train.device, ring=cfg.parallel.ring_size,
                         head_first=cfg.parallel.sequence_2D.device_placement_strategy.head_first)  # cuda:LOCAL_RANK
    try:
        return _train(cfg, topo, task)
    finally:
        gpc.unbind()
        topo.destroy()


def _train(cfg: Config, topo, task) -> TrainResult:
    gpc.bind(topo)  # the InternEvo compat slot (gpc.config.data) follows this run's ranks and micro-batches
    torch.backends.cudnn.deterministic = cfg.cudnn_deterministic
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    rank0 = topo.rank == 0
    run_dir, ckpt_dir, lock = prepare_run_dir(cfg, rank0)
    stops = StopSignals(say=lambda text: print(f"seqpack train: {text}", flush=True) if rank0 else None)
    try:
        return _run(cfg, topo, task, rank0, run_dir, ckpt_dir, stops)
    finally:
        stops.restore()
        if lock is not None:
            lock.release()


def _run(cfg: Config, topo, task, rank0: bool, run_dir: Path, ckpt_dir: Path, stops: StopSignals) -> TrainResult:
    parts = task.build(cfg, topo)
    model, loader = parts.model, parts.loader
    if cfg.ckpt.enable_save_ckpt:
        rank0_then_share(lambda: check_free_space(ckpt_dir, checkpoint_bytes(model)), rank0)
    total = cfg.total_steps
    optimizer, scheduler, start_step, resume, last, metrics, peak = start_run(cfg, model, loader, topo.device,
                                                                              run_dir, ckpt_dir, rank0)
    last_ckpt = resume
    resumed = f"  resumed from {resume} (step {start_step})" if resume else ""

    if start_step >= last:
        metrics.message(task.describe(cfg, parts, topo, run_dir, peak) + resumed)
        metrics.message(f"nothing to train: the checkpoint is at step {start_step}, the run ends at step {last}")
    task.begin(cfg, parts, topo, run_dir, start_step)
    started, losses = time.perf_counter(), []
    ahead = None
    try:
        if start_step < last:  # rows are read and prepared (SP shards, pinned) on a thread while the device computes
            ahead = Prefetcher(loader, partial(task.prepare, topo=topo), depth=2)
        for step in range(start_step + 1, last + 1):
            t0 = time.perf_counter()
            prepared = next(ahead)
            loss = task.step(cfg, model, prepared.micro, topo)  # forward + backward; gradients summed over ranks
            if step == start_step + 1:  # printed after the first step, which shows the attention backend really used
                metrics.message(task.describe(cfg, parts, topo, run_dir, peak) + resumed)
            grad_norm = clip_grad_norm(model, cfg.hybrid_zero_optimizer.clip_grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                where = (f"the last checkpoint with finite loss and gradients is {last_ckpt} (step "
                         f"{int(last_ckpt.name.split('_')[-1])}); it is kept and auto_resume starts from it, but its "
                         "weights may already be near divergence: if the loss diverges again soon after, resume "
                         "from an earlier copy") if last_ckpt else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"loss is {loss} and gradient norm is {grad_norm} at step {step}: training stopped before the "
                    f"optimizer step, weights not updated. {where}. Lower adam.lr (now {cfg.adam.lr}), raise "
                    f"lr_scheduler.warmup_ratio or set hybrid_zero_optimizer.clip_grad_norm, then resume.")
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if topo.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            losses.append(loss)
            tokens, flops = task.work(parts, prepared.rows, prepared.micro, topo)
            metrics.log(step, loss=loss, lr=lr, grad_norm=grad_norm, step_time=dt,
                        tokens_per_s_per_device=tokens / dt, mfu=flops / dt / peak.flops,
                        peak_mem_mib=peak_memory_mib(topo.device))
            stop = stops.agreed(topo.device)  # every rank stops after the same step
            if cfg.ckpt.enable_save_ckpt and (step % cfg.ckpt.checkpoint_every == 0 or step == last or stop):
                # the loader runs ahead: save its state after *this* step's rows
                last_ckpt = save_checkpoint(ckpt_dir, step, model, optimizer, scheduler,
                                            LoaderAt(prepared.loader_state), {"loss": loss},
                                            keep_last=cfg.ckpt.keep_last)
                peak.refresh()
            task.after_step(cfg, parts, topo, run_dir, step, last)
            if stop and step < last:
                saved = (f"checkpoint {last_ckpt} saved; run the same command to resume" if cfg.ckpt.enable_save_ckpt
                         else "no checkpoint saved (ckpt.enable_save_ckpt=False)")
                raise TrainingStopped(f"stopped by {StopSignals.NAMES[stop]} after step {step} of {last}: {saved}",
                                      stop)
    finally:
        if ahead is not None:
            ahead.close()
        metrics.close()  # draws loss.png: matplotlib is imported only now, off the training path
    exported = None
    if cfg.ckpt.export_hf and last == total:
        exported = task.export(cfg, parts, run_dir)
    seconds = time.perf_counter() - started
    if losses:
        tail = losses[-max(1, len(losses) // 20):]
        metrics.message(f"done: {len(losses)} steps in {seconds:.1f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f} "
                        f"(mean of the last {len(tail)}: {sum(tail) / len(tail):.4f}); "
                        + task.outputs(run_dir, exported))
    return TrainResult(run_dir, last, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                       seconds, last_ckpt, exported, model)


def prepare_run_dir(cfg: Config, rank0: bool) -> tuple[Path, Path, RunLock | None]:
    """(run folder, checkpoint folder, run lock or None off rank 0). Rank 0 checks that both folders can be made
    and written, takes the run lock (ValueError on every rank when another run holds it) and removes partial
    checkpoints a crash left behind; ``seqpack_config.json`` is written by :func:`start_run` once the run is
    accepted (a refused resume leaves the recorded one as it was). The caller releases the lock."""
    run_dir = resolve_run_dir(cfg)
    ckpt_dir = Path((cfg.ckpt.save_ckpt_folder or str(run_dir / "checkpoints")).removeprefix("local:"))

    def prepare():
        check_folders(run_dir, ckpt_dir if cfg.ckpt.enable_save_ckpt else None)
        lock = RunLock(run_dir)
        remove_partial(ckpt_dir)
        return lock

    return run_dir, ckpt_dir, rank0_then_share(prepare, rank0)


class RunStart(NamedTuple):
    """What a training loop needs once its model and data exist (:func:`start_run`)."""

    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    start_step: int          # the resumed checkpoint's step, 0 for a new run
    resume: Path | None      # the checkpoint resumed from
    last: int                # the last step this invocation runs: total_steps, or train.max_steps if smaller
    metrics: MetricsLogger
    peak: DevicePeak


def start_run(cfg: Config, model, loader, device: torch.device, run_dir: Path, ckpt_dir: Path,
              rank0: bool) -> RunStart:
    """Optimizer and schedule for ``model``, the latest checkpoint restored (``ckpt.auto_resume``), the metrics
    logger and the device's peak FLOP/s."""
    optimizer = build_optimizer(model, cfg)
    scheduler = build_schedule(optimizer, cfg)
    start_step, resume = resume_latest(cfg, ckpt_dir, model, optimizer, scheduler, loader)
    if rank0:  # the run is accepted: record its config
        _write_json(run_dir / "seqpack_config.json", cfg.to_dict())
    total = cfg.total_steps
    last = min(total, cfg.train.max_steps or total)
    metrics = MetricsLogger(run_dir, last, start_step, enabled=rank0, tensorboard=cfg.train.tensorboard,
                            log_every=cfg.train.log_every)
    return RunStart(optimizer, scheduler, start_step, resume, last, metrics, DevicePeak(device))


def resume_latest(cfg: Config, ckpt_dir: Path, model, optimizer, scheduler, loader) -> tuple[int, Path | None]:
    """(step, checkpoint) after restoring the newest intact complete checkpoint when ``ckpt.auto_resume`` (a damaged
    newer one is skipped with a warning); else (0, None)."""
    found = resume_checkpoint(ckpt_dir, model, optimizer, scheduler, loader) if cfg.ckpt.auto_resume else None
    if found is None:
        return 0, None
    return found[0]["step"], found[1]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)

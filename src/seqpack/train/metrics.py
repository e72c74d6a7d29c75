"""Per-step metrics: terminal progress, ``metrics.jsonl``, TensorBoard events, and a PNG loss curve at the end.

Every step records loss, lr, grad norm, tokens/s per device, model FLOP utilisation and peak memory. MFU is the
model's training FLOPs — 6·N·tokens for the matmuls (N = parameters without the input embedding) plus
6·L·(heads·head_dim)·Σ doc_len² for causal attention over each packed document — divided by step time and the
device's peak: a table of bf16 dense peaks for known GPUs, otherwise (and on CPU) a measured fp32 matmul rate.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                 "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def measured_matmul_flops(device: torch.device, n: int = 1024, trials: int = 12) -> float:
    """Best FLOP/s of an n×n fp32 matmul on ``device`` over ``trials`` timings, with the current thread count (the
    CPU "peak"; best-of because other processes on a shared machine only ever slow a trial down)."""
    gen = torch.Generator(device).manual_seed(0)  # a private generator: training RNG state stays untouched
    a, b = (torch.randn(n, n, device=device, generator=gen) for _ in range(2))
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
        time.sleep(0.01)  # spread the trials: one of them should land in a quiet moment
    return best


class DevicePeak:
    """The device's peak FLOP/s for MFU. Datasheet value for known GPUs; otherwise measured, and on a shared
    machine re-measured with :meth:`refresh` (the loop does it at every checkpoint), keeping the best."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flops, self.source = device_peak_flops(device)
        self.measured = not self.source.endswith("datasheet")

    def refresh(self) -> None:
        if self.measured:
            n = 4096 if self.device.type == "cuda" else 1024
            self.flops = max(self.flops, measured_matmul_flops(self.device, n=n))


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for one device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 datasheet"
        return measured_matmul_flops(device, n=4096), f"{name} measured fp32 matmul"
    return measured_matmul_flops(device), f"CPU measured fp32 matmul ({torch.get_num_threads()} threads)"


def step_flops(model_config, n_params: int, batches, sp_size: int = 1) -> float:
    """Training FLOPs of this rank's share of ``batches`` (full packed rows before any SP split)."""
    if hasattr(model_config, "get_text_config"):  # a vision-language model: its language model
        model_config = model_config.get_text_config()
    layers = model_config.num_hidden_layers
    heads = getattr(model_config, "num_attention_heads", None)  # None: an SSM (Mamba), no attention term
    head_dim = getattr(model_config, "head_dim", None) or (model_config.hidden_size // heads if heads else 0)
    width = heads * head_dim if heads else 0
    total = 0.0
    for b in batches:
        lengths = b.cu_seqlens.diff().double()
        total += 6.0 * n_params * b.num_tokens + 6.0 * layers * width * float((lengths * lengths).sum())
    return total / sp_size


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or on CPU the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger. ``log(step, **values)`` once per step, ``close()`` at the
    end (flushes TensorBoard, draws ``loss.png``). On resume, records after ``start_step`` (from the interrupted
    run) are dropped from ``metrics.jsonl`` so the file describes one consistent trajectory."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, log_every: int = 10):
        self.enabled, self.log_every, self.total_steps = enabled, log_every, total_steps
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.bar = self.tb = None
        if not enabled:
            return
        self._truncate(start_step)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                 tok_s=f"{values['tokens_per_s_per_device']:.0f}", mfu=f"{values['mfu']:.1%}")
        elif step % self.log_every == 0 or step == 1 or step == self.total_steps:
            print(f"step {step}/{self.total_steps}  loss {values['loss']:.4f}  lr {values['lr']:.2e}  "
                  f"grad_norm {values['grad_norm']:.3f}  tok/s/dev {values['tokens_per_s_per_device']:.0f}  "
                  f"mfu {values['mfu']:.1%}  mem {values['peak_mem_mib']:.0f} MiB", flush=True)

    def message(self, text: str) -> None:
        """A line on the terminal that does not break the progress bar (rank 0 only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> Path | None:
        """Flush everything; draw the loss curve to RUN_DIR/loss.png (returned)."""
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
        return plot_loss(self.path, self.run_dir / "loss.png")


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    """Loss (and lr on a second axis) against step from a metrics.jsonl; written atomically. None if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    loss = [r["loss"] for r in records]
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1):i + 1]) / min(i + 1, window) for i in range(len(loss))]
    ax.plot(steps, loss, color="tab:blue", lw=0.8, alpha=0.45, label="loss")
    ax.plot(steps, smooth, color="tab:blue", lw=1.8, label=f"loss, mean of {window} steps")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token-mean cross-entropy")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in records], color="tab:orange", lw=0.8, alpha=0.7, label="lr")
    ax2.set_ylabel("learning rate")
    ax.set_title(f"{Path(metrics_path).parent.name}: loss {loss[0]:.3f} -> {smooth[-1]:.3f} (mean of last {window})")
    fig.tight_layout()
    tmp = out.with_name(".tmp-" + out.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out

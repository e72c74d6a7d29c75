"""The run's task: what the training engine (:func:`seqpack.train.loop.train`) asks for, and the causal LM task.

Shape legend: T tokens of a packed row, S SP degree, V vocabulary.

The engine owns what every run shares: topology, run folder, optimizer and schedule, resume, the step loop with
clipping and the divergence stop, checkpoints, metrics. A task owns what one kind of run does differently; the
engine calls, in this order:

    parts = task.build(cfg, topo)                    # RunParts: tokenizer (or processor, or None), model, loader
    micro = task.prepare(rows, topo)                 # on the read-ahead thread: this rank's micro-batches (host)
    task.begin(cfg, parts, topo, run_dir, start)     # before the first step of this invocation
    loss = task.step(cfg, parts.model, micro, topo)  # forward + backward of one optimizer step; returns its loss
    tokens, flops = task.work(parts, rows, micro, topo)
    task.after_step(cfg, parts, topo, run_dir, step, last)
    line = task.describe(cfg, parts, topo, run_dir, peak)   # the startup line, printed after the first step
    out = task.export(cfg, parts, run_dir)           # end of the run (ckpt.export_hf): the exported folder
    text = task.outputs(run_dir, out)                # what the final message points at

:class:`CausalLM` is every transformers causal LM (and Mamba, and seqpack's native InternLM / Baichuan models) on
packed token rows. The LLaVA task (:mod:`seqpack.multimodal.task`) and the Flux task (:mod:`seqpack.diffusion.task`)
build on the engine; :func:`seqpack.tasks.select_task` picks one for a config.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from ..attention.hf import backends_used
from ..compat.internevo import gpc
from ..parallel import StepLoss, shard_batch
from .checkpoint import export_hf
from .config import Config
from .metrics import step_flops
from .model import autocast, build_model, count_params, precision, uses_chunked_loss
from .prefetch import to_device
from .setup import build_loader, load_tokenizer


class RunParts(NamedTuple):
    """What a task builds for a run (:meth:`CausalLM.build`)."""

    tokenizer: object        # a tokenizer, a processor (LLaVA) or None (Flux); saved with the export
    model: torch.nn.Module   # ready to train: attention dispatched, parallelised, on the device
    loader: object           # next(loader) -> this dp rank's rows of one step; state_dict(), load_state_dict()
    params: int              # parameter count (the startup line)
    flop_params: int         # parameters that count for model FLOPs (MFU)


class CausalLM:
    """Task: a causal language model trained on packed token rows with the global token-mean cross-entropy."""

    def build(self, cfg: Config, topo) -> RunParts:
        """Tokenizer, model (vocabulary at least the tokenizer's) and loader (documents checked against the
        model's vocabulary)."""
        if cfg.parallel.weight.size > 1 and topo.world_size % cfg.parallel.weight.size:
            raise ValueError(f"parallel.weight.size={cfg.parallel.weight.size} does not divide the world size "
                             f"{topo.world_size}; FSDP2 shards over all {topo.world_size} ranks: set weight.size=1")
        tokenizer = self.tokenizer(cfg)
        model = build_model(cfg, len(getattr(tokenizer, "tokenizer", tokenizer)), topo)  # a processor holds one
        loader = self.loader(cfg, tokenizer, topo, model.config.get_text_config().vocab_size)
        return RunParts(tokenizer, model, loader, *count_params(model))

    def tokenizer(self, cfg: Config):
        """The run's tokenizer (:func:`seqpack.train.setup.load_tokenizer`)."""
        return load_tokenizer(cfg)

    def loader(self, cfg: Config, tokenizer, topo, vocab_size: int):
        """Packed rows of ``seq_len * micro_bsz`` tokens, ``micro_num`` per step
        (:func:`seqpack.train.setup.build_loader`)."""
        return build_loader(cfg, tokenizer, topo, vocab_size=vocab_size)

    def prepare(self, rows: list, topo) -> list:
        """This rank's micro-batches of one step: the rows [1, T], or their SP shards [1, T/S]; pinned on CUDA."""
        micro = [shard_batch(b, topo.sp_size, topo.sp_rank, ring_size=topo.ring_size) for b in rows] \
            if topo.sp_size > 1 else list(rows)
        if topo.device.type == "cuda":
            micro = [b.map_tensors(torch.Tensor.pin_memory) for b in micro]
        return micro

    def begin(self, cfg: Config, parts: RunParts, topo, run_dir: Path, start_step: int) -> None:
        """Nothing to do before the first step."""

    def step(self, cfg: Config, model, micro: list, topo) -> float:
        """Forward + backward of every micro-batch; the loss is the token mean over the whole step (all micro-batches,
        all ranks), so FSDP2's summed gradients are those of one process on the whole step."""
        step_loss = StepLoss(micro, topo.world_group)  # valid targets counted on the host copies
        if step_loss.num_valid == 0:
            _no_loss_tokens(cfg, first=not getattr(self, "_stepped", False))
        self._stepped = True
        chunked = uses_chunked_loss(model)
        for b in (to_device(b, topo.device) for b in micro):
            with gpc.micro_batch(b):  # InternEvo-style hand-adapted modeling files read cu_seqlens from it
                with autocast(cfg, topo.device):
                    if chunked:  # summed CE from the hidden states, no [T/S, V] logits
                        out = model(**b.model_inputs(), use_cache=False, chunked_loss_labels=b.shift_labels)
                        part = step_loss.sum_loss(out.loss)
                    else:
                        logits = model(**b.model_inputs(), use_cache=False).logits  # [1, T/S, V]
                if not chunked:
                    part = step_loss(logits, b)
                part.backward()  # the step's loss stays on the device until value() below
        return step_loss.value()

    def work(self, parts: RunParts, rows: list, micro: list, topo) -> tuple[float, float]:
        """(tokens this device computed, model FLOPs of this device) of one step."""
        return (sum(b.num_tokens for b in rows) / topo.sp_size,
                step_flops(parts.model.config, parts.flop_params, rows, topo.sp_size))

    def after_step(self, cfg: Config, parts: RunParts, topo, run_dir: Path, step: int, last: int) -> None:
        """Nothing to do after a step."""

    def describe(self, cfg: Config, parts: RunParts, topo, run_dir: Path, peak) -> str:
        """The startup line (after the first step: it names the attention backend really used)."""
        d = cfg.data
        return (f"seqpack train: {run_dir}  {type(parts.model).__name__.removeprefix('FSDP')} "
                f"{parts.params / 1e6:.2f}M params  device={topo.device}  dtype={precision(cfg, topo.device)}  "
                f"world={topo.world_size} (dp={topo.dp_size}, sp={topo.sp_size}"
                + (f" = {topo.ring_size} ring x {topo.ulysses_size} ulysses" if topo.ring_size > 1 else "")
                + f")  packing={cfg.packing}  "
                f"tokens/step={topo.dp_size * d.micro_num * d.micro_bsz * d.seq_len}  "
                f"peak={peak.flops / 1e9:.1f} GFLOP/s ({peak.source})  "
                f"attention={backends_used(parts.model) or cfg.model.attn_backend}")

    def export(self, cfg: Config, parts: RunParts, run_dir: Path) -> Path | None:
        """A Hugging Face folder ``RUN_DIR/hf`` (weights, config naming ``sdpa`` attention, tokenizer)."""
        return export_hf(parts.model, run_dir / "hf", parts.tokenizer)

    def outputs(self, run_dir: Path, exported: Path | None) -> str:
        return f"run folder {run_dir}" + (f", HF export {exported}" if exported else "")


def _no_loss_tokens(cfg: Config, first: bool) -> None:
    """A step none of whose targets carries loss: an error at the run's first step (the data has no loss tokens:
    the run would train at loss 0), a warning later (that update is weight decay only)."""
    data = cfg.data.train_folder or "the embedded corpus"
    if first:
        raise ValueError(f"no token of the first step's rows carries loss (data.train_folder={data!r}): every "
                         "target is masked or padding, so the run would train at loss 0; check the data's loss "
                         "mask (ftdp: a negative token id carries no loss) or the tokenizer's chat template")
    warnings.warn(f"a step without any token that carries loss ({data}): its update is weight decay only",
                  stacklevel=3)

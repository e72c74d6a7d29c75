"""Atomic, resumable checkpoints (torch.distributed.checkpoint) and export to a Hugging Face folder.

Layout of ``FOLDER/step_00000120/``::

    .metadata, __*_*.distcp   model + optimizer, sharded (DCP; any world size can read them)
    train_state.pt            scheduler state, step, tokens seen, last loss (rank 0)
    rank{r}.pt                data-loader state and RNG states of rank r
    SHA256SUMS                checksum of every file above (``sha256sum -c`` format), checked on load
    COMPLETE                  JSON marker, written last

A checkpoint is written into ``FOLDER/.tmp-step_00000120``; every file is fsynced, the COMPLETE marker is written
and fsynced, then the folder is renamed to its final name and the parent fsynced. A crash (even SIGKILL) at any
moment leaves either the previous complete checkpoints untouched and a ``.tmp-*`` folder that is never read (and
is removed by the next start), or a complete new one. ``latest_checkpoint`` only ever returns complete ones.
A complete checkpoint damaged later (flipped bytes, a truncated or deleted shard) fails its checksums on load
(:class:`~seqpack.train.manifest.CorruptCheckpoint` naming the files); :func:`resume_checkpoint` then falls back to
the previous complete one with a warning and renames the damaged one ``corrupt-step_*`` (kept, never read).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import folder_swap, fsync
from ..attention.multimodal import attn_implementations
from .manifest import CorruptCheckpoint, verify_checkpoint, write_manifest

PREFIX = "step_"
MARKER = "COMPLETE"
# fault injection for tests: "STEP:SECONDS" = the save of STEP sleeps after its files are written, before the commit
SAVE_DELAY_ENV = "SEQPACK_FAULT_SAVE_DELAY"


def step_dir(folder: Path, step: int) -> Path:
    return Path(folder) / f"{PREFIX}{step:08d}"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def remove_partial(folder: Path) -> list[Path]:
    """Delete ``.tmp-*`` folders left by an interrupted save (rank 0 only); returns what was removed."""
    folder = Path(folder)
    stale = [p for p in folder.glob(".tmp-*")] if folder.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it "assumes" a single process when there is no process group: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, loader, train_state: dict,
                    keep_last: int = 2) -> Path:
    """Write the checkpoint of ``step`` atomically (collective: every rank calls it); returns its folder."""
    folder = Path(folder)
    final, tmp = step_dir(folder, step), folder / f".tmp-{PREFIX}{step:08d}"
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        return _save(folder, step, final, tmp, model, optimizer, scheduler, loader, train_state, keep_last)
    except BaseException:  # a full disk, a permission change: the previous checkpoints stay, the partial one goes
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save(folder, step, final, tmp, model, optimizer, scheduler, loader, train_state, keep_last) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    local = tmp / f"rank{_rank()}.pt"
    torch.save({"loader": loader.state_dict(), "rng": rng_state()}, local)
    fsync(local)
    if _rank() == 0:
        torch.save({"scheduler": scheduler.state_dict(), "step": step, **train_state}, tmp / "train_state.pt")
        fault = os.environ.get(SAVE_DELAY_ENV, "")
        if fault and int(fault.split(":")[0]) == step:
            time.sleep(float(fault.split(":")[1]))
    _barrier()
    write_manifest(tmp)  # collective: each rank hashes the files it wrote
    if _rank() == 0:
        for p in tmp.iterdir():
            fsync(p)
        world = dist.get_world_size() if dist.is_initialized() else 1
        marker = tmp / MARKER
        marker.write_text(json.dumps({"step": step, "world_size": world, "time": time.time()}))
        fsync(marker)
        fsync(tmp)
        if final.exists():  # a re-run of the same step: move the old one aside (a .tmp- name is never read)
            stale = folder / f".tmp-old-{final.name}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        fsync(folder)
        for old in complete_checkpoints(folder)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, loader) -> dict:
    """Restore everything ``save_checkpoint`` wrote (collective); returns the train_state dict (``step``, ...)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"{path} is not a complete seqpack checkpoint (no {MARKER} marker); pick another one")
    saved_world = json.loads((path / MARKER).read_text())["world_size"]
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved_world != world:
        raise ValueError(f"checkpoint {path} was written by {saved_world} processes but this run has {world}; the "
                         f"data-loader and RNG state are per rank: resume with --nproc {saved_world}")
    if not verify_checkpoint(path):
        warnings.warn(f"checkpoint {path} has no checksum list (written by an older seqpack): loaded unverified",
                      stacklevel=2)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet(), _does_not_fit(path):
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    local = torch.load(path / f"rank{_rank()}.pt", weights_only=False)
    loader.load_state_dict(local["loader"])
    set_rng_state(local["rng"])
    train_state = torch.load(path / "train_state.pt", weights_only=False)
    scheduler.load_state_dict(train_state.pop("scheduler"))
    return train_state


@contextlib.contextmanager
def _does_not_fit(path: Path):
    """DCP's CheckpointException (a traceback per rank) -> ValueError naming the first tensor that does not fit."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        first = next(iter(e.failures.values()), e)
        first = first[0] if isinstance(first, tuple) else first  # (exception, its traceback) per rank
        reason = str(first).strip().splitlines()[-1] if str(first).strip() else type(first).__name__
        raise ValueError(f"checkpoint {path} does not fit this run's model ({reason}); resume with the model "
                         "settings the run was started with (its seqpack_config.json), or choose a new "
                         "train.run_dir") from e


def resume_checkpoint(folder: Path, model, optimizer, scheduler, loader) -> tuple[dict, Path] | None:
    """Restore the newest intact complete checkpoint of ``folder`` (collective); (train_state, its path), or None
    when there is none. A damaged newer one is reported with a warning, renamed ``corrupt-step_*`` and skipped;
    ValueError when every complete checkpoint is damaged (nothing is started over silently)."""
    found, damaged = complete_checkpoints(folder), []
    for path in reversed(found):
        try:
            state = load_checkpoint(path, model, optimizer, scheduler, loader)
        except CorruptCheckpoint as e:
            damaged.append(str(e))
            warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
            _barrier()
            if _rank() == 0:
                os.replace(path, path.with_name("corrupt-" + path.name))
            _barrier()
            continue
        return state, path
    if damaged:
        raise ValueError(f"no intact checkpoint to resume from in {folder} (damaged ones renamed corrupt-step_*): "
                         + " | ".join(damaged) + "; restore them from a copy, or remove the checkpoint folder (or set "
                         "ckpt.auto_resume=False) to train from the start")
    return None


def load_model_weights(path: Path, model) -> None:
    """Only the model weights of a checkpoint (e.g. for ``seqpack generate`` on an interrupted run; no collective)."""
    import torch.distributed.checkpoint as dcp

    verify_checkpoint(path)  # CorruptCheckpoint (a ValueError) naming the damaged files
    state = {"model": model.state_dict()}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"])


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars (weight loading / shard writing) inside seqpack's own output."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def export_hf(model, out_dir: Path, tokenizer=None) -> Path | None:
    """Write ``model`` (FSDP2-sharded or not) as a Hugging Face folder: ``model.safetensors``, ``config.json``,
    generation config and the tokenizer. Collective; rank 0 writes into a temp folder and renames it into place.
    The saved config names the standard ``sdpa`` attention so plain transformers loads it without seqpack."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out_dir = Path(out_dir)
    if _rank() == 0:
        with folder_swap(out_dir) as tmp:
            previous = attn_implementations(model.config)  # per sub-config (LLaVA: text seqpack, vision sdpa)
            model.config._attn_implementation = "sdpa"
            try:
                with quiet_transformers():
                    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            finally:
                model.config._attn_implementation = previous
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    _barrier()
    return out_dir

"""What protects a run: startup checks of its folders, the run lock, and stopping cleanly on SIGTERM / SIGINT.

- :func:`check_folders` (rank 0, before anything is read or written): the run folder and the checkpoint folder can
  be created and written; :func:`check_free_space`: the checkpoint folder has room for one more checkpoint.
- :class:`RunLock`: ``RUN_DIR/seqpack.lock``, an OS lock (``fcntl.lockf``) held by rank 0 for the run's life, with
  ``host pid`` written inside. A second run on the same folder gets a ValueError naming that host and PID. The OS
  releases the lock when its process ends, however it ends; a lock file left by a process that is gone is taken
  over with a warning naming it.
- :class:`StopSignals`: the first SIGTERM or SIGINT only sets a flag; the loop finishes the current step, every
  rank agrees on the step (:meth:`StopSignals.agreed`, one all-reduce), a checkpoint is saved and
  :class:`TrainingStopped` ends the run (exit code 4). A second signal, at least a second later, exits at once
  (exit code 128 + signal number): checkpoint writes are atomic, so at worst a ``.tmp-*`` folder is left, removed
  by the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

LOCK = "seqpack.lock"
EXIT_STOPPED = 4  # stopped by SIGTERM/SIGINT after saving a checkpoint


class TrainingStopped(RuntimeError):
    """The run stopped on SIGTERM / SIGINT after finishing a step (and saving a checkpoint when enabled)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def rank0_then_share(fn, rank0: bool):
    """Run ``fn()`` on rank 0 only; a ValueError or OSError there is raised as a ValueError on every rank
    (otherwise the other ranks would wait forever in the next collective). Returns ``fn()``'s result on rank 0."""
    result, error = None, None
    if rank0:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error = str(e) if isinstance(e, ValueError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ValueError(error)
    return result


def _writable(folder: Path, key: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{key}={str(folder)!r} is a file, not a folder; choose another {key}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".seqpack-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{key}={str(folder)!r} is not writable ({e.strerror or e}); choose a folder you can write "
                         f"to or fix its permissions") from e


def check_folders(run_dir: Path, ckpt_dir: Path | None) -> None:
    """The run folder (and the checkpoint folder, when checkpoints are saved) exist or can be made, and can be
    written; ValueError naming the config key otherwise. Creates them."""
    _writable(Path(run_dir), "train.run_dir")
    if ckpt_dir is not None:
        _writable(Path(ckpt_dir), "ckpt.save_ckpt_folder")


def checkpoint_bytes(model, optimizer_states: int = 2) -> int:
    """About the size of one checkpoint: fp32 weights and ``optimizer_states`` fp32 moments per parameter (AdamW)."""
    return sum(p.numel() for p in model.parameters()) * 4 * (1 + optimizer_states)


def check_free_space(ckpt_dir: Path, need: int) -> None:
    """ValueError when ``ckpt_dir``'s file system has less than ``need`` bytes free (the old checkpoints are
    deleted only after a new one is complete, so one more must fit)."""
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        raise ValueError(f"ckpt.save_ckpt_folder={str(ckpt_dir)!r} has {free / 2**30:.2f} GiB free, but one "
                         f"checkpoint of this model takes about {need / 2**30:.2f} GiB; free some space, choose "
                         "another ckpt.save_ckpt_folder, or set ckpt.enable_save_ckpt=False")


class RunLock:
    """``RUN_DIR/seqpack.lock`` held for the life of the run (see the module docstring). ``release()`` removes it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder()
            os.close(self.fd)
            raise ValueError(f"run folder {run_dir} is in use by another seqpack run ({holder}); wait for it to end, "
                             "stop it, or choose another train.run_dir") from None
        previous = self._holder()
        if previous:
            warnings.warn(f"{self.path}: took over the lock left by {previous}, which is no longer running",
                          stacklevel=2)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
        os.fsync(self.fd)

    def _holder(self) -> str:
        text = os.pread(self.fd, 256, 0).decode(errors="replace").split()
        return f"host {text[0]}, PID {text[1]}" if len(text) >= 2 else ""

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None


class StopSignals:
    """SIGTERM / SIGINT handlers for the life of a run (main thread only; elsewhere signals keep their handlers)."""

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def __init__(self, say=print):
        self.signum, self.first_at, self.say, self.previous = 0, 0.0, say, {}
        if threading.current_thread() is threading.main_thread():
            for s in self.NAMES:
                self.previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum and now - self.first_at >= 1.0:  # a second signal: leave now (writes are atomic)
            print(f"seqpack train: second {self.NAMES[signum]}: exiting now without saving", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        if not self.signum:  # (a duplicate within a second — a terminal and a launcher both forwarding — is one)
            self.signum, self.first_at = signum, now
            self.say(f"{self.NAMES[signum]} received: finishing this step and saving a checkpoint "
                     "(signal again to exit at once)")

    def agreed(self, device: torch.device, group=None) -> int:
        """The signal any rank received (0: none); every rank calls it at the same point of the step."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

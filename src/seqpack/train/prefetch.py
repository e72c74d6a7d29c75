"""Batches prepared ahead of the training step, on a background thread.

Shape legend: T tokens of a packed row, S SP degree.

The thread reads the next optimizer step's rows from the loader, cuts them into this rank's SP shards ([1, T] ->
[1, T/S]) and, on CUDA, pins them, while the device computes the current step; the
main thread then only issues non-blocking copies. The loader advances ahead of training, so every prepared step
carries the loader state *after its own rows* (:class:`LoaderAt`): that is what a checkpoint of that step saves,
and resuming reads exactly the rows that follow.

    >>> ahead = Prefetcher(loader, lambda rows: rows, depth=2)   # doctest: +SKIP
    >>> step = next(ahead); step.rows, step.loader_state          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import queue
import threading
from dataclasses import dataclass

import torch


@dataclass
class PreparedStep:
    """One optimizer step's input, ready for the device."""

    rows: list          # the loader's full rows [1, T] (metrics: tokens, document lengths)
    micro: list         # this rank's micro-batches (SP shards [1, T/S] when S > 1), on the host, pinned on CUDA
    loader_state: dict  # the loader's state after these rows


class LoaderAt:
    """A loader's state at one point (what ``save_checkpoint`` reads via ``state_dict()``)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def to_device(batch, device: torch.device):
    """``batch`` on ``device``; asynchronous from pinned memory on CUDA."""
    if device.type == "cpu":
        return batch
    return batch.map_tensors(lambda t: t.to(device, non_blocking=True))


class Prefetcher:
    """Iterator of :class:`PreparedStep`; ``prepare(rows) -> micro-batches`` runs on a daemon thread, ``depth``
    steps ahead. An exception in the thread is raised by the ``next()`` that would have returned its step."""

    def __init__(self, loader, prepare, depth: int = 2, pin: bool = False):
        self.loader, self.prepare, self.pin = loader, prepare, pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="seqpack-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                rows = next(self.loader)
                state = copy.deepcopy(self.loader.state_dict())
                micro = self.prepare(rows)
                if self.pin:
                    micro = [b.map_tensors(torch.Tensor.pin_memory) for b in micro]
                self._put(PreparedStep(rows, micro, state))
        except BaseException as err:  # noqa: BLE001 - handed to the training thread
            self._put(err)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self) -> PreparedStep:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue: unblock it)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

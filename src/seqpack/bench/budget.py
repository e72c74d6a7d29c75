"""A device-memory budget enforced on the CPU: counts the bytes of the tensors a training step would keep on an
accelerator and fails like a CUDA out-of-memory error at the allocation that crosses the budget.

:class:`DeviceBudget` is a ``TorchDispatchMode``: every operator's output storages are counted once (views share
their storage) and uncounted when the storage dies (a weak reference's callback), so ``live`` follows the tensors
Python and autograd hold, and ``peak`` is its maximum over operator boundaries — the counterpart of
``torch.cuda.max_memory_allocated`` without the caching allocator's rounding. Storages resized in place (FSDP2
frees and re-allocates its gathered parameters that way, outside the dispatcher) are re-read after every operator.
What lives on the host in a GPU run is not counted: tensors handed to :meth:`DeviceBudget.host` (the checkpoint
offload's host copies, the offloaded optimizer's gradient shards) and tensors that exist before tracking and are
not handed to :meth:`DeviceBudget.resident`. Memory an operator uses only inside its kernel is not seen.

    >>> import torch
    >>> budget = DeviceBudget(2**20)
    >>> with budget:
    ...     x = torch.zeros(1024)       # 4 KiB
    ...     y = x.view(32, 32)          # a view: no new bytes
    >>> budget.live, budget.peak
    (4096, 4096)
    >>> with budget:
    ...     big = torch.empty(2**19)    # 2 MiB > 1 MiB
    Traceback (most recent call last):
    ...
    seqpack.bench.budget.BudgetExceeded: device budget exceeded: aten.empty.memory_format wants 2.00 MiB with 4.0 KiB live, over the 1.00 MiB budget by 1.00 MiB
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class BudgetExceeded(MemoryError):
    """The step needs more device memory than the budget (a CUDA out-of-memory error's counterpart)."""


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.{1 if unit == 'KiB' else 2}f} {unit}"
    return f"{int(nbytes)} B"


def _storages(tensors):
    """The untyped storages of the tensors in ``tensors`` (a pytree); a DTensor's are its local tensor's, other
    subclasses are skipped."""
    for t in tree_flatten(tensors)[0]:
        if isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter):
            t = t.to_local() if hasattr(t, "to_local") else None  # FSDP2's sharded parameters and their state
        if t is not None and isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
            yield t.untyped_storage()


class DeviceBudget(TorchDispatchMode):
    """Counts live tensor bytes while active (``with budget:``; re-entrant across steps) and raises
    :class:`BudgetExceeded` when they exceed ``budget`` bytes (None: count only). ``live`` and ``peak`` are
    bytes; ``peak`` restarts with :meth:`reset_peak`."""

    def __init__(self, budget: int | None):
        super().__init__()
        self.budget = budget
        self.live = 0
        self.peak = 0
        self._counted: dict[int, list] = {}  # id(storage) -> [weak reference, bytes counted]
        self._host: set[int] = set()  # ids of storages that live on the host

    def resident(self, tensors) -> None:
        """Count ``tensors`` (a pytree: parameters, optimizer state, the batch) created before tracking began."""
        for storage in _storages(tensors):
            self._count(storage)

    def host(self, tensor: torch.Tensor) -> None:
        """``tensor``'s storage lives on the host: stop counting it (now and when operators return it again)."""
        for storage in _storages(tensor):
            key = id(storage)
            entry = self._counted.pop(key, None)
            if entry is not None:
                self.live -= entry[1]
            self._host.add(key)
            weakref.finalize(storage, self._host.discard, key)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _count(self, storage) -> None:
        key = id(storage)
        entry = self._counted.get(key)
        if entry is not None and entry[0]() is storage or key in self._host:
            return
        nbytes = storage.nbytes()
        self._counted[key] = [weakref.ref(storage, lambda ref, key=key: self._gone(key, ref)), nbytes]
        self.live += nbytes

    def _gone(self, key: int, ref) -> None:
        entry = self._counted.get(key)
        if entry is not None and entry[0] is ref:
            del self._counted[key]
            self.live -= entry[1]

    def _resized(self) -> None:
        """Re-read the size of every counted storage (``UntypedStorage.resize_`` bypasses the dispatcher)."""
        for entry in self._counted.values():
            storage = entry[0]()
            if storage is not None and storage.nbytes() != entry[1]:
                self.live += storage.nbytes() - entry[1]
                entry[1] = storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t not in (torch.Tensor, torch.nn.Parameter) for t in types):
            return NotImplemented  # a tensor subclass (FSDP2's DTensor) runs first; its local operators come back here
        before = self.live
        out = func(*args, **(kwargs or {}))
        self._resized()
        for storage in _storages(out):
            self._count(storage)
        self.peak = max(self.peak, self.live)
        if self.budget is not None and self.live > self.budget:
            raise BudgetExceeded(f"device budget exceeded: {func} wants {_size(self.live - before)} with "
                                 f"{_size(before)} live, over the {_size(self.budget)} budget by "
                                 f"{_size(self.live - self.budget)}")
        return out

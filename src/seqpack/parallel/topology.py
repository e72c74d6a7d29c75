"""One object describes the process topology: ``dp × sp`` ranks and one named DeviceMesh ("dp", "sp").

Ranks are laid out sp-fastest: the SP group of rank r is the S consecutive ranks around it (on one node, so the
all-to-alls stay on the fast links), the DP group is every S-th rank.

With one process nothing is initialised and nothing needs torchrun: groups are ``None`` and every collective in
:mod:`seqpack.parallel.comm` is the identity. Under torchrun (``WORLD_SIZE`` > 1) the default process group is
created from the environment — gloo on CPU, nccl on CUDA — unless the caller created one already.

The device belongs to the run, not to the process group (:func:`choose_device`): on a machine with CUDA every
process uses ``cuda:LOCAL_RANK`` (``cuda:0`` for a single process) unless ``device="cpu"``; ``device="cuda"``
without CUDA is a ValueError.

    >>> topo = init_topology(sp=1, device="cpu")   # one process: no torchrun, no process group
    >>> topo.world_size, topo.dp_size, topo.sp_size, topo.sp_group is None, topo.device.type
    (1, 1, 1, True, 'cpu')
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class ParallelDims:
    """Degrees, ranks, process groups and the DeviceMesh of one training job.

    dp_size, sp_size        data-parallel and sequence-parallel degrees, dp_size * sp_size == world_size
    world_size, rank        of the default process group (1, 0 without one)
    dp_rank, sp_rank        position in the mesh: rank == dp_rank * sp_size + sp_rank
    mesh                    DeviceMesh of shape (dp, sp) named ("dp", "sp"); None with one process
    dp_group, sp_group      process groups of those mesh dimensions; None when that degree is 1
    world_group             every rank (FSDP2 and the loss denominator reduce over it); None with one process
    device                  cuda:LOCAL_RANK on a CUDA machine (device "auto" or "cuda"), else cpu

    ``dp=None`` means "whatever is left": ``world_size // sp``. ``device``: "auto", "cpu" or "cuda".

    2D sequence parallel (``ring`` = C > 1, ``sp = ring × ulysses``): the SP group is C ring (context) ranks × U
    Ulysses (head) ranks, with one DeviceMesh ("dp", "ring", "ulysses") — ("dp", "ulysses", "ring") with
    ``head_first=False``, the LAST dimension being the one whose ranks are consecutive (on one node):

    ring_size, ulysses_size         C and U = sp / C (ring_size 1: plain Ulysses, mesh ("dp", "sp") as above)
    ring_rank, ulysses_rank         this rank's place; ``sp_rank == ring_rank * ulysses_size + ulysses_rank``
    ring_group, ulysses_group       the groups ring attention and the Ulysses all-to-all run over (None at size 1)
    head_first                      True (default): Ulysses ranks consecutive (its all-to-all stays intra-node),
                                    False: ring ranks consecutive
    """

    def __init__(self, dp: int | None = None, sp: int = 1, backend: str | None = None, device: str = "auto",
                 ring: int = 1, head_first: bool = True):
        self._owns_process_group = False
        world = _world_size_from_env()
        if dist.is_initialized():  # the caller's process group decides: nccl -> its current GPU, else CPU
            self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
                else torch.device("cpu")
        else:
            chosen, self.device = choose_device("cpu" if backend == "gloo" and device == "auto" else device,
                                                int(os.environ.get("LOCAL_RANK", "0")))
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if world > 1:
                dist.init_process_group(backend or chosen)
                self._owns_process_group = True
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.dp_size, self.sp_size = self.check(dp, sp, self.world_size)
        self.ring_size, self.ulysses_size = self.check_ring(self.sp_size, ring)
        self.head_first = bool(head_first)
        self.dp_rank, local = divmod(self.rank, self.sp_size)
        self.ring_rank, self.ulysses_rank = (divmod(local, self.ulysses_size) if self.head_first
                                             else divmod(local, self.ring_size)[::-1])
        self.sp_rank = self.ring_rank * self.ulysses_size + self.ulysses_rank
        self.mesh = self.dp_group = self.sp_group = self.world_group = self.ring_group = None
        self.ulysses_group = None
        if self.world_size > 1 and self.ring_size > 1:
            self._init_2d_mesh()
        elif self.world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (self.dp_size, self.sp_size), mesh_dim_names=("dp", "sp"))
            self.dp_group = self.mesh.get_group("dp") if self.dp_size > 1 else None
            self.sp_group = self.mesh.get_group("sp") if self.sp_size > 1 else None
            self.world_group = dist.group.WORLD
            self.ulysses_group = self.sp_group

    def _init_2d_mesh(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        names = ("dp", "ring", "ulysses") if self.head_first else ("dp", "ulysses", "ring")
        shape = tuple({"dp": self.dp_size, "ring": self.ring_size, "ulysses": self.ulysses_size}[n] for n in names)
        self.mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
        self.dp_group = self.mesh.get_group("dp") if self.dp_size > 1 else None
        self.ring_group = self.mesh.get_group("ring")
        self.ulysses_group = self.mesh.get_group("ulysses") if self.ulysses_size > 1 else None
        for d in range(self.dp_size):  # every rank creates every SP group, in the same order
            group = dist.new_group(list(range(d * self.sp_size, (d + 1) * self.sp_size)))
            if d == self.dp_rank:
                self.sp_group = group
        self.world_group = dist.group.WORLD

    @staticmethod
    def check_ring(sp: int, ring: int) -> tuple[int, int]:
        """Validate the ring degree against ``sp`` = ring × ulysses; returns ``(ring, ulysses)``.

            >>> ParallelDims.check_ring(8, 2)
            (2, 4)
        """
        if not isinstance(ring, int) or ring < 1 or sp % ring:
            ok = [d for d in range(1, sp + 1) if sp % d == 0]
            raise ValueError(f"ring degree ring={ring!r} must divide the sequence parallel degree sp={sp} "
                             f"(sp = ring x ulysses); use ring in {ok}")
        return ring, sp // ring

    def attention_groups(self) -> dict:
        """Keyword arguments for :func:`seqpack.dispatch`: ``sp_group`` (Ulysses) and ``ring_group``."""
        return dict(sp_group=self.ulysses_group, ring_group=self.ring_group)

    @staticmethod
    def check(dp: int | None, sp: int, world_size: int) -> tuple[int, int]:
        """Validate the degrees against ``world_size`` (no side effects); returns ``(dp, sp)``.

            >>> ParallelDims.check(None, 2, 8)
            (4, 2)
        """
        for name, value in (("sp", sp), ("dp", dp)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"parallel degree {name}={value!r} must be a positive integer")
        if world_size % sp:
            ok = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(f"world size {world_size} is not divisible by sequence parallel degree sp={sp}; "
                             f"use sp in {ok} or launch a multiple of {sp} processes")
        if dp is None:
            dp = world_size // sp
        if dp * sp != world_size:
            raise ValueError(f"dp={dp} x sp={sp} = {dp * sp} does not match the world size {world_size}; "
                             f"use dp={world_size // sp} (or leave dp unset)")
        return dp, sp

    def fsdp_mesh(self):
        """1-D DeviceMesh over every rank (dp and sp flattened, sp fastest) that FSDP2 shards parameters over;
        summing gradients over it is exactly what sequence parallel needs. None with one process."""
        if self.world_size == 1:
            return None
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(dist.group.WORLD, self.device.type, mesh_dim_names=("dp_sp",))

    def destroy(self) -> None:
        """Tear down the default process group if this object created it."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    def __repr__(self) -> str:
        ring = f", ring={self.ring_size}, ulysses={self.ulysses_size}" if self.ring_size > 1 else ""
        return (f"ParallelDims(world_size={self.world_size}, rank={self.rank}, dp={self.dp_size}, sp={self.sp_size}"
                f"{ring}, dp_rank={self.dp_rank}, sp_rank={self.sp_rank}, device={self.device})")


def init_topology(sp: int = 1, dp: int | None = None, backend: str | None = None, device: str = "auto",
                  ring: int = 1, head_first: bool = True) -> ParallelDims:
    """Build the topology from torchrun's environment (or an existing process group); see :class:`ParallelDims`.
    ``ring=C`` > 1: 2D sequence parallel, ``sp = C`` ring ranks × ``sp / C`` Ulysses ranks."""
    return ParallelDims(dp=dp, sp=sp, backend=backend, device=device, ring=ring, head_first=head_first)


def choose_device(preference: str = "auto", local_rank: int = 0) -> tuple[str, torch.device]:
    """(process-group backend, device) of this process: ``nccl`` and ``cuda:local_rank`` when CUDA is available
    and not declined (``preference="cpu"``), else ``gloo`` and the CPU. One GPU per process.

        >>> choose_device("cpu")
        ('gloo', device(type='cpu'))
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {preference!r} is not one of auto, cpu, cuda (train.device)")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return "gloo", torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested (train.device / --device) but torch.cuda.is_available() is False "
                         f"(no GPU, or a CPU-only torch {torch.__version__}); use device 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible: start at most {count} "
                         "processes per node (one GPU each), or set train.device='cpu'")
    return "nccl", torch.device("cuda", local_rank)


def _world_size_from_env() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} is not an integer (launch with torchrun)") from None

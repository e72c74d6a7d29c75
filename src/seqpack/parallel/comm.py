"""Collectives for sequence parallelism, with exact autograd and explicit ``group=``.

Shape legend: T tokens of the whole (padded) row, S SP degree, H heads (query or key/value), D head dim.

A ``group`` of ``None`` (or of size 1) means "no communication": every function here is then the identity, so
one code path serves one process and many (nothing needs torchrun or an initialised process group).

Gradient convention used throughout seqpack: parameter gradients are **summed** over all ranks (FSDP2 with
divide factor 1, or :func:`seqpack.parallel.all_reduce_gradients`). Under that convention

- ``all_to_all`` is a permutation of data across ranks; its backward is the inverse all-to-all.
- ``gather_sequence`` (all-gather along T) keeps only the local slice of the gradient in backward, without the
  ×S "grad_scale='up'" XTuner needs: XTuner's DeepSpeed averages gradients over ranks, seqpack sums them, so a
  loss computed identically on every SP rank counts exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """Number of ranks in ``group``; 1 for ``None`` (no communication)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` in place (no autograd) and return it; identity for a group of one."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into S chunks along ``scatter_dim``, send chunk j to rank j, concatenate the S received chunks
    (ordered by source rank) along ``gather_dim``."""
    S = dist.get_world_size(group)
    if x.shape[scatter_dim] % S:
        raise ValueError(f"all-to-all over {S} ranks needs dimension {scatter_dim} of shape {tuple(x.shape)} to be "
                         f"divisible by {S}")
    send = x.unflatten(scatter_dim, (S, -1)).movedim(scatter_dim, 0).contiguous()  # [S, ...chunk]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all: scatter ``scatter_dim`` over the ranks of ``group``, gather ``gather_dim``."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """Before attention: [T/S, H, D] (sequence shard, all heads) -> [T, H/S, D] (whole row, head shard)."""
    return all_to_all(x, group, scatter_dim=1, gather_dim=0)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """After attention: [T, H/S, D] (whole row, head shard) -> [T/S, H, D] (sequence shard, all heads)."""
    return all_to_all(x, group, scatter_dim=0, gather_dim=1)


def _gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        S, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(S, dim=ctx.dim)[r].contiguous(), None, None


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All-gather the sequence shards of ``group`` along ``dim`` (e.g. logits [1, T/S, V] -> [1, T, V]).

    Backward keeps the local slice of the gradient (see the module docstring for why there is no ×S).
    """
    if group_size(group) == 1:
        return x
    return _GatherSequence.apply(x, group, dim)


class RingPass:
    """Send tensors to the next rank of ``group`` and receive the previous rank's, without blocking (ring
    attention's key/value rotation). ``RingPass(group).start(tensors)`` then ``.wait()`` -> the received tensors
    (same shapes and dtypes). No autograd: ring attention's own backward rotates the gradients."""

    def __init__(self, group):
        self.group = group
        size, rank = group_size(group), group_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)
        self._pending: list = []

    def start(self, tensors: list[torch.Tensor]) -> "RingPass":
        self._recv = [torch.empty_like(t) for t in tensors]
        self._pending = []
        for t, r in zip(tensors, self._recv):
            self._pending.append(dist.isend(t.contiguous(), self.next, group=self.group))
            self._pending.append(dist.irecv(r, self.prev, group=self.group))
        return self

    def wait(self) -> list[torch.Tensor]:
        for req in self._pending:
            req.wait()
        self._pending = []
        return self._recv

"""The loss of an optimizer step: the token mean over every valid target of the step.

Shape legend: T/S local tokens, V vocabulary.

One optimizer step sees ``micro_num`` micro-batches on each of ``dp`` data-parallel groups, each row cut into S
sequence shards. Single-process training on the whole step would minimise

    L = (sum of cross-entropy over all valid targets of the step) / (their count C)

seqpack gives every rank the same C up front (one all-reduce of the local counts over all ranks, before the first
forward), and each micro-batch backpropagates ``local_sum / C``. With gradients **summed** over all ranks
(:func:`~seqpack.parallel.apply_fsdp`, or :func:`all_reduce_gradients` without FSDP) the accumulated gradient is
exactly ∇L. The logged loss (:meth:`StepLoss.value`) is the same number on every rank.

This is where XTuner's legacy SP path is wrong: it optimises the unweighted mean of per-shard, per-micro-batch,
per-rank token means (DeepSpeed averages gradients, mmengine divides by the accumulation count) and its
``reduce_sequence_parallel_loss`` token-weights only the *logged* value within the SP group.

    >>> step = StepLoss([batch_a, batch_b], topo.world_group)       # doctest: +SKIP
    >>> for b in (batch_a, batch_b):                                # doctest: +SKIP
    ...     step(model(**b.model_inputs()).logits, b).backward()
    >>> all_reduce_gradients(model, topo.world_group)  # without FSDP2  # doctest: +SKIP
    >>> print(step.value())                                         # doctest: +SKIP
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..batch import IGNORE_INDEX
from ..ops.loss import token_loss_sum
from .comm import all_reduce_sum, group_size


def global_valid_count(batches: Iterable, group) -> int:
    """Valid targets of a whole optimizer step: the local shards/batches' counts summed over ``group`` (all ranks:
    ``topo.world_group``). ``batches`` are this rank's micro-batches (PackedBatch or ShardedBatch).

    Every rank must run the same number of micro-batches (FSDP2 and the SP all-to-alls are collectives; a rank
    with one more forward would wait forever), so that is checked here, before the first forward."""
    batches = list(batches)
    local = sum(int((b.shift_labels != IGNORE_INDEX).sum()) for b in batches)
    n = len(batches)
    # [valid, micro, micro^2] summed: all ranks have the same micro count iff world * sum(m^2) == sum(m)^2
    stats = all_reduce_sum(torch.tensor([local, n, n * n], dtype=torch.long, device=_device(group)), group).tolist()
    ranks = group_size(group)
    if ranks * stats[2] != stats[1] ** 2:
        raise ValueError(f"ranks run different numbers of micro-batches in one optimizer step (this rank: {n}, "
                         f"mean: {stats[1] / ranks:g}); give every rank the same micro_num")
    return int(stats[0])


class StepLoss:
    """Token-mean loss of one optimizer step across micro-batches, SP ranks and DP ranks.

    ``StepLoss(micro_batches, group)`` computes the global valid-target count C once; each call
    ``step(logits, batch)`` returns ``sum of CE over batch's valid targets / C`` (backpropagate it), and
    :meth:`value` returns the step's loss, identical on every rank.
    """

    def __init__(self, micro_batches: Iterable, group):
        self.group = group
        self.num_valid = global_valid_count(list(micro_batches), group)
        self._sum: torch.Tensor | None = None  # detached running sum, on the logits' device (no host sync)

    def __call__(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """logits [1, T/S, V] of ``batch`` -> scalar loss contribution."""
        return self.sum_loss(token_loss_sum(logits, batch.shift_labels))

    def sum_loss(self, total: torch.Tensor) -> torch.Tensor:
        """A micro-batch's summed cross-entropy over its valid targets (e.g. the chunked loss's ``out.loss``) ->
        its scalar loss contribution ``total / C``. Accumulated on the device: no host sync until :meth:`value`."""
        part = total.detach().double()
        self._sum = part if self._sum is None else self._sum + part
        return total / max(self.num_valid, 1)

    def value(self) -> float:
        """The step's token-mean loss over all ranks (one all-reduce; call it on every rank)."""
        local = self._sum if self._sum is not None else torch.zeros((), dtype=torch.float64)
        total = all_reduce_sum(local.to(_device(self.group)).reshape(1).clone(), self.group)
        return float(total) / max(self.num_valid, 1)


def all_reduce_gradients(model: torch.nn.Module, group) -> None:
    """Sum parameter gradients over ``group`` (all ranks) — the gradient sync for SP/DP without FSDP2.
    Parameters without a gradient on this rank take part with zeros so every rank issues the same collectives."""
    if group_size(group) == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad, group)


def _device(group) -> torch.device:
    import torch.distributed as dist

    if group_size(group) > 1 and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

"""XTuner's sequence-parallel API names, with the same meaning, over seqpack's explicit-group core.

Like XTuner, this layer keeps the topology in one module-level slot (set by :func:`init_sequence_parallel`), so
code written against ``xtuner.parallel.sequence`` ports by changing the import. The core path (``ParallelDims``,
``shard_batch``, ``StepLoss``, ``seqpack.dispatch(model, sp_group=...)``) passes groups explicitly.

Where seqpack differs from XTuner's legacy implementation, because XTuner was wrong:

- **Labels are shifted before the split.** XTuner split unshifted ``labels`` and let the model shift inside each
  shard, dropping the target of every shard's last token (S-1 per row). seqpack packs ``shift_labels`` first;
  :func:`split_for_sequence_parallel` of shifted labels keeps every target.
- **The optimised loss is the global token mean.** XTuner's ``reduce_sequence_parallel_loss`` token-weights the
  value only for logging (its backward is the identity, and DeepSpeed then averages per-rank means). Here the
  backward is consistent with the forward: rank r's local mean gets weight ``n_r / sum(n)``, so with gradients
  summed over the SP group (seqpack's convention) the gradient is that of the SP group's token mean. For the
  token mean over DP ranks and accumulation micro-batches too, use :class:`seqpack.parallel.StepLoss`.
- **Rows not divisible by S get a dummy segment**, not an assert (XTuner asserts): :func:`pad_for_sequence_parallel`
  pads the tensors; :func:`seqpack.parallel.shard_batch` also extends ``cu_seqlens``.
- **No flash-attn requirement, any head count** (see :mod:`seqpack.parallel.heads`).
"""

from __future__ import annotations

import math
from typing import Sized

import torch

from ..batch import IGNORE_INDEX
from ..parallel.comm import all_reduce_sum, gather_sequence, group_rank, group_size
from ..parallel.topology import ParallelDims, init_topology

_TOPOLOGY: ParallelDims | None = None  # the XTuner-style slot; the core path never reads it


def init_sequence_parallel(sequence_parallel_size: int = 1) -> ParallelDims:
    """Initialise (from torchrun's environment) and remember the topology with SP degree ``sequence_parallel_size``."""
    global _TOPOLOGY
    _TOPOLOGY = init_topology(sp=sequence_parallel_size)
    return _TOPOLOGY


def _topology() -> ParallelDims:
    if _TOPOLOGY is None:
        raise ValueError("sequence parallel is not initialised; call init_sequence_parallel(sequence_parallel_size) "
                         "first (or use seqpack.parallel.init_topology and pass groups explicitly)")
    return _TOPOLOGY


def get_sequence_parallel_group():
    """The SP process group (None when the SP degree is 1)."""
    return _topology().sp_group if _TOPOLOGY is not None else None


def get_sequence_parallel_world_size() -> int:
    return _TOPOLOGY.sp_size if _TOPOLOGY is not None else 1


def get_sequence_parallel_rank() -> int:
    return _TOPOLOGY.sp_rank if _TOPOLOGY is not None else 0


def get_data_parallel_group():
    return _TOPOLOGY.dp_group if _TOPOLOGY is not None else None


def get_data_parallel_world_size() -> int:
    return _TOPOLOGY.dp_size if _TOPOLOGY is not None else 1


def get_data_parallel_rank() -> int:
    return _TOPOLOGY.dp_rank if _TOPOLOGY is not None else 0


class SequenceParallelSampler(torch.utils.data.Sampler):
    """Distributed sampler over the **data-parallel** ranks: all ranks of one SP group get the same indices
    (they hold slices of the same rows); different DP groups get disjoint indices. Call ``set_epoch`` each epoch.

    ``round_up=True`` repeats leading indices so every DP rank gets ``ceil(len/dp)`` samples (XTuner's default).
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int | None = None, round_up: bool = True):
        self.dataset, self.shuffle, self.round_up = dataset, shuffle, round_up
        self.seed = 0 if seed is None else seed  # XTuner syncs a random seed; a fixed default is reproducible
        self.epoch = 0
        self.rank, self.world_size = get_data_parallel_rank(), get_data_parallel_world_size()
        n = len(dataset)
        self.num_samples = math.ceil(n / self.world_size) if round_up else math.ceil((n - self.rank) / self.world_size)
        self.total_size = self.num_samples * self.world_size if round_up else n

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.round_up and n:
            indices = (indices * math.ceil(self.total_size / n))[: self.total_size]
        return iter(indices[self.rank: self.total_size: self.world_size])

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def pad_for_sequence_parallel(tokens, labels=None, position_ids=None, attention_mask=None, tokens_pad_index=0,
                              labels_pad_index=IGNORE_INDEX, position_ids_pad_index=0, attention_mask_pad_index=0):
    """Right-pad [B, T] tensors to a multiple of the SP degree (XTuner's signature; returns the same 4-tuple).

    For packed rows prefer :func:`seqpack.parallel.shard_batch`, which also adds the pad segment to
    ``cu_seqlens`` and restarts its positions at 0 (XTuner's constant-0 positions are only safe without varlen).
    """
    extra = -tokens.shape[1] % get_sequence_parallel_world_size()
    if extra == 0:
        return tokens, labels, position_ids, attention_mask

    def pad(x, value):
        return None if x is None else torch.cat([x, x.new_full((x.shape[0], extra), value)], dim=1)

    return (pad(tokens, tokens_pad_index), pad(labels, labels_pad_index), pad(position_ids, position_ids_pad_index),
            pad(attention_mask, attention_mask_pad_index))


def split_for_sequence_parallel(input: torch.Tensor, dim: int = 1, sp_group=None) -> torch.Tensor:
    """This SP rank's contiguous slice of ``input`` along ``dim`` (pass *shifted* labels; see module docstring)."""
    sp_group = sp_group if sp_group is not None else get_sequence_parallel_group()
    S = group_size(sp_group)
    if input.shape[dim] % S:
        raise ValueError(f"cannot split dimension {dim} of shape {tuple(input.shape)} over sp={S} ranks; "
                         "pad first with pad_for_sequence_parallel")
    return input.chunk(S, dim=dim)[group_rank(sp_group)] if S > 1 else input


def gather_for_sequence_parallel(input: torch.Tensor, dim: int = 1, sp_group=None) -> torch.Tensor:
    """All-gather the SP shards along ``dim`` (differentiable; backward keeps the local slice)."""
    return gather_sequence(input, sp_group if sp_group is not None else get_sequence_parallel_group(), dim)


class _ReduceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean_loss, loss_scale, group):
        scale = loss_scale.detach().to(mean_loss.dtype).reshape(())
        weighted = all_reduce_sum((mean_loss.detach() * scale).reshape(1).clone(), group)
        total = all_reduce_sum(scale.reshape(1).clone(), group)
        ctx.weight = scale / total.clamp(min=1)[0]
        return (weighted / total.clamp(min=1))[0]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.weight, None, None


def reduce_sequence_parallel_loss(mean_loss: torch.Tensor, loss_scale, sp_group=None) -> torch.Tensor:
    """Token-weighted mean of the SP ranks' ``mean_loss`` (``loss_scale`` = this rank's valid-token count):
    the same value on every SP rank, and — unlike XTuner — a backward that optimises it."""
    sp_group = sp_group if sp_group is not None else get_sequence_parallel_group()
    if group_size(sp_group) == 1:
        return mean_loss
    scale = torch.as_tensor(loss_scale, device=mean_loss.device)
    return _ReduceLoss.apply(torch.nan_to_num(mean_loss), scale, sp_group)


def dispatch_modules(model, use_varlen_attn: bool = True, backend: str = "auto"):
    """Switch ``model`` to seqpack attention with the remembered SP group (XTuner's ``dispatch_modules``).

    seqpack attention is always varlen-exact; ``use_varlen_attn=False`` is refused because a packed row without
    document boundaries would attend across documents.
    """
    if not use_varlen_attn:
        raise ValueError("dispatch_modules(use_varlen_attn=False) is not supported: seqpack always attends within "
                         "documents; pass the packed batch's cu_seq_lens (PackedBatch.model_inputs())")
    from ..attention.hf import dispatch

    return dispatch(model, backend=backend, sp_group=get_sequence_parallel_group())


__all__ = ["SequenceParallelSampler", "dispatch_modules", "gather_for_sequence_parallel", "get_data_parallel_group",
           "get_data_parallel_rank", "get_data_parallel_world_size", "get_sequence_parallel_group",
           "get_sequence_parallel_rank", "get_sequence_parallel_world_size", "init_sequence_parallel",
           "pad_for_sequence_parallel", "reduce_sequence_parallel_loss", "split_for_sequence_parallel"]

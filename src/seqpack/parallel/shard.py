"""Split a packed row across the S ranks of a sequence-parallel group.

Shape legend: T tokens of the padded row, S SP degree, n documents.

The row is padded to a multiple of S with one extra dummy segment (its own ``cu_seqlens`` entry, labels -100,
positions restarting at 0), then ``input_ids``, ``shift_labels`` and ``position_ids`` are cut into S contiguous
slices of T/S tokens. ``cu_seqlens`` and ``max_seqlen`` stay global: documents freely cross shard boundaries,
because attention runs over the whole row after the all-to-all. Labels were shifted when the row was packed,
i.e. **before** the split, so the target of a shard's last token (the first token of the next shard) is kept —
XTuner's legacy path split unshifted labels and lost ``S - 1`` targets per row.

    >>> from seqpack.batch import pack
    >>> s = shard_batch(pack([[5, 6, 7], [8, 9]]), sp_size=2, sp_rank=1)
    >>> s.input_ids.tolist(), s.shift_labels.tolist(), s.position_ids.tolist(), s.cu_seqlens.tolist()
    ([[8, 9, 0]], [[9, -100, -100]], [[0, 1, 0]], [0, 3, 5, 6])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import IGNORE_INDEX, PackedBatch, positions_from_cu_seqlens
from .ring_split import SplitPlan


@dataclass
class ShardedBatch:
    """One rank's slice of a packed row; drop-in for :class:`~seqpack.batch.PackedBatch` in the training loop.

    input_ids     [1, T/S] int64  this rank's contiguous slice
    shift_labels  [1, T/S] int64  targets of those tokens (shifted before the split)
    position_ids  [1, T/S] int64  the slice of the row's positions
    cu_seqlens    [n+1]    int32  GLOBAL document boundaries 0 .. T (including a dummy pad segment)
    max_seqlen    int             GLOBAL longest segment
    sp_size, sp_rank              S and this rank's logical index in the SP group
    ring_size                     C, the ring (context) degree of S = C x U; >1: the balanced chunk split
                                  (:mod:`seqpack.parallel.ring_split`), so this rank's tokens are chunks of the row
    """

    input_ids: torch.Tensor
    shift_labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    sp_size: int = 1
    sp_rank: int = 0
    ring_size: int = 1

    @property
    def num_tokens(self) -> int:
        """Local tokens, T/S."""
        return self.input_ids.shape[1]

    @property
    def total_tokens(self) -> int:
        """Tokens of the whole padded row, T."""
        return int(self.cu_seqlens[-1])

    @property
    def num_valid_targets(self) -> int:
        """Valid targets of this shard (sum over the SP group = the row's count)."""
        return int((self.shift_labels != IGNORE_INDEX).sum())

    def model_inputs(self, with_labels: bool = False) -> dict:
        """Keyword arguments for ``model(**...)``, as :meth:`PackedBatch.model_inputs` (global metadata)."""
        return PackedBatch.model_inputs(self, with_labels)

    def map_tensors(self, fn) -> "ShardedBatch":
        """A copy with ``fn`` applied to every tensor, as :meth:`PackedBatch.map_tensors`."""
        return PackedBatch.map_tensors(self, fn)

    def to(self, device) -> "ShardedBatch":
        return ShardedBatch(self.input_ids.to(device), self.shift_labels.to(device), self.position_ids.to(device),
                            self.cu_seqlens.to(device), self.max_seqlen, self.sp_size, self.sp_rank, self.ring_size)


def pad_to_multiple(batch: PackedBatch, multiple: int, pad_token_id: int = 0) -> PackedBatch:
    """Append one dummy segment (labels -100) so the row length is a multiple of ``multiple``; returns ``batch``
    itself when it already is."""
    T = batch.num_tokens
    extra = -T % multiple
    if extra == 0:
        return batch
    cu = batch.cu_seqlens.tolist() + [T + extra]
    dev = batch.input_ids.device
    return PackedBatch(
        input_ids=torch.cat([batch.input_ids, torch.full((1, extra), pad_token_id, dtype=torch.long, device=dev)], 1),
        shift_labels=torch.cat([batch.shift_labels,
                                torch.full((1, extra), IGNORE_INDEX, dtype=torch.long, device=dev)], 1),
        position_ids=positions_from_cu_seqlens(cu, device=dev)[None],
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=batch.cu_seqlens.device),
        max_seqlen=max(batch.max_seqlen, extra),
    )


def shard_batch(batch: PackedBatch, sp_size: int, sp_rank: int, pad_token_id: int = 0,
                ring_size: int = 1) -> ShardedBatch:
    """Pad ``batch`` to a multiple of ``sp_size`` and return slice ``sp_rank`` (every rank of the SP group calls
    this with the same row). Raises ValueError for a degree/rank out of range or a row shorter than S.
    With ``ring_size`` C > 1 (2D: S = C ring ranks x S/C Ulysses ranks) the row is padded to a multiple of 16 S
    and split in chunks balanced by attention work (:mod:`seqpack.parallel.ring_split`); ``sp_rank`` is the
    logical rank ``ring_rank * (S/C) +
    ulysses_rank`` (``ParallelDims.sp_rank``).
    A :class:`~seqpack.multimodal.MultimodalBatch` shards itself (its images are merged before the split)."""
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise ValueError(f"invalid sequence parallel position sp_rank={sp_rank} of sp_size={sp_size}; "
                         "need sp_size >= 1 and 0 <= sp_rank < sp_size")
    if ring_size < 1 or sp_size % ring_size:
        ok = [d for d in range(1, sp_size + 1) if sp_size % d == 0]
        raise ValueError(f"ring_size={ring_size} must be a positive divisor of sp_size={sp_size} "
                         f"(sp = ring x ulysses); use ring_size in {ok}")
    if not isinstance(batch, PackedBatch) and hasattr(batch, "shard"):
        return batch.shard(sp_size, sp_rank, pad_token_id, ring_size)  # a multimodal row: split after its image merge
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"shard_batch needs a seqpack PackedBatch (seqpack.pack(...)), got {type(batch).__name__}")
    if batch.num_tokens < sp_size:
        raise ValueError(f"sequence parallel degree sp={sp_size} is larger than the packed row ({batch.num_tokens} "
                         f"tokens); pack longer rows (seq_len x micro_bsz >= sp) or use sp <= {batch.num_tokens}")
    plan = SplitPlan(ring=ring_size, ulysses=sp_size // ring_size)
    full = pad_to_multiple(batch, plan.multiple, pad_token_id)
    cut = plan.cut(full.cu_seqlens.tolist(), sp_rank, full.input_ids.device)
    return ShardedBatch(
        input_ids=full.input_ids[:, cut],
        shift_labels=full.shift_labels[:, cut],
        position_ids=full.position_ids[:, cut],
        cu_seqlens=full.cu_seqlens,
        max_seqlen=full.max_seqlen,
        sp_size=sp_size,
        sp_rank=sp_rank,
        ring_size=ring_size,
    )

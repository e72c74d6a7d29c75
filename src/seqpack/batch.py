"""The packed batch: many documents in one row, no padding waste, no attention across documents.

Shape legend: T tokens in the row, n documents (a trailing pad segment counts as one).

    >>> b = pack([[5, 6, 7], [8, 9]])
    >>> b.input_ids.tolist(), b.shift_labels.tolist()
    ([[5, 6, 7, 8, 9]], [[6, 7, -100, 9, -100]])
    >>> b.position_ids.tolist(), b.cu_seqlens.tolist(), b.max_seqlen
    ([[0, 1, 2, 0, 1]], [0, 3, 5], 3)
"""

from __future__ import annotations

import copy

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
TENSOR_FIELDS = ("input_ids", "shift_labels", "position_ids", "cu_seqlens")  # of PackedBatch and ShardedBatch


@dataclass
class PackedBatch:
    """One packed row: the data contract every part of seqpack shares.

    input_ids     [1, T] int64  documents concatenated, a trailing pad segment may follow
    shift_labels  [1, T] int64  target of position t; -100 at document ends, no-loss tokens and padding
    position_ids  [1, T] int64  restart at 0 at every document start
    cu_seqlens    [n+1]  int32  document boundaries 0 .. T
    max_seqlen    int           longest document (host int, no device sync)
    """

    input_ids: torch.Tensor
    shift_labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    def __post_init__(self):
        validate_packed(self.input_ids, self.position_ids, self.cu_seqlens, self.max_seqlen, self.shift_labels)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_valid_targets(self) -> int:
        """Tokens that carry a loss target (the denominator of the token-mean loss)."""
        return int((self.shift_labels != IGNORE_INDEX).sum())

    def doc_lengths(self) -> list[int]:
        return self.cu_seqlens.diff().tolist()

    def model_inputs(self, with_labels: bool = False) -> dict:
        """Keyword arguments for ``model(**...)``: ids, positions and the varlen metadata transformers forwards
        to the attention function. ``with_labels=True`` adds ``labels``/``shift_labels`` so the model computes
        its own (identical) loss."""
        inputs = dict(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            cu_seq_lens_q=self.cu_seqlens,
            cu_seq_lens_k=self.cu_seqlens,
            max_length_q=self.max_seqlen,
            max_length_k=self.max_seqlen,
        )
        if with_labels:
            inputs.update(labels=self.shift_labels, shift_labels=self.shift_labels)
        return inputs

    def map_tensors(self, fn) -> "PackedBatch":
        """A copy with ``fn`` applied to every tensor, e.g. ``lambda t: t.to(device, non_blocking=True)`` or
        ``torch.Tensor.pin_memory``; not re-validated (the batch was checked when it was made, and a check on the
        device would make the host wait)."""
        out = copy.copy(self)
        for name in TENSOR_FIELDS:
            setattr(out, name, fn(getattr(self, name)))
        return out

    def to(self, device) -> "PackedBatch":
        return PackedBatch(
            input_ids=self.input_ids.to(device),
            shift_labels=self.shift_labels.to(device),
            position_ids=self.position_ids.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            max_seqlen=self.max_seqlen,
        )


def validate_packed(input_ids, position_ids, cu_seqlens, max_seqlen=None, shift_labels=None) -> list[int]:
    """Check the packed-batch invariants; return cu_seqlens as a host list. Raises ValueError naming the problem."""
    if input_ids is not None and (input_ids.dim() != 2 or input_ids.shape[0] != 1):
        raise ValueError(
            f"packed input must have batch dimension 1 (shape [1, T]), got input_ids of shape {tuple(input_ids.shape)}; "
            "concatenate the rows into one (micro_bsz packs form one row)"
        )
    T = input_ids.shape[1] if input_ids is not None else position_ids.shape[-1]
    cu = check_cu_seqlens(cu_seqlens, T)
    if max_seqlen is not None and max_seqlen != max(b - a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"max_seqlen={max_seqlen} but the longest document in cu_seqlens has "
                         f"{max(b - a for a, b in zip(cu, cu[1:]))} tokens")
    if position_ids is not None:
        if tuple(position_ids.shape) != (1, T):
            raise ValueError(f"position_ids must have shape [1, T] = [1, {T}], got {tuple(position_ids.shape)}")
        expected = positions_from_cu_seqlens(cu, device=position_ids.device)
        if not torch.equal(position_ids[0], expected):
            bad = int((position_ids[0] != expected).nonzero()[0])
            raise ValueError(
                f"position_ids inconsistent with cu_seqlens at token {bad}: got {int(position_ids[0, bad])}, "
                f"expected {int(expected[bad])} (positions must restart at 0 at every cu_seqlens boundary)"
            )
    if shift_labels is not None and tuple(shift_labels.shape) != (1, T):
        raise ValueError(f"shift_labels must have shape [1, T] = [1, {T}], got {tuple(shift_labels.shape)}")
    return cu


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """cu_seqlens must be a 1-D tensor 0 = c0 < c1 < ... < cn = total. Returns it as a host list."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries [0, ..., T], got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]} (cu_seqlens={_short(cu)})")
    for i in range(1, len(cu)):
        if cu[i] <= cu[i - 1]:
            raise ValueError(f"cu_seqlens must be strictly increasing, but cu_seqlens[{i}]={cu[i]} <= "
                             f"cu_seqlens[{i - 1}]={cu[i - 1]} (cu_seqlens={_short(cu)})")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at T={total} (the row length), got {cu[-1]} (cu_seqlens={_short(cu)})")
    return cu


def positions_from_cu_seqlens(cu: Sequence[int], device=None) -> torch.Tensor:
    """[T] int64 positions restarting at 0 at each boundary."""
    cu_np = np.asarray(cu, dtype=np.int64)
    positions = np.arange(cu_np[-1], dtype=np.int64) - np.repeat(cu_np[:-1], np.diff(cu_np))
    return torch.from_numpy(positions).to(device)


def _token_ids(doc, i: int) -> torch.Tensor:
    """Document ``i`` as a 1-D int64 tensor; TypeError for non-integer ids, ValueError for other shapes."""
    d = doc if isinstance(doc, torch.Tensor) else torch.as_tensor(doc)
    if d.numel() == 0:
        raise ValueError(f"document {i} is empty; every packed document needs at least one token")
    if d.dim() != 1:
        raise ValueError(f"document {i} has shape {tuple(d.shape)}; a document is a 1-D sequence of token ids "
                         "(for a 2-D tensor of documents pass list(tensor), one document per row)")
    if d.dtype.is_floating_point or d.dtype.is_complex or d.dtype == torch.bool:
        raise TypeError(f"document {i} holds {d.dtype} values; token ids must be integers (e.g. ids.long())")
    if int(d.min()) < 0:
        raise ValueError(f"document {i} has a negative token id ({int(d.min())}) at position "
                         f"{int((d < 0).nonzero()[0])}; ids must be >= 0 (no-loss tokens go in loss_masks)")
    return d.long()


def length_buckets(lengths: list[int], min_fill: float = 0.75) -> list[list[int]]:
    """Group document indices so that every document in a bucket has at least ``min_fill`` of the bucket's
    longest length (bounds the padded work to 1/min_fill^2 of the exact work). Longest buckets first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and lengths[i] >= min_fill * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def pack(
    docs: Sequence[Sequence[int] | torch.Tensor],
    loss_masks: Sequence[Sequence[bool] | torch.Tensor] | None = None,
    pad_to: int | None = None,
    pad_token_id: int = 0,
) -> PackedBatch:
    """Pack documents into one row.

    docs        list of token-id lists or 1-D tensors (each at least one token)
    loss_masks  optional, one per doc: True where the token is a target that carries loss (e.g. False on the
                prompt). The label of position t is token t+1 when token t+1's mask is True.
    pad_to      optional target length T; the remainder becomes one pad segment with its own cu_seqlens entry
                and -100 labels.

        >>> pack([[1, 2], [3]], loss_masks=[[True, False], [True]], pad_to=5).shift_labels.tolist()
        [[-100, -100, -100, -100, -100]]
    """
    if len(docs) == 0:
        raise ValueError("pack() got an empty document list; give at least one document")
    if loss_masks is not None and len(loss_masks) != len(docs):
        raise ValueError(f"pack() got {len(docs)} documents but {len(loss_masks)} loss masks; give one mask per document")
    ids, labels, lengths = [], [], []
    for i, doc in enumerate(docs):
        d = _token_ids(doc, i)
        lab = torch.full_like(d, IGNORE_INDEX)
        lab[:-1] = d[1:]
        if loss_masks is not None:
            m = torch.as_tensor(loss_masks[i])
            if m.dim() != 1:
                raise ValueError(f"loss mask {i} has shape {tuple(m.shape)}; a loss mask is 1-D, one entry per token")
            m = m.to(torch.bool)
            if m.numel() != d.numel():
                raise ValueError(f"loss mask {i} has {m.numel()} entries but document {i} has {d.numel()} tokens")
            lab[:-1][~m[1:]] = IGNORE_INDEX
        ids.append(d)
        labels.append(lab)
        lengths.append(d.numel())
    total = sum(lengths)
    if pad_to is not None:
        if pad_to < total:
            raise ValueError(f"pad_to={pad_to} is shorter than the {total} tokens of the documents; raise pad_to or "
                             "pack fewer documents")
        if pad_to > total:
            ids.append(torch.full((pad_to - total,), pad_token_id, dtype=torch.long))
            labels.append(torch.full((pad_to - total,), IGNORE_INDEX, dtype=torch.long))
            lengths.append(pad_to - total)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return PackedBatch(
        input_ids=torch.cat(ids)[None],
        shift_labels=torch.cat(labels)[None],
        position_ids=positions_from_cu_seqlens(cu)[None],
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(lengths),
    )


def _short(cu: list[int]) -> str:
    return str(cu) if len(cu) <= 12 else f"[{', '.join(map(str, cu[:6]))}, ..., {', '.join(map(str, cu[-3:]))}]"

"""Hugging Face / TRL batches and seqpack packed batches.

Shape legend: B rows of a padded batch, L their padded length, T tokens of the packed row, n documents.

- :class:`DataCollatorForPacking`: tokenized examples (with optional loss masks) -> one packed row, as the keyword
  arguments ``model(**batch)`` and the Trainer need (``input_ids``, ``position_ids``, ``cu_seq_lens_q/k``,
  ``max_length_q/k``, ``labels``, ``shift_labels``).
- :func:`packed_batch_from_inputs`: any batch a Hugging Face or TRL collator emits — padded ``[B, L]`` with an
  ``attention_mask`` (left or right padding), TRL's padding-free row (``position_ids`` / ``cu_seq_lens_q``), or
  this module's own — -> :class:`~seqpack.batch.PackedBatch`, so the sequence-parallel Trainer can shard it.

Labels follow the Hugging Face convention on the way in (``labels[t]`` is the token at ``t`` or -100, the model
shifts) and seqpack's on the way out (``shift_labels[t]`` is the target of position ``t``, shifted inside each
document, -100 at every document's last token). The packed output carries ``labels`` equal to ``shift_labels``:
transformers' causal-LM loss, TRL's fused LM head and the Trainer's token count all read ``shift_labels`` first,
and only need ``labels`` to be present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..batch import IGNORE_INDEX, PackedBatch, positions_from_cu_seqlens
from ..parallel.shard import pad_to_multiple

LOSS_MASK_KEYS = ("assistant_masks", "completion_mask")

# Keys a batch from transformers', TRL's or seqpack's collators may hold, and that a packed row replaces.
PACKABLE_KEYS = frozenset({"input_ids", "labels", "shift_labels", "attention_mask", "position_ids", "cu_seq_lens_q",
                           "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "seq_lengths"})


@dataclass
class DataCollatorForPacking:
    """Pack every example of a batch into one row ``[1, T]`` with exact document boundaries.

    Each example is a mapping with ``input_ids`` (list or 1-D tensor) and optionally

    - ``labels``: Hugging Face labels aligned with ``input_ids`` (-100 = no loss); default ``input_ids``;
    - ``assistant_masks`` / ``completion_mask`` (TRL, ``tokenizer.apply_chat_template(...,
      return_assistant_tokens_mask=True)``): 1 where the token carries loss; combined with ``labels``;
    - ``seq_lengths``: the example is itself several documents (TRL's ``packing_strategy="bfd"`` rows).

    Other keys (``messages``, ``attention_mask``, ``token_type_ids``, ...) are ignored.

    pad_token_id        id of the padding segment appended for ``pad_to_multiple_of``
    pad_to_multiple_of  pad the row to a multiple of this (e.g. the SP degree) with one dummy segment (labels -100)

        >>> collate = DataCollatorForPacking()
        >>> b = collate([{"input_ids": [5, 6, 7], "assistant_masks": [0, 1, 1]}, {"input_ids": [8, 9]}])
        >>> b["input_ids"].tolist(), b["shift_labels"].tolist(), b["cu_seq_lens_q"].tolist()
        ([[5, 6, 7, 8, 9]], [[6, 7, -100, 9, -100]], [0, 3, 5])

    Use it with ``attn_implementation="seqpack"`` (or :func:`seqpack.dispatch`), and with
    ``TrainingArguments(remove_unused_columns=False)`` so mask columns reach the collator.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict:
        return self.pack(examples).model_inputs(with_labels=True)

    def pack(self, examples: Sequence[Mapping[str, Any]]) -> PackedBatch:
        """The same examples as a :class:`~seqpack.batch.PackedBatch`."""
        if len(examples) == 0:
            raise ValueError("DataCollatorForPacking got an empty batch; give at least one example")
        ids, labels, lengths = [], [], []
        for i, example in enumerate(examples):
            if not isinstance(example, Mapping) or "input_ids" not in example:
                raise ValueError(f"example {i} of the batch has no 'input_ids' (keys: {_keys(example)}); tokenize "
                                 "the dataset first")
            doc_ids = _as_1d(example["input_ids"], f"example {i} 'input_ids'")
            doc_labels = _as_1d(example.get("labels", doc_ids), f"example {i} 'labels'").clone()
            if doc_labels.shape != doc_ids.shape:
                raise ValueError(f"example {i}: 'labels' has {doc_labels.numel()} entries but 'input_ids' has "
                                 f"{doc_ids.numel()}")
            for key in LOSS_MASK_KEYS:
                if key in example:
                    mask = _as_1d(example[key], f"example {i} {key!r}")
                    if mask.shape != doc_ids.shape:
                        raise ValueError(f"example {i}: {key!r} has {mask.numel()} entries but 'input_ids' has "
                                         f"{doc_ids.numel()}")
                    doc_labels[mask == 0] = IGNORE_INDEX
            seq_lengths = example.get("seq_lengths")
            parts = [doc_ids.numel()] if seq_lengths is None else [int(n) for n in seq_lengths]
            if sum(parts) != doc_ids.numel() or min(parts) < 1:
                raise ValueError(f"example {i}: 'seq_lengths' {parts} must be positive and sum to the "
                                 f"{doc_ids.numel()} tokens of 'input_ids'")
            ids.append(doc_ids)
            labels.append(doc_labels)
            lengths.extend(parts)
        batch = packed_from_documents(torch.cat(ids), torch.cat(labels), lengths)
        if self.pad_to_multiple_of:
            batch = pad_to_multiple(batch, self.pad_to_multiple_of, self.pad_token_id)
        return batch


def packed_from_documents(input_ids: torch.Tensor, labels: torch.Tensor, lengths: Sequence[int]) -> PackedBatch:
    """Concatenated documents [T] with Hugging Face labels [T] (unshifted) and their lengths -> PackedBatch.
    The target of position t is ``labels[t + 1]`` when t + 1 is in the same document, else -100."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    shift = torch.full_like(labels, IGNORE_INDEX)
    shift[:-1] = labels[1:]
    shift[torch.tensor(cu[1:]) - 1] = IGNORE_INDEX  # a document's last token has no target
    return PackedBatch(input_ids=input_ids[None], shift_labels=shift[None],
                       position_ids=positions_from_cu_seqlens(cu)[None], cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                       max_seqlen=max(b - a for a, b in zip(cu, cu[1:])))


def packed_batch_from_inputs(inputs: Mapping[str, Any]) -> PackedBatch:
    """A collated batch (see the module docstring) -> one packed row. Padding (``attention_mask == 0``) is dropped;
    documents come from ``cu_seq_lens_q``, else from restarting ``position_ids``, else one per row. Raises
    ValueError for keys that cannot be packed (e.g. ``pixel_values``) or inconsistent fields."""
    unknown = sorted(set(inputs) - PACKABLE_KEYS)
    if unknown:
        raise ValueError(f"batch keys {unknown} cannot be packed into one row; seqpack's Trainer integration takes "
                         f"text batches with keys among {sorted(PACKABLE_KEYS)}")
    if "input_ids" not in inputs:
        raise ValueError(f"the batch has no 'input_ids' (keys: {sorted(inputs)})")
    if "labels" not in inputs and "shift_labels" not in inputs:
        raise ValueError("the batch has no 'labels'; a causal-LM collator must emit labels (-100 = no loss)")
    ids = inputs["input_ids"].cpu()
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(ids.shape)}")
    B, L = ids.shape
    mask = inputs.get("attention_mask")
    positions = inputs.get("position_ids")
    pre_shifted = "shift_labels" in inputs
    labels = (inputs["shift_labels"] if pre_shifted else inputs["labels"]).cpu()
    for name, t in (("labels", labels), ("attention_mask", mask), ("position_ids", positions)):
        if t is not None and tuple(t.shape) != (B, L):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {(B, L)}")
    cu_given = inputs.get("cu_seq_lens_q")
    if cu_given is not None and (B != 1 or mask is not None):
        raise ValueError("cu_seq_lens_q is only meaningful for one padding-free row [1, T] without attention_mask")

    all_ids, all_labels, lengths = [], [], []
    for b in range(B):
        keep = torch.ones(L, dtype=torch.bool) if mask is None else mask[b].cpu().bool()
        row_ids, row_labels = ids[b][keep], labels[b][keep]
        if row_ids.numel() == 0:
            continue
        if cu_given is not None:
            cu = cu_given.cpu().tolist()
            if cu[0] != 0 or cu[-1] != L:
                raise ValueError(f"cu_seq_lens_q must run from 0 to the row length {L}, got {cu}")
        elif positions is not None:
            starts = (positions[b].cpu()[keep] == 0).nonzero().reshape(-1).tolist()
            cu = ([0] if not starts or starts[0] != 0 else []) + starts + [row_ids.numel()]
        else:
            cu = [0, row_ids.numel()]
        if cu_given is not None and positions is not None:
            expected = positions_from_cu_seqlens(cu)
            if not torch.equal(positions[0].cpu(), expected):
                raise ValueError("position_ids do not restart at 0 at every cu_seq_lens_q boundary; give "
                                 "consistent packed metadata (or only one of them)")
        all_ids.append(row_ids)
        all_labels.append(row_labels)
        lengths.extend(b - a for a, b in zip(cu, cu[1:]))
    if not all_ids:
        raise ValueError("every row of the batch is padding (attention_mask is all 0)")
    if not pre_shifted:
        return packed_from_documents(torch.cat(all_ids), torch.cat(all_labels), lengths)
    batch = packed_from_documents(torch.cat(all_ids), torch.cat(all_ids), lengths)  # boundaries and positions
    shift = torch.cat(all_labels).clone()
    shift[batch.cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    batch.shift_labels = shift[None]
    return batch


def _as_1d(value, what: str) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D list of ints, got shape {tuple(t.shape)}")
    return t.long()


def _keys(example) -> list:
    return sorted(example) if isinstance(example, Mapping) else [type(example).__name__]

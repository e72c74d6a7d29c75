"""Token-mean causal LM loss over a packed batch.

Shape legend: T tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..batch import IGNORE_INDEX, PackedBatch


def causal_lm_loss(logits: torch.Tensor, batch: PackedBatch | torch.Tensor, num_valid: int | torch.Tensor | None = None):
    """Mean cross-entropy over the valid targets. logits [1, T, V]; ``batch`` a PackedBatch or shift_labels [1, T].

    ``num_valid`` overrides the denominator: pass the valid-target count of the whole optimizer step (all
    micro-batches, all ranks) to get a loss whose gradients add up to the full-step token mean.
    """
    labels = batch.shift_labels if isinstance(batch, PackedBatch) else batch
    total = token_loss_sum(logits, labels)
    denom = (labels != IGNORE_INDEX).sum() if num_valid is None else num_valid
    return total / torch.as_tensor(denom, device=total.device).clamp(min=1)


def token_loss_sum(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over targets != -100 (fp32). logits [..., T, V], shift_labels [..., T] -> scalar."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")

"""TRL's ``SFTTrainer`` with exact packed batches and sequence parallelism (``sp_size=S``); needs ``trl``.

Everything TRL's SFT does — chat templates, ``assistant_only_loss``, ``completion_only_loss``, ``packing`` with
``packing_strategy="bfd"``, ``padding_free`` — happens as usual; each collated batch is then packed into one row and
sharded over the SP group as in :class:`seqpack.hf.SequenceParallelTrainer`. TRL's fused LM head scores the
pre-shifted ``shift_labels`` of each shard, and its loss is normalised by the Trainer's global token count.

    trainer = SequenceParallelSFTTrainer(model=model, args=SFTConfig(..., assistant_only_loss=True,
                                         packing=True, packing_strategy="bfd"), train_dataset=chats,
                                         processing_class=tokenizer, sp_size=2)       # doctest: +SKIP
"""

from __future__ import annotations

from trl import SFTTrainer

from .trainer import SequenceParallelMixin


class SequenceParallelSFTTrainer(SequenceParallelMixin, SFTTrainer):
    """``trl.SFTTrainer`` plus seqpack packing and ``sp_size`` (see :mod:`seqpack.hf.trainer`)."""

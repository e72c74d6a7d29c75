"""seqpack inside transformers' ``Trainer`` and TRL's ``SFTTrainer``.

    import seqpack.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="seqpack")   # exact packed attention
    Trainer(model=model, args=TrainingArguments(..., remove_unused_columns=False), train_dataset=tokenized,
            data_collator=seqpack.hf.DataCollatorForPacking())                           # one packed row per batch
    seqpack.hf.SequenceParallelTrainer(model=model, args=args, train_dataset=tokenized, sp_size=2)   # torchrun
    seqpack.hf.SequenceParallelSFTTrainer(model=model, args=SFTConfig(...), train_dataset=chats, sp_size=2)  # TRL

Files: collator.py (examples / HF and TRL batches -> packed rows), trainer.py (the Trainer integration), sft.py
(TRL), bench (``seqpack bench trainer``, in seqpack/bench/trainer.py).
"""

from .collator import DataCollatorForPacking, packed_batch_from_inputs
from .trainer import SequenceParallelMixin, SequenceParallelTrainer, check_attention_is_used

__all__ = ["DataCollatorForPacking", "SequenceParallelMixin", "SequenceParallelSFTTrainer", "SequenceParallelTrainer",
           "check_attention_is_used", "packed_batch_from_inputs"]


def __getattr__(name):
    if name == "SequenceParallelSFTTrainer":  # needs trl, imported only when asked for
        try:
            from .sft import SequenceParallelSFTTrainer
        except ImportError as e:
            raise ImportError("seqpack.hf.SequenceParallelSFTTrainer needs TRL: pip install 'seqpack[hf]'") from e
        return SequenceParallelSFTTrainer
    raise AttributeError(f"module 'seqpack.hf' has no attribute {name!r}")

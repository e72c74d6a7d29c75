"""Packed batches and sequence parallelism inside transformers' ``Trainer`` and TRL's ``SFTTrainer``.

Shape legend: T tokens of a packed row, S SP degree, W = dp × S processes.

``SequenceParallelTrainer(..., sp_size=S)`` (and ``SequenceParallelSFTTrainer``) under ``torchrun`` with W ranks:

1. topology: :func:`seqpack.init_topology` adopts the process group accelerate created and builds the (dp, sp)
   mesh; S must divide W (ValueError otherwise);
2. model: :func:`seqpack.dispatch` with the SP group, after checking its attention really goes through
   transformers' ``AttentionInterface`` (ValueError otherwise: packing would silently mix documents);
3. data: every rank of one SP group reads the same examples, DP groups disjoint ones (a ``DistributedSampler``
   over the dp groups; accelerate's own per-process sharding is turned off);
4. batches: each collated batch — padded, TRL padding-free, or :class:`~seqpack.hf.DataCollatorForPacking`'s — is
   turned into one packed row and sharded (:func:`seqpack.shard_batch`): ``[1, T] -> [1, T/S]``, labels shifted first;
5. loss: the Trainer's own exact gradient-accumulation path. ``num_items_in_batch`` is counted on the shards of all
   micro-batches of the optimizer step and summed over all W ranks (``average_tokens_across_devices``) — the
   same global count C as :class:`seqpack.StepLoss`; each micro-batch's loss is ``local CE sum / C × W`` and
   DDP averages gradients over W, so the update is ∇(step CE sum / C): one process training on the whole step.
   The logged loss (mean over ranks of the accumulated ``loss``) is exactly the step's token-mean loss.
6. evaluation: each packed eval batch's token-mean loss, summed over its SP group (loss only: ``compute_metrics``
   would see sharded logits and is refused).

With S = 1 the same class is a packing Trainer: any batch becomes one exact packed row.

Refused with a message: with S > 1, DeepSpeed and the Trainer's FSDP (use :func:`seqpack.apply_fsdp` with seqpack's
own loop); always, ``label_smoothing_factor`` and ``compute_loss_func`` (they would re-shift the shifted labels); with
several processes, ``average_tokens_across_devices=False``, length-grouped samplers, iterable datasets and
``dispatch_batches``.
"""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler
from transformers import Trainer

from ..attention import dispatch
from ..batch import IGNORE_INDEX
from ..ops.loss import token_loss_sum
from ..parallel import init_topology, shard_batch
from ..parallel.comm import all_reduce_sum
from .collator import LOSS_MASK_KEYS, packed_batch_from_inputs


class SequenceParallelMixin:
    """Adds ``sp_size`` / ``ring_size`` / ``attn_backend`` keyword arguments to a ``transformers.Trainer`` subclass
    (see the module docstring). ``ring_size=C`` > 1: 2D sequence parallel, ``sp_size`` = C ring ranks x
    ``sp_size / C`` Ulysses ranks (packed ring attention; the SP degree may then exceed the head count).
    ``self.topology`` is the :class:`~seqpack.parallel.ParallelDims` of the run."""

    def __init__(self, *args, sp_size: int = 1, ring_size: int = 1, attn_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)  # TrainingArguments has created the process group by now (torchrun)
        self.topology = init_topology(sp=sp_size, ring=ring_size)  # ValueError for degrees that do not fit
        self.attn_backend = attn_backend
        self._check_supported()
        self._dispatch(self.model)
        if self.topology.world_size > 1:
            # plain all-gather of eval losses: gather_for_metrics trims the last batch by accelerate's own
            # per-process batch accounting, which the dp sampler replaces
            self.gather_function = self.accelerator.gather

    def _dispatch(self, model):
        return check_attention_is_used(model, backend=self.attn_backend, **self.topology.attention_groups())

    def call_model_init(self, trial=None):
        """``model_init`` models (re-created by ``train()``) get the same attention and SP group."""
        model = super().call_model_init(trial)
        return self._dispatch(model) if hasattr(self, "topology") else model  # in __init__: dispatched after it

    def _check_supported(self) -> None:
        args, sp, world = self.args, self.topology.sp_size, self.topology.world_size
        name = type(self).__name__
        if args.world_size != world:
            raise ValueError(f"{name}: TrainingArguments see {args.world_size} processes but the process group has "
                             f"{world}; launch with torchrun and let TrainingArguments create the group")
        if sp > 1 and self.is_deepspeed_enabled:
            raise ValueError(f"{name}: sp_size={sp} with DeepSpeed is not supported; use DDP (the default)")
        if sp > 1 and self.is_fsdp_enabled:
            raise ValueError(f"{name}: sp_size={sp} with the Trainer's fsdp setting is not supported; use DDP (the "
                             "default) or seqpack's own loop (seqpack train / seqpack.apply_fsdp)")
        if args.label_smoothing_factor:
            raise ValueError(f"{name}: label_smoothing_factor={args.label_smoothing_factor} is not supported "
                             "(labels are shifted before sharding); set it to 0")
        if self.compute_loss_func is not None:
            raise ValueError(f"{name}: compute_loss_func is not supported; the model's own causal-LM loss is used")
        if not self.model_accepts_loss_kwargs:
            raise ValueError(f"{name}: {type(self.model).__name__}.forward does not accept loss kwargs "
                             "(num_items_in_batch), so the step's loss cannot be normalised by its global token count")
        if world > 1 and not args.average_tokens_across_devices:
            raise ValueError(f"{name}: average_tokens_across_devices=False would normalise each rank's loss by its own "
                             "token count; set it to True (the default)")
        if world > 1 and args.train_sampling_strategy not in ("random", "sequential"):
            raise ValueError(f"{name}: train_sampling_strategy={args.train_sampling_strategy!r} is not supported with "
                             "several processes; use 'random' or 'sequential'")
        if args.n_gpu > 1:
            raise ValueError(f"{name}: torch DataParallel over {args.n_gpu} GPUs is not supported; launch one "
                             "process per GPU with torchrun")

    # ---- data: same examples within an SP group, disjoint across DP groups ----

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        shuffle = self.args.train_sampling_strategy != "sequential"
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return self._dp_sampler(dataset, shuffle, seed)

    def _get_eval_sampler(self, eval_dataset):
        return self._dp_sampler(eval_dataset, shuffle=False, seed=0)

    def _dp_sampler(self, dataset, shuffle: bool, seed: int):
        if not hasattr(dataset, "__len__"):
            if self.topology.world_size > 1:
                raise ValueError(f"{type(self).__name__}: iterable datasets are not supported with several processes "
                                 "(SP ranks must read the same rows); use a map-style dataset")
            return None
        return DistributedSampler(dataset, num_replicas=self.topology.dp_size, rank=self.topology.dp_rank,
                                  shuffle=shuffle, seed=seed, drop_last=self.args.dataloader_drop_last)

    def _get_dataloader(self, *args, **kwargs):
        loader = super()._get_dataloader(*args, **kwargs)
        if self.topology.world_size > 1 and type(loader).__name__ == "DataLoaderDispatcher":
            raise ValueError(f"{type(self).__name__}: accelerator_config.dispatch_batches=True splits rank 0's batches "
                             "over all ranks, but SP ranks need whole rows; leave dispatch_batches unset")
        shard = getattr(loader, "batch_sampler", None)  # accelerate's BatchSamplerShard: the sampler already shards
        if shard is not None and hasattr(shard, "num_processes"):
            shard.num_processes, shard.process_index = 1, 0
        return loader

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [k for k in (*LOSS_MASK_KEYS, "seq_lengths") if k not in self._signature_columns]
        self._signature_columns = list(self._signature_columns) + extra

    # ---- training: packed, sharded micro-batches; the Trainer's global token count ----

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """Up to ``num_batches`` micro-batches, each packed and sharded, and the step's global valid-target count."""
        shards = []
        for _ in range(num_batches):
            try:
                shards.append(self.shard_inputs(next(epoch_iterator)))
            except StopIteration:
                break
        return shards, self._get_num_items_in_batch(shards, device)

    def shard_inputs(self, inputs) -> dict:
        """A collated batch -> this rank's ``[1, T/S]`` slice of its packed row, as model keyword arguments."""
        packed = packed_batch_from_inputs(inputs)
        pad_id = getattr(getattr(self.model, "config", None), "pad_token_id", None) or 0
        shard = shard_batch(packed, self.topology.sp_size, self.topology.sp_rank, pad_token_id=pad_id,
                            ring_size=self.topology.ring_size)
        return shard.model_inputs(with_labels=True)

    # ---- evaluation: exact token-mean loss of each eval batch ----

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.topology.sp_size == 1:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if not prediction_loss_only:
            raise ValueError(f"{type(self).__name__}: with sp_size > 1 evaluation computes the loss only (logits are "
                             "sharded across ranks); drop compute_metrics or set prediction_loss_only=True")
        shard = self._prepare_inputs(self.shard_inputs(inputs))
        labels = shard.pop("labels")
        shard.pop("shift_labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = model(**shard).logits
        stats = torch.stack([token_loss_sum(logits, labels).double(), (labels != IGNORE_INDEX).sum().double()])
        total, count = all_reduce_sum(stats, self.topology.sp_group).tolist()
        return torch.tensor(total / max(count, 1.0), device=logits.device), None, None


def check_attention_is_used(model, backend: str = "auto", sp_group=None, ring_group=None):
    """Refuse models whose attention does not go through transformers' ``AttentionInterface``, then
    :func:`seqpack.dispatch` the model, whose packing probe checks that two tiny packed documents stay apart
    (ValueError otherwise); returns the model."""
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{name} does not support custom attention implementations (its attention, if any, does not "
                         "go through transformers' AttentionInterface), so seqpack cannot keep packed documents "
                         "apart; use a model family listed in the support matrix (docs/reference/models.md)")
    return dispatch(model, backend=backend, sp_group=sp_group, ring_group=ring_group)


class SequenceParallelTrainer(SequenceParallelMixin, Trainer):
    """``transformers.Trainer`` with exact packed batches and Ulysses sequence parallelism (``sp_size=S``) under
    torchrun; see :mod:`seqpack.hf.trainer`.

        trainer = SequenceParallelTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                                          data_collator=DataCollatorForPacking(), sp_size=2)   # doctest: +SKIP
        trainer.train(); trainer.save_model("out")                                             # doctest: +SKIP
    """

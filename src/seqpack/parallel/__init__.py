"""Sequence parallel (Ulysses / InternEvo ISP) and data parallel (FSDP2) for packed batches.

    topo = seqpack.parallel.init_topology(sp=2)                     # torchrun env; no-op with one process
    model = seqpack.parallel.apply_fsdp(seqpack.dispatch(model, sp_group=topo.sp_group), topo)
    shards = [seqpack.parallel.shard_batch(b, topo.sp_size, topo.sp_rank) for b in micro_batches]
    step = seqpack.parallel.StepLoss(shards, topo.world_group)      # global valid-target count of the step
    for s in shards:
        step(model(**s.model_inputs()).logits, s).backward()
    optimizer.step(); print(step.value())                           # same loss on every rank

2D (Ulysses x packed ring attention): ``init_topology(sp=8, ring=2)``, ``seqpack.dispatch(model,
**topo.attention_groups())``, ``shard_batch(b, topo.sp_size, topo.sp_rank, ring_size=topo.ring_size)``.

Files: topology.py (ParallelDims, DeviceMesh), comm.py (differentiable all-to-all / gather, the ring send),
heads.py (Ulysses attention and head layouts), shard.py (pad + split of a packed row), ring_split.py (which chunks
each ring rank holds), loss.py (global token mean), fsdp.py (FSDP2). Ring attention itself:
:mod:`seqpack.attention.ring`. XTuner's API names: :mod:`seqpack.compat.xtuner`.
"""

from .comm import gather_sequence, heads_to_seq, seq_to_heads
from .fsdp import apply_fsdp
from .heads import HeadPlan, check_model_heads, plan_heads, ulysses_attention
from .loss import StepLoss, all_reduce_gradients, global_valid_count
from .shard import ShardedBatch, pad_to_multiple, shard_batch
from .topology import ParallelDims, init_topology

__all__ = ["HeadPlan", "ParallelDims", "ShardedBatch", "StepLoss", "all_reduce_gradients", "apply_fsdp",
           "check_model_heads", "gather_sequence", "global_valid_count", "heads_to_seq", "init_topology",
           "pad_to_multiple", "plan_heads", "seq_to_heads", "shard_batch", "ulysses_attention"]

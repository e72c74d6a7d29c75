"""Single-process checks of the SP building blocks: sharding, topology validation, head plans, step loss."""

import pytest
import torch

import seqpack
from seqpack.batch import IGNORE_INDEX
from seqpack.parallel import ParallelDims, StepLoss, init_topology, pad_to_multiple, plan_heads, shard_batch
from seqpack.compat import xtuner as xt

from conftest import model_pair


def _row(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return seqpack.pack([torch.randint(3, 60, (n,), generator=g) for n in lengths])


def test_shards_concatenate_to_the_padded_row():
    batch = _row([5, 9, 1, 6])  # 21 tokens, not divisible by 4
    shards = [shard_batch(batch, 4, r) for r in range(4)]
    padded = pad_to_multiple(batch, 4)
    assert padded.num_tokens == 24 and padded.cu_seqlens.tolist() == [0, 5, 14, 15, 21, 24]
    assert padded.shift_labels[0, 21:].tolist() == [IGNORE_INDEX] * 3 and padded.max_seqlen == 9
    for field in ("input_ids", "shift_labels", "position_ids"):
        assert torch.equal(torch.cat([getattr(s, field) for s in shards], 1), getattr(padded, field))
    for s in shards:  # metadata stays global
        assert s.num_tokens == 6 and s.total_tokens == 24 and torch.equal(s.cu_seqlens, padded.cu_seqlens)
        assert s.model_inputs()["cu_seq_lens_q"] is s.cu_seqlens and s.model_inputs()["max_length_q"] == 9
    # labels were shifted before the split: the last token of shard 0 keeps its target in shard 1
    assert shards[0].shift_labels[0, -1] == batch.input_ids[0, 6]
    assert sum(s.num_valid_targets for s in shards) == batch.num_valid_targets
    assert shard_batch(batch, 1, 0).input_ids.data_ptr() == batch.input_ids.data_ptr()  # sp=1: a view of the row


def test_shard_errors():
    batch = _row([2, 1])
    with pytest.raises(ValueError, match="sp=4 is larger than the packed row"):
        shard_batch(batch, 4, 0)
    with pytest.raises(ValueError, match="sp_rank=2 of sp_size=2"):
        shard_batch(batch, 2, 2)
    with pytest.raises(TypeError, match="PackedBatch"):
        shard_batch({"input_ids": batch.input_ids}, 2, 0)


def test_topology_checks_and_single_process_noop():
    assert ParallelDims.check(None, 2, 8) == (4, 2)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by sequence parallel degree sp=4; use sp in "
                                         r"\[1, 2, 3, 6\]"):
        ParallelDims.check(None, 4, 6)
    with pytest.raises(ValueError, match="dp=3 x sp=2 = 6 does not match the world size 8; use dp=4"):
        ParallelDims.check(3, 2, 8)
    with pytest.raises(ValueError, match="sp=0 must be a positive integer"):
        ParallelDims.check(None, 0, 8)
    topo = init_topology()
    assert (topo.world_size, topo.rank, topo.dp_size, topo.sp_size, topo.dp_rank, topo.sp_rank) == (1, 0, 1, 1, 0, 0)
    assert topo.mesh is None and topo.sp_group is None and topo.dp_group is None and topo.fsdp_mesh() is None
    with pytest.raises(ValueError, match="not divisible by sequence parallel degree sp=2"):
        init_topology(sp=2)


def test_head_plans():
    assert plan_heads(8, 8, 4) == plan_heads(8, 8, 4).__class__(8, 8, 4, kv_repeat=1, pad_heads=0)
    assert plan_heads(8, 2, 4).kv_repeat == 2  # Nkv < S: repeat only to S
    assert plan_heads(8, 1, 4).kv_repeat == 4  # a single KV head
    assert plan_heads(12, 6, 4).kv_repeat == 2  # gcd(6, 4) = 2: 12 KV heads, one per query-head pair
    assert (plan_heads(6, 2, 4).pad_heads, plan_heads(6, 2, 4).kv_repeat) == (2, 3)  # N % S != 0: dummy heads
    with pytest.raises(ValueError, match=r"sp=8 exceeds the model's 6 attention heads.*sp <= 6 .*\[1, 2, 3, 6\]"):
        plan_heads(6, 2, 8)
    with pytest.raises(ValueError, match="unsupported head layout: num_attention_heads=6 is not a multiple of "
                                         "num_key_value_heads=4"):
        plan_heads(6, 4, 2)
    q, k, v = torch.randn(5, 6, 3), torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    qe, ke, _ = plan_heads(6, 2, 4).expand(q, k, v)
    assert qe.shape == (5, 8, 3) and ke.shape == (5, 8, 3)
    assert torch.equal(ke[:, 5], k[:, 1]) and qe[:, 6:].abs().sum() == 0  # head 5 -> kv 1; dummies are zero


def test_step_loss_single_process_equals_token_mean_of_the_step():
    _, model = model_pair("llama")
    rows = [_row([4, 7], 1), _row([3, 2, 9, 5], 2)]
    step = StepLoss(rows, None)
    loss = sum(step(model(**b.model_inputs()).logits, b) for b in rows)
    ref = sum(seqpack.causal_lm_loss(model(**b.model_inputs()).logits, b, num_valid=1) for b in rows)
    ref = ref / sum(b.num_valid_targets for b in rows)
    assert step.num_valid == 9 + 15 and abs(loss.item() - ref.item()) < 1e-6 and abs(step.value() - ref.item()) < 1e-6


def test_xtuner_names_without_distributed():
    assert xt.get_sequence_parallel_world_size() == 1 and xt.get_sequence_parallel_group() is None
    ids = torch.arange(7)[None]
    assert xt.pad_for_sequence_parallel(ids)[0] is ids and xt.split_for_sequence_parallel(ids) is ids
    sampler = xt.SequenceParallelSampler(range(5), seed=1)
    assert sorted(sampler) == list(range(5)) and len(sampler) == 5
    with pytest.raises(ValueError, match=r"use_varlen_attn=False\) is not supported"):
        xt.dispatch_modules(None, use_varlen_attn=False)

"""Sequence parallel (+ data parallel, FSDP2, accumulation) equals one process training on the whole step.

Real gloo process groups spawned under pytest, real transformers models (Llama, Qwen2, Mixtral). Each case
builds the same tiny model on every rank, computes the reference step in-process (all micro-batches of all DP
ranks, unsharded, token-mean loss), then the parallel step, and compares the loss and every parameter gradient.
Several cases share one spawned world to amortise start-up.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import seqpack
from seqpack.ops.loss import token_loss_sum
from seqpack.parallel import (ParallelDims, StepLoss, all_reduce_gradients, apply_fsdp, gather_sequence,
                              init_topology, shard_batch)
from seqpack.compat import xtuner as xt

from conftest import VOCAB, tiny_config

RTOL = 1e-4

# name -> (family, config overrides, dp, sp, fsdp, row lengths per micro-batch per DP rank)
CASES_2 = {
    "sp2-llama-single-kv-head": ("llama", dict(num_key_value_heads=1), 1, 2, False, [[23, 30]]),
    "sp2-qwen2-3-heads-pad": ("qwen2", dict(hidden_size=24, num_attention_heads=3, num_key_value_heads=1), 1, 2,
                              True, [[27, 18]]),
}
CASES_4 = {
    "sp4-llama-gqa-kv2-fsdp": ("llama", dict(), 1, 4, True, [[37, 26, 41]]),
    "sp4-qwen2-6-heads-pad": ("qwen2", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2), 1, 4,
                              False, [[35, 22]]),
    "sp4-mixtral-single-kv-head-fsdp": ("mixtral", dict(num_key_value_heads=1), 1, 4, True, [[30, 19]]),
    "dp2xsp2-mixtral-fsdp-accum": ("mixtral", dict(), 2, 2, True, [[25, 34], [31, 17]]),
    "dp2xsp2-qwen2-fsdp-accum": ("qwen2", dict(), 2, 2, True, [[21, 29, 14], [33, 16, 27]]),
}


def _rows(case_seed: int, lengths_per_dp):
    """Packed rows of uneven documents (lengths 1..13), one list per DP rank."""
    g = torch.Generator().manual_seed(case_seed)
    out = []
    for lengths in lengths_per_dp:
        rows = []
        for T in lengths:
            docs, left = [], T
            while left:
                n = min(left, int(torch.randint(1, 14, (1,), generator=g)))
                docs.append(torch.randint(3, VOCAB, (n,), generator=g))
                left -= n
            rows.append(seqpack.pack(docs))
        out.append(rows)
    return out


def _crosses_boundary(batch, sp):
    """True when some document spans two SP shards (after padding to a multiple of sp)."""
    T = -(-batch.num_tokens // sp) * sp
    cuts = set(range(T // sp, T, T // sp))
    cu = batch.cu_seqlens.tolist()
    return any(any(a < c < b for c in cuts) for a, b in zip(cu, cu[1:]))


def _grad(p):
    g = p.grad
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def _check_grads(model, ref, label):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():  # every rank calls full_tensor() in the same order
        g, g_ref = _grad(p), ref_params[name].grad
        assert g is not None and g_ref is not None, f"{label}: {name} has no gradient"
        err = float((g - g_ref).norm() / g_ref.norm().clamp(min=1e-12))
        assert err <= RTOL, f"{label}: {name} relative gradient error {err:.2e}"


def _run_case(name, spec, case_seed):
    family, overrides, dp, sp, fsdp, lengths = spec
    topo = ParallelDims(dp=dp, sp=sp)
    rows = _rows(case_seed, lengths)
    assert any(_crosses_boundary(b, sp) for r in rows for b in r), f"{name}: no document crosses a shard boundary"
    assert any(b.num_tokens % sp for r in rows for b in r), f"{name}: every row divisible by sp"

    torch.manual_seed(case_seed)
    cfg = tiny_config(family, **overrides)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    model.load_state_dict(ref.state_dict())

    # reference: one process, the whole step (every DP rank's micro-batches), token mean over all valid targets
    all_rows = [b for r in rows for b in r]
    count = sum(b.num_valid_targets for b in all_rows)
    ref_loss = sum(token_loss_sum(ref(**b.model_inputs()).logits, b.shift_labels) for b in all_rows) / count
    ref_loss.backward()

    seqpack.dispatch(model, sp_group=topo.sp_group)
    if fsdp:
        apply_fsdp(model, topo)
    shards = [shard_batch(b, topo.sp_size, topo.sp_rank) for b in rows[topo.dp_rank]]
    step = StepLoss(shards, topo.world_group)
    assert step.num_valid == count, f"{name}: global valid count {step.num_valid} != {count}"
    for s in shards:
        step(model(**s.model_inputs()).logits, s).backward()
    if not fsdp:
        all_reduce_gradients(model, topo.world_group)
    value = step.value()
    values = [None] * topo.world_size
    dist.all_gather_object(values, value)
    assert len(set(values)) == 1, f"{name}: logged loss differs across ranks: {values}"
    assert abs(value - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), f"{name}: loss {value} != {ref_loss.item()}"
    _check_grads(model, ref, name)


def _xtuner_api(case_seed):
    """XTuner-named flow (sp = world): dispatch_modules, split of SHIFTED labels, reduce_sequence_parallel_loss,
    gather_for_sequence_parallel — the gradient equals the single-process token mean."""
    topo = xt.init_sequence_parallel(dist.get_world_size())
    assert xt.get_sequence_parallel_world_size() == topo.sp_size == dist.get_world_size()
    assert xt.get_sequence_parallel_rank() == topo.sp_rank
    cfg = tiny_config("llama")
    torch.manual_seed(case_seed)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    model.load_state_dict(ref.state_dict())
    batch = _rows(case_seed, [[29]])[0][0]
    ref_out = ref(**batch.model_inputs()).logits
    torch.nn.functional.cross_entropy(ref_out[0], batch.shift_labels[0]).backward()

    xt.dispatch_modules(model)
    ids, labels, _, _ = xt.pad_for_sequence_parallel(batch.input_ids, batch.shift_labels, batch.position_ids)
    assert ids.shape[1] % topo.sp_size == 0
    local = shard_batch(batch, topo.sp_size, topo.sp_rank)  # same slices, plus the pad segment in cu_seqlens
    assert torch.equal(xt.split_for_sequence_parallel(ids), local.input_ids)
    assert torch.equal(xt.split_for_sequence_parallel(labels), local.shift_labels)
    logits = model(**local.model_inputs()).logits
    full = xt.gather_for_sequence_parallel(logits, dim=1)[:, : batch.num_tokens]
    assert (full - ref_out).abs().max() <= 1e-5
    n = local.num_valid_targets
    mean = torch.nn.functional.cross_entropy(logits[0], local.shift_labels[0], reduction="sum") / max(n, 1)
    loss = xt.reduce_sequence_parallel_loss(mean, n)
    loss.backward()
    all_reduce_gradients(model, topo.sp_group)
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, loss.item())
    assert len(set(values)) == 1
    _check_grads(model, ref, "xtuner-api")


def _errors_and_sampler():
    world = dist.get_world_size()
    with pytest.raises(ValueError, match="not divisible by sequence parallel degree sp=3"):
        ParallelDims(sp=3)
    with pytest.raises(ValueError, match="does not match the world size"):
        ParallelDims(dp=world, sp=2)
    topo = ParallelDims(sp=2)
    one_head = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=8, num_attention_heads=1,
                                                            num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"sp=2 exceeds the model's 1 attention heads"):
        seqpack.dispatch(one_head, sp_group=topo.sp_group)
    llama = seqpack.dispatch(AutoModelForCausalLM.from_config(tiny_config("llama")), sp_group=topo.sp_group)
    b = seqpack.pack([[5, 6, 7, 8], [9, 10]])
    with pytest.raises(ValueError, match="needs the global cu_seq_lens"):
        llama(input_ids=b.input_ids[:, :3], position_ids=b.position_ids[:, :3])
    s = shard_batch(b, 2, topo.sp_rank)
    with pytest.raises(ValueError, match="different numbers of micro-batches"):  # would hang in FSDP otherwise
        StepLoss([s] * (1 + dist.get_rank() % 2), topo.world_group)
    bad = s.model_inputs()
    bad["position_ids"] = torch.arange(3)[None] + 1
    with pytest.raises(ValueError, match="position_ids inconsistent with cu_seqlens"):
        llama(**bad)
    # gather along the sequence: forward concatenates, backward keeps the local slice
    x = torch.full((1, 2, 3), float(topo.sp_rank), requires_grad=True)
    y = gather_sequence(x, topo.sp_group, dim=1)
    assert y[0, :, 0].tolist() == [float(r) for r in range(2) for _ in range(2)]
    (y * torch.arange(4.0)[None, :, None]).sum().backward()
    assert x.grad[0, :, 0].tolist() == [2.0 * topo.sp_rank, 2.0 * topo.sp_rank + 1]
    if world == 4:  # dp=2 x sp=2: SP peers get the same samples, DP ranks disjoint ones
        xt.init_sequence_parallel(2)
        idx = list(xt.SequenceParallelSampler(range(11), seed=3))
        everyone = [None] * world
        dist.all_gather_object(everyone, idx)
        assert everyone[0] == everyone[1] and everyone[2] == everyone[3] and len(idx) == 6
        assert set(everyone[0]) | set(everyone[2]) == set(range(11))


def _worker(rank, world, init, cases, seed):
    """``init``: a free port -> torchrun-style environment, the topology creates the process group; a file path
    -> the caller creates the group first and the topology adopts it."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if isinstance(init, int):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(init), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        owner = init_topology(sp=world)
        assert dist.is_initialized() and dist.get_backend() == "gloo" and owner.device.type == "cpu"
        assert owner.mesh.mesh_dim_names == ("dp", "sp") and owner.sp_rank == rank and owner.dp_group is None
    else:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        _errors_and_sampler()
        for i, (name, spec) in enumerate(sorted(cases.items())):
            _run_case(name, spec, seed + i)
        _xtuner_api(seed)
    finally:
        if isinstance(init, int):
            owner.destroy()
            assert not dist.is_initialized()
        else:
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,cases", [(2, CASES_2), (4, CASES_4)], ids=["world2-env", "world4"])
def test_sp_equals_single_process(tmp_path, world, cases):
    init = _free_port() if world == 2 else str(tmp_path / "pg")
    mp.spawn(_worker, args=(world, init, cases, 100), nprocs=world, join=True)

"""2D sequence parallel (ring × Ulysses, packed varlen ring attention) equals one process on the unsharded row.

Real gloo ranks spawned under pytest; several cases per spawned world (start-up dominates on 2 busy cores). Each
model case computes the reference step in-process on the whole rows (token-mean loss over every valid target),
then the parallel step on the ring-split shards, and compares the loss (1e-5 relative) and every parameter gradient
(1e-4 relative). The attention cases compare ring attention itself: exact float32 against the per-document
reference, the stand-in kernels (the real kernels' signatures and log-sum-exp layout) against the exact path, and
bf16 against an fp32 per-document reference.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import seqpack
from seqpack.attention import backends
from seqpack.attention.kernels import AttnSpec, varlen_attention
from seqpack.attention.ring import ring_attention
from seqpack.attention.ring_blocks import block_segments
from seqpack.ops.loss import token_loss_sum
from seqpack.models import register_models
from seqpack.parallel import ParallelDims, StepLoss, all_reduce_gradients, apply_fsdp, shard_batch
from seqpack.parallel.ring_split import CHUNKS_PER_RANK, ring_chunks, split_positions

sys.path.insert(0, os.path.dirname(__file__))
import stand_in_kernels as stand_in  # noqa: E402
from conftest import VOCAB, tiny_config  # noqa: E402

RTOL = 1e-4
# 1-token documents, ones spanning 3+ shards, one wholly inside one shard (ring 4), 245 tokens: padded by a dummy
# segment (test_documents_cover_the_cases)
DOCS = [1, 90, 1, 2, 3, 40, 1, 6, 30, 2, 50, 19]

# name -> (family, config overrides, dp, ring, ulysses, head_first, fsdp, documents per micro-batch per DP rank)
CASES_4 = {
    "ring4-llama": ("llama", dict(), 1, 4, 1, True, False, [[DOCS]]),
    "ring2-dp2-qwen2-window-fsdp-accum": ("qwen2", dict(), 2, 2, 1, True, True, [[DOCS, [7, 12, 1]], [[15, 4], [30]]]),
    "ring2xulysses2-mixtral-1kv": ("mixtral", dict(num_key_value_heads=1), 1, 2, 2, True, True, [[DOCS]]),
    "ring2xulysses2-llama-ring-ranks-consecutive": ("llama", dict(), 1, 2, 2, False, False, [[[13, 1, 20, 5]]]),
    "ring4-internlm2-native": ("internlm2", None, 1, 4, 1, True, False, [[DOCS]]),
}
CASES_8 = {"4-heads-on-8-ranks-ulysses4xring2": ("llama", dict(), 1, 2, 4, True, False, [[[5, 40, 1, 9]]])}


def _docs(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return seqpack.pack([torch.randint(3, VOCAB, (n,), generator=g) for n in lengths])


def _model_pair(family, overrides, seed):
    torch.manual_seed(seed)
    if family == "internlm2":  # native seqpack model under its official names (no AttentionInterface upstream)
        from test_models_reference import official_config, official_weights, write_official_folder

        cfg = official_config("internlm2-mqa-linear-bias")
        folder = write_official_folder(os.path.join(os.environ["RING_TMP"], f"internlm2-{dist.get_rank()}"), cfg,
                                       official_weights(cfg))
        return [AutoModelForCausalLM.from_pretrained(folder, attn_implementation="seqpack", dtype=torch.float32)
                for _ in range(2)]
    cfg = tiny_config(family, **overrides)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="seqpack").float()
    model.load_state_dict(ref.state_dict())
    return ref, model


def _check_grads(model, ref, label):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():  # every rank calls full_tensor() in the same order
        g, g_ref = p.grad, ref_params[name].grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        assert g is not None and g_ref is not None, f"{label}: {name} has no gradient"
        err = float((g - g_ref).norm() / g_ref.norm().clamp(min=1e-12))
        assert err <= RTOL, f"{label}: {name} relative gradient error {err:.2e}"


def _run_case(name, spec, seed):
    family, overrides, dp, ring, ulysses, head_first, fsdp, docs = spec
    topo = ParallelDims(dp=dp, sp=ring * ulysses, ring=ring, head_first=head_first)
    assert topo.mesh.mesh_dim_names == (("dp", "ring", "ulysses") if head_first else ("dp", "ulysses", "ring"))
    rows = [[_docs(lengths, seed + 10 * d + i) for i, lengths in enumerate(micro)] for d, micro in enumerate(docs)]
    ref, model = _model_pair(family, overrides, seed)
    all_rows = [b for r in rows for b in r]
    count = sum(b.num_valid_targets for b in all_rows)
    ref_loss = sum(token_loss_sum(ref(**b.model_inputs()).logits, b.shift_labels) for b in all_rows) / count
    ref_loss.backward()

    seqpack.dispatch(model, **topo.attention_groups())
    if fsdp:
        apply_fsdp(model, topo)
    shards = [shard_batch(b, topo.sp_size, topo.sp_rank, ring_size=topo.ring_size) for b in rows[topo.dp_rank]]
    step = StepLoss(shards, topo.world_group)
    assert step.num_valid == count, f"{name}: global valid count {step.num_valid} != {count}"
    for s in shards:
        step(model(**s.model_inputs()).logits, s).backward()
    if not fsdp:
        all_reduce_gradients(model, topo.world_group)
    value = step.value()
    assert abs(value - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), f"{name}: loss {value} != {ref_loss.item()}"
    _check_grads(model, ref, name)


def _per_document(q, k, v, cu, spec):
    """fp32/any-dtype exact per-document attention of the whole row (the one-process path)."""
    return varlen_attention(q, k, v, cu, max(b - a for a, b in zip(cu, cu[1:])), spec, "sdpa")


def _ring_attention_cases(group, cu_docs, seed):
    """Ring attention alone over ``group`` (C ranks): exact fp32 forward and backward vs the per-document
    reference; stand-in kernels vs the exact path; bf16 error vs fp32 reference within 1.5x the bf16
    per-document error; unconnected blocks skipped."""
    C, c = dist.get_world_size(group), dist.get_rank(group)
    cu = _docs(cu_docs, 0).cu_seqlens.tolist()
    T = -(-cu[-1] // (CHUNKS_PER_RANK * C)) * CHUNKS_PER_RANK * C
    cu = cu + [T] if cu[-1] != T else cu
    pos = split_positions(cu, C, 1, c)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, h, 16, generator=g) for h in (4, 1, 1))  # GQA with one KV head
    dout = torch.randn(T, 4, 16, generator=g)
    for spec in (AttnSpec(scale=0.25), AttnSpec(scale=0.25, sliding_window=3), AttnSpec(scale=0.25, softcap=2.0)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = _per_document(*leaves, cu, spec)
        ref.backward(dout)
        local = [x[pos].clone().requires_grad_() for x in (q, k, v)]
        out = ring_attention(*local, cu, spec, group)
        out.backward(dout[pos])
        assert (out - ref[pos]).abs().max() <= 1e-5, f"ring C={C} {spec}: output differs"
        for name, x, leaf in zip("qkv", local, leaves):  # dk/dv came home around the ring
            assert (x.grad - leaf.grad[pos]).abs().max() <= 1e-5, f"ring C={C} {spec}: d{name} differs"
        kernels = ([("flash_attn", stand_in.flash_attn_varlen_func)] +
                   [("torch_varlen", stand_in.SIGNATURES[s]) for s in ("2.11", "2.12")])
        for name, fn in kernels:
            if spec.softcap is not None and name == "torch_varlen":
                continue
            adapter = (backends.adapt_flash_attn if name == "flash_attn" else backends.adapt_torch_varlen)(fn)
            real = backends.kernel
            backends.kernel = {name: adapter}.get
            try:
                stand_in.CALLS.clear()
                got = ring_attention(*(x[pos] for x in (q, k, v)), cu, spec, group, backend=name)
            finally:
                backends.kernel = real
            assert (got - ref[pos]).abs().max() <= 1e-5, f"ring C={C} {name} {fn.__name__}: output differs"
            segs = [block_segments(tuple(cu), C, c, src, spec.sliding_window) for src in range(C)]
            expected = sum(any(x.diagonal for x in b) + sum(not x.diagonal for x in b) for b in segs)
            assert len(stand_in.CALLS) == expected, "one kernel call per computed block piece, none for the rest"
    # bf16: merges in fp32 keep the ring within 1.5x the per-document bf16 error
    spec = AttnSpec(scale=0.25)
    ref32 = _per_document(q, k, v, cu, spec)[pos]
    per_doc16 = _per_document(*(x.bfloat16() for x in (q, k, v)), cu, spec)[pos].float()
    ring16 = ring_attention(*(x[pos].bfloat16() for x in (q, k, v)), cu, spec, group).float()
    errs = torch.tensor([(per_doc16 - ref32).abs().max(), (ring16 - ref32).abs().max()])
    dist.all_reduce(errs, op=dist.ReduceOp.MAX, group=group)
    assert errs[1] <= 1.5 * errs[0], f"bf16 ring error {errs[1]:.3g} > 1.5 x per-document bf16 error {errs[0]:.3g}"


def _skips_and_errors():
    # a row of short documents: most (query chunk, key chunk) pairs have no document in common -> skipped
    cu = tuple(range(0, 129, 2))  # 64 documents of 2 tokens, C = 4: 64 chunks of 2
    computed = sum(bool(block_segments(cu, 4, c, s, None)) for c in range(4) for s in range(4))
    assert computed == 4, "only each rank's own block is connected"
    assert sorted(a for c in range(4) for r in ring_chunks(cu, 4, c) for a in range(*r)) == list(range(128))
    topo = ParallelDims(sp=dist.get_world_size(), ring=2)
    llama = seqpack.dispatch(AutoModelForCausalLM.from_config(tiny_config("llama", attention_dropout=0.1)),
                             **topo.attention_groups())
    s = shard_batch(_docs([9, 7], 1), topo.sp_size, topo.sp_rank, ring_size=2)
    with pytest.raises(ValueError, match="cannot apply attention dropout"):
        llama.train()(**s.model_inputs())
    bad = shard_batch(_docs([9, 7], 1), topo.sp_size, topo.sp_rank, ring_size=2).model_inputs()  # fresh metadata
    bad["position_ids"] = bad["position_ids"] + 1
    with pytest.raises(ValueError, match="position_ids inconsistent with cu_seqlens"):
        llama.eval()(**bad)
    with pytest.raises(ValueError, match=r"ring degree ring=3 must divide the sequence parallel degree sp=4 "
                                         r"\(sp = ring x ulysses\); use ring in \[1, 2, 4\]"):
        ParallelDims(sp=4, ring=3)


def _worker(rank, world, init_file, cases, seed, tmp):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["RING_TMP"] = tmp
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        register_models()
        if world == 4:
            _skips_and_errors()
            for ranks in ([0, 1], [0, 1, 2], [0, 1, 2, 3]):  # C = 2, 3, 4 (every rank creates every group)
                groups = {len(ranks): dist.new_group(ranks)}
                if rank in ranks:
                    _ring_attention_cases(groups[len(ranks)], [1, 13, 2, 1, 7, 5], seed + len(ranks))
            three = dist.new_group([0, 1, 2])
            if rank < 3:  # ring only, C = 3: a model over a 3-rank ring group
                _ring_model_c3(three, seed)
        for i, (name, spec) in enumerate(sorted(cases.items())):
            _run_case(name, spec, seed + i)
    finally:
        dist.destroy_process_group()


def _ring_model_c3(group, seed):
    ref, model = _model_pair("qwen2", dict(), seed)  # layer 1 slides with a window of 5 < a chunk of 8
    batch = _docs(DOCS, seed)
    count = batch.num_valid_targets
    (token_loss_sum(ref(**batch.model_inputs()).logits, batch.shift_labels) / count).backward()
    seqpack.dispatch(model, ring_group=group)
    s = shard_batch(batch, 3, dist.get_rank(group), ring_size=3)
    loss = token_loss_sum(model(**s.model_inputs()).logits, s.shift_labels) / count
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    ref_loss = token_loss_sum(ref(**batch.model_inputs()).logits, batch.shift_labels).item() / count
    assert abs(total.item() - ref_loss) <= 1e-5 * ref_loss, "ring C=3: loss differs"
    all_reduce_gradients(model, group)
    _check_grads(model, ref, "ring3-qwen2-window")


def test_documents_cover_the_cases():
    cu = _docs(DOCS, 0).cu_seqlens.tolist()
    assert cu[-1] % (CHUNKS_PER_RANK * 4), "the row needs a dummy segment"
    cu = tuple(cu + [-(-cu[-1] // (CHUNKS_PER_RANK * 4)) * CHUNKS_PER_RANK * 4])
    owner = {i: c for c in range(4) for a, b in ring_chunks(cu, 4, c) for i in range(a, b)}
    ranks = [{owner[i] for i in range(a, b)} for a, b in zip(cu, cu[1:])]
    assert max(map(len, ranks)) >= 3 and 1 in DOCS
    assert any(len(r) == 1 and b - a > 1 for r, a, b in zip(ranks, cu, cu[1:])), "no document inside one shard"


@pytest.mark.parametrize("world,cases", [(4, CASES_4), (8, CASES_8)], ids=["world4", "world8"])
def test_ring_and_2d_equal_single_process(tmp_path, world, cases):
    # forked, not spawned: the children inherit the imported modules (8 fresh interpreters importing transformers
    # would cost most of this test's time on 2 cores); nothing here touches CUDA
    mp.start_processes(_worker, args=(world, str(tmp_path / "pg"), cases, 300, str(tmp_path)), nprocs=world,
                       join=True, start_method="fork")


"""Sequence parallel (sp=2, real gloo ranks) for the native families and the InternEvo hand-adapted path:
logits, loss and every gradient equal one process on the whole packed row.

One spawned world runs every case (start-up dominates on 2 busy cores).
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import seqpack
from seqpack.compat.internevo import gpc
from seqpack.ops.loss import token_loss_sum
from seqpack.models import register_models
from seqpack.parallel import ParallelDims, all_reduce_gradients, apply_fsdp, gather_sequence, shard_batch

sys.path.insert(0, os.path.dirname(__file__))
from test_internevo_compat import model_pair  # noqa: E402
from test_models_reference import VOCAB, official_config, official_weights, write_official_folder  # noqa: E402

# dynamic NTK with documents longer than max_position_embeddings=8 that cross the shard boundary (per-document
# scaling needs the shard's global offset); ALiBi slopes must follow the heads each rank holds after the all-to-all
SP_VARIANTS = ["internlm-dynamic-ntk", "internlm2-gqa-dynamic-ntk", "baichuan2-7b-rope", "baichuan2-13b-alibi-6-heads"]
FSDP = {"baichuan2-13b-alibi-6-heads"}  # also sharded with FSDP2 (NormHead + ALiBi under fully_shard)
DOCS = [5, 13, 1, 10]  # 29 tokens: padded to 30, the 13-token document spans both shards


def _batch():
    g = torch.Generator().manual_seed(7)
    return seqpack.pack([torch.randint(3, VOCAB, (n,), generator=g) for n in DOCS])


def _compare(label, model, ref, topo, run_local, fsdp=False):
    """run_local(model, shard) -> local logits [1, T/S, V]; compares against ref on the full row."""
    batch = _batch()
    ref_logits = ref(**batch.model_inputs()).logits
    count = batch.num_valid_targets
    (token_loss_sum(ref_logits, batch.shift_labels) / count).backward()
    shard = shard_batch(batch, topo.sp_size, topo.sp_rank)
    logits = run_local(model, shard)
    full = gather_sequence(logits.detach(), topo.sp_group, dim=1)[:, : batch.num_tokens]
    assert (full - ref_logits).abs().max() <= 1e-5, f"{label}: logits differ"
    loss = token_loss_sum(logits, shard.shift_labels) / count
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=topo.sp_group)
    assert abs(total.item() - (token_loss_sum(ref_logits, batch.shift_labels) / count).item()) <= 1e-5, label
    if not fsdp:  # FSDP2 sums gradients over the ranks itself
        all_reduce_gradients(model, topo.sp_group)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g, g_ref = p.grad, ref_params[name].grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        err = float((g - g_ref).norm() / g_ref.norm())
        assert err <= 1e-4, f"{label} {name}: relative gradient error {err:.2e}"


def _worker(rank, world, init_file, folders):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        register_models()
        topo = ParallelDims(sp=world)
        for name, folder in folders.items():
            ref = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="seqpack", dtype=torch.float32)
            model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="seqpack", dtype=torch.float32)
            seqpack.dispatch(model, sp_group=topo.sp_group)
            if name in FSDP:
                apply_fsdp(model, topo)
            _compare(name, model, ref, topo, lambda m, s: m(**s.model_inputs()).logits, fsdp=name in FSDP)
        # InternEvo hand-adapted modeling file: gpc bound to the topology, ids/positions only, the metadata in gpc
        gpc.bind(topo)
        try:
            auto, hand = model_pair()

            def run_hand(m, s):
                with gpc.micro_batch(s):
                    return m(input_ids=s.input_ids, position_ids=s.position_ids).logits
            _compare("hand-adapted-internlm2", hand, auto, topo, run_hand)
        finally:
            gpc.unbind()
    finally:
        dist.destroy_process_group()


def test_native_and_hand_adapted_models_sp2_equal_single_process(tmp_path):
    batch = _batch()
    cuts = batch.cu_seqlens.tolist()
    assert any(a < 15 < b for a, b in zip(cuts, cuts[1:])), "no document crosses the shard boundary"
    folders = {}
    for name in SP_VARIANTS:
        cfg = official_config(name)
        folders[name] = write_official_folder(tmp_path / name, cfg, official_weights(cfg))
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), folders), nprocs=2, join=True)

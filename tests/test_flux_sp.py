"""Sequence-parallel Flux (Ulysses over the packed joint row) == one process, loss and every gradient.

One gloo world of 3 spawned ranks serves sp=3 (all ranks) and sp=2 (a subgroup of ranks 0 and 1), with head
counts divisible and not divisible by S (dummy-head path). The reference is the unmodified diffusers model run
on each sample alone, in-process, on every rank.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seqpack.diffusion import install, pack_flux, packed_forward
from seqpack.diffusion.objective import loss_count, loss_sum
from seqpack.parallel import all_reduce_gradients
from seqpack.parallel.comm import all_reduce_sum

from flux_helpers import reference, sample, tiny_flux

RTOL = 1e-5  # fp32 round-off: the same sums in another order (per-sample vs packed, split over ranks)

# name -> (sp ranks, heads, rows of (h, w, text tokens, timestep)); rows = accumulation micro-batches
CASES = {
    "sp3-4-heads-pad": (3, 4, [[(4, 5, 3, 0.8), (2, 3, 4, 0.2), (1, 1, 1, 0.5)], [(3, 3, 2, 0.6)]]),
    "sp3-3-heads": (3, 3, [[(2, 2, 7, 0.4), (5, 2, 1, 0.95)]]),
    "sp2-3-heads-pad": (2, 3, [[(3, 4, 2, 0.3), (1, 2, 3, 0.7)], [(2, 5, 1, 0.1), (4, 1, 2, 0.9)]]),
}


def _run_case(name, sp, heads, rows, group, seed, topo=None):
    """One step of the rows on the SP ``group`` (``topo``: 2D sequence parallel, its Ulysses and ring groups)
    against the unmodified model on each sample alone: loss and every gradient."""
    g = torch.Generator().manual_seed(seed)
    rows = [[sample(g, *s) for s in row] for row in rows]
    ref = tiny_flux(heads=heads, seed=seed)
    model = install(copy.deepcopy(ref), **(topo.attention_groups() if topo else dict(sp_group=group)))
    count = sum(s.target.numel() for row in rows for s in row)
    ref_loss = sum(((reference(ref, s) - s.target) ** 2).sum() for row in rows for s in row) / count
    ref_loss.backward()

    rank, ring = (topo.sp_rank, topo.ring_size) if topo else (dist.get_rank(group), 1)
    shards = [pack_flux(row, sp_size=sp, sp_rank=rank, ring_size=ring) for row in rows]
    total = int(all_reduce_sum(torch.tensor(sum(loss_count(r) for r in shards)), group))
    assert total == count, f"{name}: global count {total} != {count}"
    local = 0.0
    for r in shards:
        loss = loss_sum(packed_forward(model, r), r) / total
        loss.backward()
        local += float(loss)
    all_reduce_gradients(model, group)
    value = float(all_reduce_sum(torch.tensor(local, dtype=torch.float64), group))
    assert abs(value - float(ref_loss)) <= RTOL * abs(float(ref_loss)), f"{name}: loss {value} vs {float(ref_loss)}"
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        g_ref = ref_params[pname].grad
        assert p.grad is not None and g_ref is not None, f"{name}: {pname} has no gradient"
        err = float((p.grad - g_ref).norm() / g_ref.norm().clamp(min=1e-12))
        assert err <= RTOL, f"{name}: {pname} relative gradient error {err:.2e}"


def _worker(rank, world, init):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        for i, (name, (sp, heads, rows)) in enumerate(sorted(CASES.items())):
            if sp == world:
                _run_case(name, sp, heads, rows, dist.group.WORLD, 10 + i)
            elif rank < 2:
                _run_case(name, sp, heads, rows, pair, 10 + i)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_flux_sp_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(3, str(tmp_path / "pg")), nprocs=3, join=True)


def test_sp_needs_packed_rows():
    """The SP processor refuses the unpacked diffusers forward instead of attending over a shard."""
    from seqpack.diffusion import SeqpackFluxAttnProcessor

    proc = SeqpackFluxAttnProcessor()
    proc.sp_group = object()  # a stand-in group: the check fires before any communication
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="packed rows"):
        proc._attention(q, q, q, None)

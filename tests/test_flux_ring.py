"""2D sequence-parallel Flux (Ulysses x bidirectional ring attention over the packed joint row) == one process.

One gloo world of 4 spawned ranks: 2 Ulysses x 2 ring, and ring only (C = 2, two data-parallel replicas doing the
same rows), head counts divisible and not divisible by the Ulysses degree; loss and every gradient against the
unmodified diffusers model on each sample alone. Then bidirectional ring attention alone on the ring group, on
the exact path and through the stand-ins of flash-attn / torch ``varlen_attn`` (their ``causal=False`` calls),
against seqpack's unsharded non-causal per-document kernel. Last, ``seqpack train`` of the Flux demo with
``parallel.sequence_2D`` (2 x 2) logs the losses of a one-process run.
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import stand_in_kernels as stand_in
from seqpack.attention import backends
from seqpack.attention.kernels import AttnSpec, varlen_attention
from seqpack.attention.ring import ring_attention
from seqpack.diffusion import pack_flux
from seqpack.parallel import init_topology
from seqpack.parallel.ring_split import CHUNKS_PER_RANK, split_positions
from seqpack.tasks import train
from seqpack.train import load_config

from flux_helpers import sample
from test_flux_sp import _run_case
from test_flux_train import TINY
from test_llava_sp import _free_port, _losses

TRAIN = TINY + ["--lr_scheduler.total_steps", "2", "--ckpt.checkpoint_every", "100"]
SEQUENCE_2D = ["--parallel.tensor.size", "4", "--parallel.sequence_2D.enable", "True",
               "--parallel.sequence_2D.head_size", "2", "--parallel.sequence_2D.context_size", "2"]

# name -> (sp, ring, heads, rows of (h, w, text tokens, timestep))
CASES = {
    "2x2-3-heads-pad": (4, 2, 3, [[(4, 5, 3, 0.8), (2, 3, 4, 0.2), (1, 1, 1, 0.5)], [(3, 3, 2, 0.6)]]),
    "ring2-4-heads": (2, 2, 4, [[(3, 4, 2, 0.3), (1, 2, 3, 0.7)], [(2, 5, 1, 0.1)]]),
}


def _ring_kernel_case(topo, seed):
    """ring_attention(causal=False) over the ring group vs the non-causal per-document kernel of the whole row."""
    group, C = topo.ring_group, topo.ring_size
    T = CHUNKS_PER_RANK * C * 3
    cu = [0, 5, 6, 40, 41, 77, T]
    pos = split_positions(cu, C, 1, topo.ring_rank, causal=False)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, h, 16, generator=g) for h in (4, 2, 2))
    dout = torch.randn(T, 4, 16, generator=g)
    spec = AttnSpec(scale=0.25, causal=False)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = varlen_attention(*leaves, cu, max(b - a for a, b in zip(cu, cu[1:])), spec, "sdpa")
    ref.backward(dout)
    local = [x[pos].clone().requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, cu, spec, group)
    out.backward(dout[pos])
    assert (out - ref[pos]).abs().max() <= 1e-5, "bidirectional ring: output differs"
    for name, x, leaf in zip("qkv", local, leaves):
        assert (x.grad - leaf.grad[pos]).abs().max() <= 1e-5, f"bidirectional ring: d{name} differs"
    for name, fn in [("flash_attn", stand_in.flash_attn_varlen_func)] + \
            [("torch_varlen", stand_in.SIGNATURES[s]) for s in ("2.11", "2.12")]:
        adapter = (backends.adapt_flash_attn if name == "flash_attn" else backends.adapt_torch_varlen)(fn)
        real = backends.kernel
        backends.kernel = {name: adapter}.get
        try:
            stand_in.CALLS.clear()
            got = ring_attention(*(x[pos] for x in (q, k, v)), cu, spec, group, backend=name)
        finally:
            backends.kernel = real
        assert (got - ref[pos]).abs().max() <= 1e-5, f"bidirectional ring {name} {fn.__name__}: output differs"
        assert stand_in.CALLS and not any(c.get("causal") or c.get("is_causal") for c in stand_in.CALLS)


def _worker(rank, world, port, run_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    topo = init_topology(sp=4, ring=2)
    try:
        topos = {4: topo, 2: init_topology(sp=2, ring=2)}  # 2 ring x 2 Ulysses; ring only with dp = 2
        for i, (name, (sp, ring, heads, rows)) in enumerate(sorted(CASES.items())):
            t = topos[sp]
            assert t.ring_size == ring
            _run_case(name, sp, heads, rows, t.sp_group, 30 + i, topo=t)
            dist.barrier()
        # the joint row's shards are the ring's chunks of the split balanced for bidirectional attention
        g = torch.Generator().manual_seed(0)
        row = [sample(g, 4, 5, 3, 0.5), sample(g, 2, 2, 9, 0.1)]
        shard = pack_flux(row, 4, topo.sp_rank, ring_size=2)
        assert shard.cu_seqlens[-1] % 64 == 0 and shard.ring_size == 2
        full = pack_flux(row)
        joint_ids = torch.cat([full.txt_ids, full.img_ids])[full.perm]  # [Tj, 3] rotary ids in joint order
        want = split_positions(shard.cu_seqlens, 2, 2, topo.ring_rank, topo.ulysses_rank, causal=False)
        real = want < joint_ids.shape[0]
        got = torch.cat([shard.txt_ids, shard.img_ids])[shard.perm]
        assert torch.equal(got[real], joint_ids[want[real]])
        _ring_kernel_case(topos[2], 40 + topo.dp_rank)
        dist.barrier()
        train(load_config(None, TRAIN + SEQUENCE_2D + ["--train.run_dir", run_dir]))  # adopts this process group
    finally:
        topo.destroy()


def test_flux_ulysses_x_ring_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(4, _free_port(), str(tmp_path / "2d")), nprocs=4, join=True)
    train(load_config(None, TRAIN + ["--train.run_dir", str(tmp_path / "one")]))
    got, want = _losses(tmp_path / "2d"), _losses(tmp_path / "one")
    assert len(got) == len(want) == 2
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want)), (got, want)

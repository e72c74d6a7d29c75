"""2D sequence parallel LLaVA (Ulysses x ring, gloo, one spawn of 4 ranks) == one process on the same packed rows.

Every rank merges the image features into the whole row; the language model keeps this rank's chunks of the
ring's balanced split (the split ``shard_batch(..., ring_size=C)`` makes of the labels) and runs Ulysses x ring
attention. Cases: 2 Ulysses x 2 ring, and ring only (C = 2, two data-parallel replicas) with FSDP2 — logits, loss
and every gradient (vision tower, projector, language model) as one process; then ``seqpack train`` of a LLaVA
folder with ``parallel.sequence_2D`` (2 x 2) logs the losses of a one-process run.
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqpack
from seqpack.multimodal.batch import pack_multimodal
from seqpack.parallel import init_topology, shard_batch
from seqpack.parallel.ring_split import split_positions
from seqpack.tasks import train
from seqpack.train import load_config

from llava_tiny import model_pair, samples, tiny_processor, train_args, write_dataset, write_model_folder
from test_llava_sp import _case, _free_port, _losses

SEQUENCE_2D = ["--parallel.tensor.size", "4", "--parallel.sequence_2D.enable", "True",
               "--parallel.sequence_2D.head_size", "2", "--parallel.sequence_2D.context_size", "2"]


def _worker(rank, world, port, args):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    topo = init_topology(sp=4, ring=2)  # 2 ring x 2 Ulysses
    try:
        assert (topo.ring_size, topo.ulysses_size) == (2, 2)
        _case(topo, fsdp=False, seed=7)
        _case(init_topology(sp=2, ring=2), fsdp=True, seed=8)  # ring only, dp = 2 (same world)
        # the labels and the language model's embeddings follow the ring's chunks, not a contiguous slice
        row = shard_batch(pack_multimodal(samples(), tiny_processor()), 4, topo.sp_rank, ring_size=2)
        want = split_positions(row.cu_seqlens.tolist(), 2, 2, topo.ring_rank, topo.ulysses_rank)
        assert torch.equal(row.shift_labels[0], row.text.shift_labels[0, want])
        assert row.text.num_tokens % 64 == 0, "a ring row is padded to 16 x sp"
        # a row not padded for the ring is refused with a message
        _, model = model_pair(9)
        seqpack.dispatch(model, **topo.attention_groups())
        items = samples()
        plain = shard_batch(pack_multimodal([items[2], items[0]], tiny_processor()), 4, topo.sp_rank)  # Ulysses pad
        assert plain.text.num_tokens % 64, "the row must not happen to fit the ring split"
        try:
            model(**plain.model_inputs())
        except ValueError as err:
            assert "multiple of 64 (sp=4, ring=2)" in str(err), err
        else:
            raise AssertionError("a row padded for Ulysses only was accepted by the ring split")
        dist.barrier()
        train(load_config(None, args + SEQUENCE_2D))  # adopts this process group
    finally:
        topo.destroy()


def test_llava_ulysses_x_ring_equals_one_process(tmp_path):
    model_dir, data = write_model_folder(tmp_path / "model"), write_dataset(tmp_path / "data")
    mp.spawn(_worker, args=(4, _free_port(), train_args(model_dir, data, tmp_path / "2d", steps=2)), nprocs=4,
             join=True)
    train(load_config(None, train_args(model_dir, data, tmp_path / "one", steps=2)))
    got, want = _losses(tmp_path / "2d"), _losses(tmp_path / "one")
    assert len(got) == len(want) == 2
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want)), (got, want)

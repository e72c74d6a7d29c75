"""``seqpack bench NAME``: benchmarks that compare seqpack with the natural alternative in the same run.

- ``packing``: seqpack varlen vs transformers' packed SDPA path (dense block mask) vs padded batches.
- ``sp``: peak memory and step time per rank for sp = 1, 2, 4 at a fixed total T (gloo, CPU).
- ``flux``: Flux steps on packed multi-resolution rows vs padded batches; activation memory per rank for sp 1/2/4.
- ``data``: packing speed and fill of each strategy, ftdp reading speed.
- ``train``: `seqpack train` step vs the bare step; peak memory with the chunked loss / tiled MLP on and off.
- ``trainer``: transformers' Trainer with seqpack packing vs padded batches; SequenceParallelTrainer sp = 1, 2, 4.
- ``plan``: ``seqpack plan``'s predicted peak memory against the measured peak of real steps (CPU, gloo).
- ``offload``: step time of bf16 mixed precision vs float32 and of each offload vs none; bytes moved off the GPU.
- ``ring``: ring attention's blockwise kernels and float32 merges (C virtual ranks on one device) vs one varlen
  kernel call over the same documents.
- ``longest``: the longest packed row that trains one step within the device's memory, against the plan's, and the
  step time there with and without each offload.
"""

from __future__ import annotations

import importlib

BENCHES = {"packing": "seqpack.bench.packing", "sp": "seqpack.bench.sp", "data": "seqpack.data.bench_data",
           "train": "seqpack.bench.train", "plan": "seqpack.plan.bench", "trainer": "seqpack.bench.trainer",
           "flux": "seqpack.bench.flux", "offload": "seqpack.bench.offload",
           "longest": "seqpack.plan.longest", "ring": "seqpack.bench.ring_blocks"}


def add_arguments(parser):
    parser.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    parser.add_argument("rest", nargs="...", help="options of that benchmark (see seqpack bench NAME --help)")


def run(args):
    module = importlib.import_module(BENCHES[args.name])
    return module.main(args.rest)

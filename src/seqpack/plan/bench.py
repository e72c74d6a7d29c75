"""``seqpack bench plan``: the planner's prediction against the measured peak of real steps on this CPU.

Each configuration runs in ``sp`` fresh processes (gloo; FSDP2 over all ranks when sp > 1, as ``seqpack train``
does), one Llama-shaped fp32 model dispatched to seqpack attention, activation checkpointing applied by
``seqpack.train.model.apply_activation_checkpointing``, one packed row holding one document (shard_batch splits
it), and the step ``seqpack train`` runs: ``logits = model(...).logits; StepLoss(...)(logits, batch).backward()``.

Measurement: the process's resident peak (Linux VmHWM, reset after a warm-up step) over its resident size just
before the step, i.e. everything the step allocates. Processes run with ``MALLOC_MMAP_THRESHOLD_=65536``, so every
tensor larger than 64 KiB is its own ``mmap`` and goes back to the OS when freed: resident size then follows the
live tensors to the page, without glibc heap reuse or fragmentation blurring it, and VmHWM is their true peak —
the CPU counterpart of ``torch.cuda.max_memory_allocated`` (torch's profiler could report the same peak, at a
large cost in time and memory for long rows). Prediction: ``plan_memory(...).step_peak`` with precision fp32,
device cpu, no optimizer, the logits kept through backward.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

from ..bench.sp import _reset_peak, _status_kib, spawn_ranks, write_rank_result

# (hidden, layers, heads, kv heads, intermediate, vocab, T, checkpoint fraction, sp): each under ~2 GiB per process
CONFIGS = [
    (64, 2, 4, 2, 176, 256, 4096, 0.0, 1),
    (128, 4, 4, 2, 352, 4096, 4096, 0.0, 1),
    (128, 4, 4, 2, 352, 4096, 4096, 1.0, 1),
    (256, 4, 8, 2, 688, 32000, 2048, 0.0, 1),
    (256, 8, 8, 2, 688, 8192, 8192, 1.0, 1),
    (512, 2, 8, 8, 1376, 32000, 4096, 1.0, 1),
    (256, 4, 8, 2, 1024, 256, 8192, 0.0, 1),
    (256, 6, 8, 2, 1024, 512, 8192, 1.0, 1),
    (256, 4, 8, 2, 688, 4096, 8192, 0.0, 2),
    (256, 4, 8, 2, 688, 4096, 8192, 1.0, 2),
    (128, 6, 4, 4, 352, 16384, 8192, 0.0, 4),
    (256, 4, 8, 2, 1024, 256, 8192, 1.0, 2),
    (256, 4, 8, 2, 688, 4096, 16384, 1.0, 4),
]


def _rank_main(rank: int, world: int, init_file: str, cfg: tuple, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    import seqpack
    from seqpack.parallel import ParallelDims, StepLoss, apply_fsdp, shard_batch
    from seqpack.train.model import apply_activation_checkpointing

    h, L, N, Nkv, inter, V, T, ckpt, _ = cfg
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        topo = ParallelDims(sp=world)
        torch.manual_seed(0)
        hf = AutoConfig.for_model("llama", vocab_size=V, hidden_size=h, intermediate_size=inter, num_hidden_layers=L,
                                  num_attention_heads=N, num_key_value_heads=Nkv, max_position_embeddings=T)
        model = AutoModelForCausalLM.from_config(hf).float()
        seqpack.dispatch(model, sp_group=topo.sp_group)
        model.train()
        apply_activation_checkpointing(model, ckpt)
        apply_fsdp(model, topo)
        g = torch.Generator().manual_seed(0)
        shard = shard_batch(seqpack.pack([torch.randint(3, V, (T,), generator=g)]), topo.sp_size, topo.sp_rank)

        def step():
            loss = StepLoss([shard], topo.world_group)
            logits = model(**shard.model_inputs(), use_cache=False).logits  # kept through backward, as in train
            loss(logits, shard).backward()
            del logits

        step()  # warm-up: one-time allocations (thread pools, process-group buffers)
        model.zero_grad(set_to_none=True)
        gc.collect()
        if world > 1:
            dist.barrier()
        base = _status_kib("VmRSS")
        reset = _reset_peak()
        step()
        peak = _status_kib("VmHWM")
        result = dict(rank=rank, growth_mib=(peak - base) / 1024 if reset else float("nan"), rss_mib=peak / 1024)
        write_rank_result(out_dir, rank, result)
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(cfg: tuple) -> dict:
    """Peak step growth (MiB, max over ranks) of one configuration, in fresh processes."""
    sp = cfg[-1]
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the spawned interpreters start
    ranks = spawn_ranks(_rank_main, sp, cfg)
    return dict(growth_mib=max(r["growth_mib"] for r in ranks), rss_mib=max(r["rss_mib"] for r in ranks))


def predict(cfg: tuple):
    from .memory import PlanOptions, plan_memory
    from .shape import ModelShape

    h, L, N, Nkv, inter, V, T, ckpt, sp = cfg
    shape = ModelShape("llama", h, L, N, Nkv, h // N, inter, V)
    return plan_memory(shape, PlanOptions(T, gpus=sp, sp=sp, checkpoint=ckpt, precision="fp32", optimizer="none",
                                          device="cpu", keep_logits=True))


EXAMPLES = "examples:\n  seqpack bench plan --only 0 1"


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (also the source of its reference page)."""
    parser = argparse.ArgumentParser(prog="seqpack bench plan", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=int, nargs="+", help="run only these configuration indices (0-based)")
    parser.add_argument("--config", nargs=9, type=float, action="append", metavar=("HIDDEN", "LAYERS", "HEADS",
                        "KV_HEADS", "INTER", "VOCAB", "T", "CKPT", "SP"), help="run this configuration instead "
                        "(repeatable); CKPT is the fraction of checkpointed layers")
    parser.add_argument("--json", help="also write the rows to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    picked = [CONFIGS[k] for k in args.only] if args.only else CONFIGS
    if args.config:
        picked = [tuple(int(v) for v in c[:7]) + (float(c[7]), int(c[8])) for c in args.config]
    print(f"CPU, fp32, one process per sp rank (gloo, FSDP2 when sp > 1), OMP_NUM_THREADS=1, {os.cpu_count()} cores")
    header = "| hidden | layers | vocab | T | ckpt | sp | predicted MiB | measured MiB | error | peak phase |"
    print(header + "\n|" + "---|" * 10)
    rows = []
    for cfg in picked:
        h, L, N, Nkv, inter, V, T, ckpt, sp = cfg
        plan = predict(cfg)
        got = measure(cfg)
        pred = plan.step_peak / 2**20
        err = pred / got["growth_mib"] - 1
        rows.append(dict(config=cfg, predicted_mib=pred, measured_mib=got["growth_mib"], error=err,
                         peak_phase=plan.peak_phase, rss_mib=got["rss_mib"]))
        print(f"| {h} | {L} | {V} | {T} | {'on' if ckpt else 'off'} | {sp} | {pred:.1f} | {got['growth_mib']:.1f} | "
              f"{err:+.1%} | {plan.peak_phase} |", flush=True)
    worst = max(abs(r["error"]) for r in rows)
    print(f"\nlargest error {worst:.1%} over {len(rows)} configurations")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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
from dataclasses import asdict, dataclass

from ..bench.sp import _reset_peak, _status_kib, spawn_ranks, write_rank_result


@dataclass(frozen=True)
class Case:
    """One measured configuration: a Llama-shaped (or Qwen2) fp32 model, one packed row of T tokens."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int
    T: int
    ckpt: float = 0.0  # fraction of checkpointed layers
    sp: int = 1
    model_type: str = "llama"
    tied: bool = False  # tied input embedding and output head
    chunked_loss: int = 0  # tokens per loss chunk; 0 = full logits kept through backward (as train without it)
    tiled_mlp: int = 0  # tokens per MLP tile; 0 = plain MLP
    adamw: bool = False  # the measured step includes AdamW's update (its moments exist before the step)
    precision: str = "fp32"  # or "bf16-mixed": FSDP2 MixedPrecisionPolicy (a one-rank group for one process)
    offload_checkpoints: bool = False  # checkpointed inputs to "host" tensors (the same memory on the CPU)
    offload_optimizer: bool = False  # FSDP2 CPUOffloadPolicy + fused AdamW


# each under ~2 GiB per process
CONFIGS = [
    Case(64, 2, 4, 2, 176, 256, 4096),
    Case(128, 4, 4, 2, 352, 4096, 4096),
    Case(128, 4, 4, 2, 352, 4096, 4096, 1.0),
    Case(256, 4, 8, 2, 688, 32000, 2048),
    Case(256, 8, 8, 2, 688, 8192, 8192, 1.0),
    Case(512, 2, 8, 8, 1376, 32000, 4096, 1.0),
    Case(256, 4, 8, 2, 1024, 256, 8192),
    Case(256, 6, 8, 2, 1024, 512, 8192, 1.0),
    Case(256, 4, 8, 2, 688, 4096, 8192, 0.0, 2),
    Case(256, 4, 8, 2, 688, 4096, 8192, 1.0, 2),
    Case(128, 6, 4, 4, 352, 16384, 8192, 0.0, 4),
    Case(256, 4, 8, 2, 1024, 256, 8192, 1.0, 2),
    Case(256, 4, 8, 2, 688, 4096, 16384, 1.0, 4),
    # chunked loss + tiled MLP on a tied-embedding Qwen2 (the fp32 chunk buffers)
    Case(256, 4, 8, 2, 688, 16000, 8192, 1.0, model_type="qwen2", tied=True, chunked_loss=1024, tiled_mlp=256),
    # the peak is AdamW's update: per-tensor CPU AdamW's temporaries of the 16000 x 256 embedding
    Case(256, 2, 8, 2, 688, 16000, 256, 1.0, adamw=True, chunked_loss=1024),
    # bf16 mixed precision (FSDP2 on one rank), with and without the offloads
    Case(256, 4, 8, 2, 688, 4096, 8192, 0.0, precision="bf16-mixed"),
    Case(256, 4, 8, 2, 688, 8192, 8192, 1.0, precision="bf16-mixed", chunked_loss=1024),
    Case(256, 4, 8, 2, 688, 8192, 8192, 1.0, 2, precision="bf16-mixed", chunked_loss=1024, tiled_mlp=256,
         adamw=True, offload_checkpoints=True, offload_optimizer=True),
]


def _rank_main(rank: int, world: int, init_file: str, case: Case, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    import seqpack
    from seqpack.parallel import ParallelDims, StepLoss, apply_fsdp, shard_batch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    from seqpack.ops import apply_tiled_mlp, offload_checkpoints
    from seqpack.train.model import apply_activation_checkpointing

    c = case
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        topo = ParallelDims(sp=world)
        torch.manual_seed(0)
        hf = AutoConfig.for_model(c.model_type, vocab_size=c.vocab, hidden_size=c.hidden, intermediate_size=c.inter,
                                  num_hidden_layers=c.layers, num_attention_heads=c.heads,
                                  num_key_value_heads=c.kv_heads, max_position_embeddings=c.T,
                                  tie_word_embeddings=c.tied)
        model = AutoModelForCausalLM.from_config(hf).float()
        # the order of seqpack.train.model.build_model
        seqpack.dispatch(model, sp_group=topo.sp_group)
        model.train()
        if c.tiled_mlp:
            apply_tiled_mlp(model, c.tiled_mlp)
        if c.chunked_loss:
            seqpack.enable_chunked_loss(model, c.chunked_loss)
        apply_activation_checkpointing(model, c.ckpt)
        if c.offload_checkpoints:
            offload_checkpoints(model)
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if c.precision == "bf16-mixed" else None
        apply_fsdp(model, topo, mp_policy=mp_policy, offload_policy=CPUOffloadPolicy(pin_memory=False)
                   if c.offload_optimizer else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if c.offload_optimizer
                                                                       else {})) if c.adamw else None
        g = torch.Generator().manual_seed(0)
        shard = shard_batch(seqpack.pack([torch.randint(3, c.vocab, (c.T,), generator=g)]), topo.sp_size,
                            topo.sp_rank)

        def step():  # seqpack train's step
            loss = StepLoss([shard], topo.world_group)
            if c.chunked_loss:
                out = model(**shard.model_inputs(), use_cache=False, chunked_loss_labels=shard.shift_labels)
                loss.sum_loss(out.loss).backward()
                del out
            else:
                logits = model(**shard.model_inputs(), use_cache=False).logits  # kept through backward, as in train
                loss(logits, shard).backward()
                del logits
            if optimizer is not None:
                optimizer.step()
            model.zero_grad(set_to_none=True)

        step()  # warm-up: one-time allocations (thread pools, process-group buffers, AdamW moments)
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
        if dist.is_initialized():  # sp > 1, or the one-rank group of bf16 mixed precision
            dist.destroy_process_group()


def measure(case: Case) -> dict:
    """Peak step growth (MiB, max over ranks) of one configuration, in fresh processes."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when the spawned interpreters start
    ranks = spawn_ranks(_rank_main, case.sp, case)
    return dict(growth_mib=max(r["growth_mib"] for r in ranks), rss_mib=max(r["rss_mib"] for r in ranks))


def predict(case: Case):
    from .memory import PlanOptions, plan_memory
    from .shape import FAMILIES, ModelShape

    c = case
    shape = ModelShape(c.model_type, c.hidden, c.layers, c.heads, c.kv_heads, c.hidden // c.heads, c.inter, c.vocab,
                       tie_embeddings=c.tied, **FAMILIES[c.model_type])
    return plan_memory(shape, PlanOptions(c.T, gpus=c.sp, sp=c.sp, checkpoint=c.ckpt, precision=c.precision,
                                          offload_checkpoints=c.offload_checkpoints,
                                          offload_optimizer=c.offload_optimizer,
                                          optimizer="adamw" if c.adamw else "none", device="cpu", micro_num=1,
                                          keep_logits=not c.chunked_loss, chunked_loss=bool(c.chunked_loss),
                                          loss_chunk=c.chunked_loss or 1024, tiled_mlp=bool(c.tiled_mlp),
                                          mlp_tile=c.tiled_mlp or None))


def features(case: Case) -> str:
    parts = [case.model_type] + (["tied"] if case.tied else []) + [f"ckpt {case.ckpt:.0%}"]
    parts += [f"chunked loss {case.chunked_loss}"] if case.chunked_loss else []
    parts += [f"tiled MLP {case.tiled_mlp}"] if case.tiled_mlp else []
    parts += ["AdamW step"] if case.adamw else []
    parts += [case.precision] if case.precision != "fp32" else []
    parts += ["checkpoint offload"] if case.offload_checkpoints else []
    return ", ".join(parts + (["optimizer offload"] if case.offload_optimizer else []))


EXAMPLES = "examples:\n  seqpack bench plan --only 0 1"


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (also the source of its reference page)."""
    parser = argparse.ArgumentParser(prog="seqpack bench plan", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=int, nargs="+", help="run only these configuration indices (0-based)")
    parser.add_argument("--config", nargs=9, type=float, action="append", metavar=("HIDDEN", "LAYERS", "HEADS",
                        "KV_HEADS", "INTER", "VOCAB", "T", "CKPT", "SP"), help="run this configuration instead "
                        "(repeatable); CKPT is the fraction of checkpointed layers")
    parser.add_argument("--model-type", default="llama", choices=("llama", "qwen2"), help="family of --config")
    parser.add_argument("--tied", action="store_true", help="--config: tie the embedding and the output head")
    parser.add_argument("--chunked-loss", type=int, default=0, metavar="TOKENS",
                        help="--config: chunked loss over chunks of TOKENS (default: full logits)")
    parser.add_argument("--tiled-mlp", type=int, default=0, metavar="TOKENS",
                        help="--config: tiled MLP over tiles of TOKENS (default: plain MLP)")
    parser.add_argument("--adamw", action="store_true", help="--config: the step includes AdamW's update")
    parser.add_argument("--json", help="also write the rows to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    picked = [CONFIGS[k] for k in args.only] if args.only else CONFIGS
    if args.config:
        picked = [Case(*(int(v) for v in c[:7]), float(c[7]), int(c[8]), model_type=args.model_type, tied=args.tied,
                       chunked_loss=args.chunked_loss, tiled_mlp=args.tiled_mlp, adamw=args.adamw)
                  for c in args.config]
    print(f"CPU, one process per sp rank (gloo, FSDP2 when sp > 1 or bf16 mixed precision), OMP_NUM_THREADS=1, "
          f"{os.cpu_count()} cores")
    header = "| hidden | layers | vocab | T | sp | features | predicted MiB | measured MiB | error | peak phase |"
    print(header + "\n|" + "---|" * 10)
    rows = []
    for case in picked:
        plan = predict(case)
        got = measure(case)
        pred = plan.step_peak / 2**20
        err = pred / got["growth_mib"] - 1
        rows.append(dict(config=asdict(case), predicted_mib=pred, measured_mib=got["growth_mib"], error=err,
                         peak_phase=plan.peak_phase, rss_mib=got["rss_mib"]))
        print(f"| {case.hidden} | {case.layers} | {case.vocab} | {case.T} | {case.sp} | {features(case)} | "
              f"{pred:.1f} | {got['growth_mib']:.1f} | {err:+.1%} | {plan.peak_phase} |", flush=True)
    worst = max(abs(r["error"]) for r in rows)
    print(f"\nlargest error {worst:.1%} over {len(rows)} configurations")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``seqpack plan``: how long a context fits, per-rank memory broken down, and the step FLOPs.

    seqpack plan path/to/hf_folder --gpus 8 --gpu-mem 80GiB --seq_len 131072 --sp 8
    seqpack plan configs/7B_hf.py --gpus 8 --gpu-mem 80GiB --max          # longest T for every (sp, ring) split
    seqpack plan path/to/hf_folder --gpus 16 --seq_len 524288 --sp 16 --ring 4  # 4 Ulysses x 4 ring ranks
    seqpack plan config.json --gpus 8 --gpu-mem 80GiB --max --chunked-loss --tiled-mlp --json

Defaults come from an InternEvo-style config when one is given (seq_len x micro_bsz, tensor.size as sp,
model.checkpoint, model.dtype, micro_num); otherwise full checkpointing, fp32 master weights with bf16 autocast,
AdamW, and the full-logits loss seqpack trains with today. ``--chunked-loss`` and ``--tiled-mlp`` plan the
features of issue #11 (loss over sequence chunks, MLP over sequence tiles).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from .memory import GiB, PRECISIONS, PlanOptions, longest_fit, parse_memory, plan_memory, split_candidates
from .shape import load_shape

LABELS = {"parameters": "parameters (sharded)", "optimizer": "AdamW moments (sharded)",
          "fsdp_gathered": "FSDP2 gathered parameters", "gradients": "gradients",
          "held_activations": "activations kept for backward", "layer_working": "layer under backward (+ temps)",
          "attention_workspace": "attention workspace", "sp_all_to_all": "SP all-to-all buffers",
          "ring_buffers": "ring attention buffers (k/v, dk/dv in flight, fp32 dq, one tile)",
          "logits_loss": "logits / loss", "autocast_casts": "autocast bf16 weight copies"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("source", help="local HF model folder, config.json, or InternEvo-style config (.py)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (ranks); FSDP2 shards over all of them")
    parser.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, e.g. 80GiB, 80GB, 141GB (default 80GiB)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--seq_len", "--seq-len", type=int, help="tokens of one packed row (default: the config's "
                      "seq_len x micro_bsz, else 8192)")
    what.add_argument("--max", action="store_true", help="longest seq_len that fits, for every (sp, ring) split: "
                      "sp dividing --gpus (or only --sp), ring dividing sp, sp / ring dividing the heads")
    parser.add_argument("--sp", type=int, help="sequence-parallel degree (default: the config's, else 1)")
    parser.add_argument("--ring", type=int, help="ring degree of 2D sequence parallel, sp = ring x ulysses "
                        "(default: the config's sequence_2D.context_size, else 1)")
    parser.add_argument("--checkpoint", type=float, help="fraction of layers with activation checkpointing "
                        "(default: the config's model.checkpoint, else 1)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), help="default: bf16-autocast (fp32 master "
                        "weights), fp32 when the config says model.dtype=torch.float32")
    parser.add_argument("--optimizer", choices=("adamw", "none"), default="adamw")
    parser.add_argument("--micro-num", type=int, help="micro-batches per step (> 1 keeps gradients resident)")
    parser.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=False,
                        help="loss over sequence chunks, never the [T, vocab] logits (issue #11)")
    parser.add_argument("--loss-chunk", type=int, default=4096, help="tokens per loss chunk")
    parser.add_argument("--tiled-mlp", action=argparse.BooleanOptionalAction, default=False,
                        help="MLP over sequence tiles, recomputed in backward (issue #11)")
    parser.add_argument("--mlp-tile", type=int, help="tokens per MLP tile (default: hidden size)")
    parser.add_argument("--keep-logits", action=argparse.BooleanOptionalAction, default=True,
                        help="the caller holds the logits through backward (seqpack train's loop does)")
    parser.add_argument("--kv-repeat", action="store_true", help="the attention kernel cannot share KV heads "
                        "(torch 2.11's varlen_attn): k and v are repeated to all heads")
    parser.add_argument("--doc-len", type=int, help="document length for attention FLOPs (default: the row)")
    parser.add_argument("--slack", type=float, default=0.10, help="allocator slack, fraction of the peak (0.10)")
    parser.add_argument("--reserve-gib", type=float, default=1.0, help="CUDA context + NCCL, GiB (1.0)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary when the config leaves it to the tokenizer")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def options_from(args, cfg) -> PlanOptions:
    """PlanOptions from the command line, defaults from the seqpack Config ``cfg`` (or None)."""
    seq_len, sp, ckpt, precision, micro, ring = 8192, 1, 1.0, "bf16-autocast", 1, 1
    if cfg is not None:
        seq_len, sp, ring = cfg.data.seq_len * cfg.data.micro_bsz, cfg.parallel.tensor.size, cfg.parallel.ring_size
        ckpt, micro = float(cfg.model.checkpoint), cfg.data.micro_num
        precision = "fp32" if cfg.model.dtype in ("torch.float32", "float32", "torch.float") else "bf16-autocast"
    pick = lambda given, default: default if given is None else given  # noqa: E731
    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus}: give at least 1 GPU")
    return PlanOptions(seq_len=pick(args.seq_len, seq_len), gpus=args.gpus, sp=pick(args.sp, sp),
                       ring=pick(getattr(args, "ring", None), ring if args.sp is None else 1),
                       checkpoint=pick(args.checkpoint, ckpt), precision=pick(args.precision, precision),
                       optimizer=args.optimizer, micro_num=pick(args.micro_num, micro), chunked_loss=args.chunked_loss,
                       loss_chunk=args.loss_chunk, tiled_mlp=args.tiled_mlp, mlp_tile=args.mlp_tile,
                       keep_logits=args.keep_logits, kv_repeat=args.kv_repeat, doc_len=args.doc_len,
                       slack=args.slack, reserve_gib=args.reserve_gib)


def run(args) -> int:
    try:
        gpu_bytes = parse_memory(args.gpu_mem)
        shape, cfg = load_shape(args.source, args.vocab_size)
        opts = options_from(args, cfg)
        if args.max:
            splits = split_candidates(shape, args.gpus, args.sp)
            if args.ring is not None:
                splits = [(s, c) for s, c in splits if c == args.ring]
            fits = {(sp, c): longest_fit(shape, replace(opts, sp=sp, ring=c), gpu_bytes) for sp, c in splits}
            out = dict(gpu_bytes=gpu_bytes, longest={(sp if c == 1 else f"{sp}:ring{c}"): (p.to_dict() if p else None)
                                                     for (sp, c), p in fits.items()})
        else:
            plan = plan_memory(shape, opts)
            out = dict(gpu_bytes=gpu_bytes, fits=plan.reserved <= gpu_bytes, plan=plan.to_dict())
    except ValueError as err:
        print(f"seqpack plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(describe_model(shape))
    if args.max:
        print(describe_settings(opts, gpu_bytes, with_seq=False, with_sp=False))
        print(max_table(fits, gpu_bytes))
    else:
        print(describe_settings(opts, gpu_bytes))
        print(breakdown_table(plan, gpu_bytes))
    return 0


def describe_model(shape) -> str:
    return (f"model: {shape.model_type}  h={shape.hidden_size} L={shape.num_layers} N={shape.num_heads} "
            f"Nkv={shape.num_kv_heads} D={shape.head_dim} i={shape.intermediate_size} V={shape.vocab_size}"
            f"{' tied' if shape.tie_embeddings else ''}  " +
            (f"{shape.params / 1e9:.2f}B" if shape.params >= 1e9 else f"{shape.params / 1e6:.2f}M") + " parameters")


def describe_settings(opts: PlanOptions, gpu_bytes: int, with_seq: bool = True, with_sp: bool = True) -> str:
    parts = [f"{opts.gpus} GPU(s) x {gpu_bytes / GiB:.1f} GiB"]
    if with_sp:
        parts.append(f"sp={opts.sp} dp={opts.gpus // opts.sp}"
                     + (f" (ring {opts.ring} x ulysses {opts.ulysses})" if opts.ring > 1 else ""))
    if with_seq:
        parts.append(f"T={opts.seq_len}")
    parts += [f"checkpoint {opts.checkpoint:.0%} of layers", opts.precision,
              "AdamW" if opts.optimizer == "adamw" else "no optimizer state",
              f"chunked loss ({opts.loss_chunk} tokens)" if opts.chunked_loss else "full-logits loss",
              "tiled MLP" if opts.tiled_mlp else "plain MLP", f"micro_num {opts.micro_num}"]
    return "settings: " + ", ".join(parts)


def breakdown_table(plan, gpu_bytes: int) -> str:
    o = plan.options
    unit, size = ("GiB", GiB) if plan.allocated >= GiB else ("MiB", 2**20)
    lines = [f"\nper-rank memory at the peak ({plan.peak_phase}), {plan.local_tokens} tokens per rank:",
             f"| part | {unit} |", "|---|---:|"]
    lines += [f"| {LABELS[k]} | {v / size:.2f} |" for k, v in plan.components.items() if v]
    slack = int(plan.allocated * o.slack) if o.device == "cuda" else 0
    lines += [f"| **allocated peak** | **{plan.allocated / size:.2f}** |",
              f"| allocator slack ({o.slack:.0%}) | {slack / size:.2f} |",
              f"| CUDA context + NCCL | {(plan.reserved - plan.allocated - slack) / size:.2f} |",
              f"| **needed per GPU** | **{plan.reserved / size:.2f}** of {gpu_bytes / size:.2f} |"]
    verdict = "fits" if plan.reserved <= gpu_bytes else "does NOT fit"
    lines.append(f"\n{verdict}; step FLOPs per rank: {plan.model_flops / 1e12:.1f} TFLOP model, "
                 f"{plan.hardware_flops / 1e12:.1f} TFLOP with recomputation")
    return "\n".join(lines)


def max_table(fits: dict, gpu_bytes: int) -> str:
    lines = ["\nlongest packed row that fits (bisection over multiples of 1024 x sp, x 16 with a ring):",
             "| sp | ulysses x ring | dp | longest T | tokens/rank | needed GiB/GPU | peak at | TFLOP/rank (model) |",
             "|---:|---:|---:|---:|---:|---:|---|---:|"]
    for (sp, ring), plan in fits.items():
        if plan is None:
            lines.append(f"| {sp} | {sp // ring} x {ring} | - | nothing fits | | | | |")
            continue
        lines.append(f"| {sp} | {sp // ring} x {ring} | {plan.options.gpus // sp} | {plan.options.seq_len:,} | "
                     f"{plan.local_tokens:,} | "
                     f"{plan.reserved / GiB:.1f} | {plan.peak_phase} | {plan.model_flops / 1e12:.0f} |")
    return "\n".join(lines)

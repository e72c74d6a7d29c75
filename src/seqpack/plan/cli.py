"""``seqpack plan``: how long a context fits, per-rank memory broken down (GPU and host), and the step FLOPs.

    seqpack plan configs/shapes/llama-3-8b.json --gpus 8 --gpu-mem 80GiB --seq_len 131072 --sp 8
    seqpack plan configs/shapes/llama-3-8b.json --gpus 8 --gpu-mem 80GiB --max     # longest T for every sp
    seqpack plan configs/shapes/qwen2.5-7b.json --gpus 8 --max --checkpoint 1 --tiled-mlp --offload-checkpoints \
        --offload-optimizer
    seqpack plan path/to/hf_folder --gpus 8         # any local model folder, config.json or InternEvo config
    seqpack plan configs/shapes/llama-3-8b.json --gpus 16 --seq_len 524288 --sp 16 --ring 4  # 4 Ulysses x 4 ring
    seqpack plan configs/shapes/llama-3-8b.json --gpus 8 --sp 8 --seq_len 1048576 --micro-num 1 --checkpoint 1 \
        --tiled-mlp --no-fused-kernels --check-fake  # + the real training step run on fake tensors: tracked peak vs plan

The plan is the plan of the ``seqpack train`` run: every setting not given here comes from the config file (when a
.py config is given) or from ``seqpack train``'s defaults — bf16 by FSDP2 mixed precision over float32 weights on
GPUs (float32 on --device cpu), the chunked loss (1024 tokens per chunk), no activation checkpointing, two
micro-batches per step, AdamW on the GPU, Liger's fused kernels on GPUs when liger-kernel is installed — with a
packed row of 8192 tokens when no config gives one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from ..cli_types import fraction, non_negative_float, positive_int
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
    parser.add_argument("--gpus", type=positive_int, default=1, help="GPUs (ranks); FSDP2 shards over all of them")
    parser.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, e.g. 80GiB, 80GB, 141GB (default 80GiB)")
    parser.add_argument("--host-mem", help="host memory per node, e.g. 1TiB, 2TB: offloaded tensors must fit it "
                        "(default: not checked, only reported)")
    parser.add_argument("--gpus-per-node", type=positive_int, help="GPUs per node, for host memory (default: min(gpus, 8))")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="plan a GPU run (default) or a "
                        "CPU run (float32, no allocator slack)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--seq_len", "--seq-len", type=positive_int, help="tokens of one packed row (default: the config's "
                      "seq_len x micro_bsz, else 8192)")
    what.add_argument("--max", action="store_true", help="longest seq_len that fits, for every (sp, ring) split: "
                      "sp dividing --gpus (or only --sp), ring dividing sp, sp / ring dividing the heads")
    parser.add_argument("--sp", type=positive_int, help="sequence-parallel degree (default: the config's, else 1)")
    parser.add_argument("--ring", type=positive_int, help="ring degree of 2D sequence parallel, sp = ring x ulysses "
                        "(default: the config's sequence_2D.context_size, else 1)")
    parser.add_argument("--checkpoint", type=fraction, help="fraction of layers with activation checkpointing "
                        "(default: the config's model.checkpoint, else 0 as in seqpack train)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), help="bf16-mixed: FSDP2 casts float32 weights "
                        "to bf16 (seqpack train on GPUs); bf16-autocast: torch.autocast over float32 weights; bf16: "
                        "bf16 weights; fp32. Default: what the config's model.dtype and model.mixed_precision ask")
    parser.add_argument("--optimizer", choices=("adamw", "none"), default="adamw",
                        help="adamw: two fp32 moments per parameter; none: forward and backward only")
    parser.add_argument("--micro-num", type=positive_int, help="micro-batches per step (> 1 keeps gradients resident; "
                        "default: the config's data.micro_num, else 2)")
    parser.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="loss over sequence chunks, never the [T, vocab] logits (default: the config's "
                        "loss.chunked, else on)")
    parser.add_argument("--loss-chunk", type=positive_int, help="tokens per loss chunk (default: loss.chunk_size, 1024)")
    parser.add_argument("--tiled-mlp", action=argparse.BooleanOptionalAction, default=None,
                        help="MLP over sequence tiles, recomputed in backward (default: model.tiled_mlp, off)")
    parser.add_argument("--mlp-tile", type=positive_int, help="tokens per MLP tile (default: hidden size)")
    parser.add_argument("--tiled-attention", action=argparse.BooleanOptionalAction, default=None,
                        help="attention backward one key/value head group at a time, recomputing its forward "
                        "(default: model.tiled_attention, off)")
    parser.add_argument("--offload-checkpoints", action=argparse.BooleanOptionalAction, default=None,
                        help="inputs of checkpointed layers in pinned host memory (default: "
                        "model.offload_checkpoints, off)")
    parser.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None,
                        help="float32 weights, gradients and AdamW state in host memory, the optimizer step on the "
                        "CPU (default: hybrid_zero_optimizer.cpu_offload, off)")
    parser.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=None,
                        help="Liger's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy, as seqpack train swaps them "
                        "in (default: the config's model.fused_kernels; 'auto' = on a GPU when liger-kernel is "
                        "installed here)")
    parser.add_argument("--keep-logits", action=argparse.BooleanOptionalAction, default=True,
                        help="without the chunked loss: the caller holds the logits through backward (seqpack "
                        "train's loop does)")
    parser.add_argument("--kv-repeat", action="store_true", help="the attention kernel cannot share KV heads "
                        "(torch 2.11's varlen_attn): k and v are repeated to all heads")
    parser.add_argument("--doc-len", type=positive_int, help="document length for attention FLOPs (default: the row)")
    parser.add_argument("--slack", type=non_negative_float, default=0.10, help="allocator slack, fraction of the peak (0.10)")
    parser.add_argument("--reserve-gib", type=non_negative_float, default=1.0, help="CUDA context + NCCL, GiB (1.0)")
    parser.add_argument("--vocab-size", type=positive_int, help="vocabulary when the config leaves it to the tokenizer")
    parser.add_argument("--check-fake", action="store_true", help="also run the training step of this plan (the "
                        "model built as seqpack train builds it, every feature, FSDP2) on fake tensors as rank 0 of "
                        "--gpus, allocating nothing, and print its tracked peak next to the planned one (minutes "
                        "for an 8B model at 1M tokens; not with --max or the offloads)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def train_precision(cfg, device: str) -> str:
    """The planner's precision of ``seqpack train`` for ``cfg`` on ``device`` (see train.model.compute_mode)."""
    import torch

    from ..train.model import compute_mode

    mode, _ = compute_mode(cfg, torch.device(device))
    return {None: "fp32", "fsdp": "bf16-mixed", "autocast": "bf16-autocast"}[mode]


def train_fused_kernels(setting, device: str) -> bool:
    """Whether ``seqpack train`` swaps Liger's kernels in for ``model.fused_kernels`` = ``setting`` on ``device``
    (``apply_fused_kernels``: "auto" = on CUDA when liger-kernel is importable; True = on, or train refuses)."""
    from ..ops.fused import liger_available

    return setting is True or (setting == "auto" and device == "cuda" and liger_available())


def options_from(args, cfg) -> PlanOptions:
    """PlanOptions from the command line; what it does not give comes from the seqpack Config ``cfg`` — or, when
    None, from ``seqpack train``'s defaults (a default Config) with a row of 8192 tokens."""
    from ..train.config import Config

    given = cfg is not None
    cfg = cfg if given else Config()
    seq_len = cfg.data.seq_len * cfg.data.micro_bsz if given else 8192
    tiled = cfg.model.tiled_mlp
    pick = lambda value, default: default if value is None else value  # noqa: E731
    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus}: give at least 1 GPU")
    return PlanOptions(
        seq_len=pick(args.seq_len, seq_len), gpus=args.gpus, sp=pick(args.sp, cfg.parallel.tensor.size),
        ring=pick(getattr(args, "ring", None), cfg.parallel.ring_size if args.sp is None else 1),
        checkpoint=pick(args.checkpoint, float(cfg.model.checkpoint)),
        precision=pick(args.precision, train_precision(cfg, args.device)), optimizer=args.optimizer,
        device=args.device, micro_num=pick(args.micro_num, cfg.data.micro_num),
        chunked_loss=pick(args.chunked_loss, cfg.loss.chunked), loss_chunk=pick(args.loss_chunk, cfg.loss.chunk_size),
        tiled_mlp=pick(args.tiled_mlp, bool(tiled)),
        mlp_tile=pick(args.mlp_tile, None if isinstance(tiled, bool) else int(tiled)),
        tiled_attention=pick(getattr(args, "tiled_attention", None), cfg.model.tiled_attention),
        keep_logits=args.keep_logits, kv_repeat=args.kv_repeat,
        fused_kernels=pick(getattr(args, "fused_kernels", None), train_fused_kernels(cfg.model.fused_kernels,
                                                                                       args.device)), doc_len=args.doc_len, slack=args.slack,
        reserve_gib=args.reserve_gib,
        offload_checkpoints=pick(args.offload_checkpoints, cfg.model.offload_checkpoints),
        offload_optimizer=pick(args.offload_optimizer, cfg.hybrid_zero_optimizer.cpu_offload),
        gpus_per_node=args.gpus_per_node)


def run(args) -> int:
    try:
        gpu_bytes = parse_memory(args.gpu_mem)
        host_limit = parse_memory(args.host_mem, "--host-mem") if args.host_mem else None
        shape, cfg = load_shape(args.source, args.vocab_size)
        opts = options_from(args, cfg)
        if args.max:
            splits = split_candidates(shape, args.gpus, args.sp)
            if args.ring is not None:
                splits = [(s, c) for s, c in splits if c == args.ring]
            fits = {(sp, c): longest_fit(shape, replace(opts, sp=sp, ring=c), gpu_bytes,
                                          host_bytes_per_node=host_limit) for sp, c in splits}
            out = dict(gpu_bytes=gpu_bytes, host_bytes=host_limit, longest={(sp if c == 1 else f"{sp}:ring{c}"): (p.to_dict() if p else None)
                                                     for (sp, c), p in fits.items()})
        else:
            plan = plan_memory(shape, opts)
            host_ok = host_limit is None or plan.host_per_node <= host_limit
            out = dict(gpu_bytes=gpu_bytes, host_bytes=host_limit, fits=plan.reserved <= gpu_bytes and host_ok,
                       plan=plan.to_dict())
        check = run_check_fake(args, shape, opts) if args.check_fake else None
        if check is not None:
            out["check_fake"] = check.to_dict()
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
        print(breakdown_table(plan, gpu_bytes, host_limit))
    if check is not None:
        print(check.report())
    return 0


def run_check_fake(args, shape, opts):
    """The fake-tensor step of the plan (``seqpack.plan.fake``); ValueError for what it cannot run."""
    if args.max:
        raise ValueError("--check-fake checks one plan: give --seq_len (e.g. the longest T that --max printed)")
    if opts.device != "cuda":
        raise ValueError("--check-fake checks a GPU plan: drop --device cpu")
    from .fake import compare

    return compare(shape, opts)


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
              ("AdamW" + (" on the host" if opts.offload_optimizer else "")) if opts.optimizer == "adamw"
              else "no optimizer state",
              f"chunked loss ({opts.loss_chunk} tokens)" if opts.chunked_loss else "full-logits loss",
              "tiled MLP" if opts.tiled_mlp else "plain MLP",
              "tiled attention backward" if opts.tiled_attention else "one-call attention backward",
              "Liger fused kernels" if opts.fused_kernels else "no fused kernels", f"micro_num {opts.micro_num}"]
    parts += ["checkpoint inputs on the host"] if opts.offload_checkpoints else []
    return "settings: " + ", ".join(parts)


HOST_LABELS = {"checkpoint_inputs": "checkpointed layer inputs (pinned)", "parameters": "float32 parameter shards",
               "gradients": "float32 gradient shards", "optimizer": "AdamW moments"}


def host_lines(plan, host_limit: int | None) -> list[str]:
    """The host-memory table (per rank, per node) and whether it fits ``host_limit`` per node."""
    if not plan.host:
        return []
    per_node = plan.options.gpus_per_node or min(plan.options.gpus, 8)
    lines = ["\nhost memory (offloaded tensors):", "| part | GiB per rank |", "|---|---:|"]
    lines += [f"| {HOST_LABELS[k]} | {v / GiB:.2f} |" for k, v in plan.host.items() if v]
    lines.append(f"| **per node ({per_node} ranks)** | **{plan.host_per_node / GiB:.1f}** |")
    if host_limit is not None:
        verdict = "fits" if plan.host_per_node <= host_limit else "does NOT fit"
        lines.append(f"\nhost memory {verdict} in {host_limit / GiB:.0f} GiB per node")
    return lines


def breakdown_table(plan, gpu_bytes: int, host_limit: int | None = None) -> str:
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
    lines.append(f"\n{verdict} in GPU memory; step FLOPs per rank: {plan.model_flops / 1e12:.1f} TFLOP model, "
                 f"{plan.hardware_flops / 1e12:.1f} TFLOP with recomputation")
    return "\n".join(lines + host_lines(plan, host_limit))


def max_table(fits: dict, gpu_bytes: int) -> str:
    lines = ["\nlongest packed row that fits (bisection over multiples of 1024 x sp, x 16 with a ring):",
             "| sp | ulysses x ring | dp | longest T | tokens/rank | needed GiB/GPU | host GiB/node | peak at | "
             "TFLOP/rank (model) |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for (sp, ring), plan in fits.items():
        if plan is None:
            lines.append(f"| {sp} | {sp // ring} x {ring} | - | nothing fits | | | | | |")
            continue
        lines.append(f"| {sp} | {sp // ring} x {ring} | {plan.options.gpus // sp} | {plan.options.seq_len:,} | "
                     f"{plan.local_tokens:,} | {plan.reserved / GiB:.1f} | {plan.host_per_node / GiB:.0f} | "
                     f"{plan.peak_phase} | {plan.model_flops / 1e12:.0f} |")
    return "\n".join(lines)

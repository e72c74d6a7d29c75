"""``seqpack bench longest``: the longest packed row that really trains one step on this machine's device, next to
``seqpack plan``'s prediction for the same budget, and the step time there with and without each offload.

    seqpack bench longest --mem 512MiB --hidden 128 --layers 2 --checkpoint 1        # CPU: a simulated budget
    seqpack bench longest configs/shapes/tinyllama.json --checkpoint 1 --tiled-mlp --offload-checkpoints \\
        --offload-optimizer                                                          # GPU: its free memory

Every try builds ``seqpack train``'s model and optimizer for the settings (``build_model``, ``build_optimizer``),
runs one warm-up step on a short row (FSDP2's buffers, the AdamW moments) and then one real step on a packed row of
T tokens (documents of ``--doc-len``): forward, loss, backward, clipping, AdamW. T is bisected over multiples of
``--granularity`` tokens, starting from the plan's longest T.

A step fits on CUDA when it raises no out-of-memory error (``--mem`` caps the process below the GPU's memory);
the peak is ``torch.cuda.max_memory_allocated``. On the CPU, ``--mem`` is the budget of a simulated accelerator:
a tensor-byte tracker (``seqpack.bench.budget``) counts every tensor the step keeps on the device and fails at the
allocation that crosses the budget, like a CUDA out-of-memory error; what a GPU run keeps on the host is not
counted (the checkpoint offload's host copies; with the optimizer offload the parameter, gradient and AdamW
shards). The plan is ``seqpack plan``'s for that device (CPU: no allocator slack, no context reserve).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace

from ..cli_types import fraction, positive_int
from .memory import GiB, PlanOptions, longest_fit, parse_memory, plan_memory
from .shape import FAMILIES, ModelShape, load_shape


@dataclass(frozen=True)
class Features:
    """The memory features of the measured step, by ``seqpack plan``'s names."""

    checkpoint: float = 0.0  # fraction of decoder layers with activation checkpointing
    precision: str = "fp32"  # fp32, bf16-mixed (FSDP2 mixed precision), bf16-autocast
    chunked_loss: bool = True
    loss_chunk: int = 1024
    tiled_mlp: bool = False
    mlp_tile: int | None = None  # None: hidden size tokens
    offload_checkpoints: bool = False
    offload_optimizer: bool = False
    tiled_attention: bool = False  # attention backward one key/value head group at a time

    def __post_init__(self):
        if self.offload_checkpoints and self.checkpoint <= 0:
            raise ValueError("--offload-checkpoints offloads the inputs of checkpointed layers: give --checkpoint "
                             "(a fraction of layers > 0, e.g. --checkpoint 1)")
        if self.precision not in PRECISION_KEYS:
            raise ValueError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISION_KEYS)}")


PRECISION_KEYS = {"fp32": {"model.dtype": "torch.float32"}, "bf16-mixed": {"model.mixed_precision": "fsdp"},
                  "bf16-autocast": {"model.mixed_precision": "autocast"}}


def train_config(shape: ModelShape, f: Features, device: str):
    """The ``seqpack train`` Config of a from-scratch model of ``shape`` with the features ``f`` on ``device``."""
    from ..train import load_config

    if shape.head_dim * shape.num_heads != shape.hidden_size:
        raise ValueError(f"head_dim {shape.head_dim} x {shape.num_heads} heads != hidden size {shape.hidden_size}: "
                         "seqpack train builds models with head_dim = hidden / heads")
    keys = {"model_type": shape.model_type, "model.hidden_size": shape.hidden_size,
            "model.num_layers": shape.num_layers, "model.num_attention_heads": shape.num_heads,
            "model.num_kv_attention_heads": shape.num_kv_heads, "model.vocab_size": shape.vocab_size,
            # intermediate = ceil(ratio x hidden): exactly the shape's
            "model.mlp_ratio": (shape.intermediate_size - 0.5) / shape.hidden_size, "model.multiple_of": 1,
            "model.tie_embeddings": shape.tie_embeddings, "model.checkpoint": f.checkpoint,
            "model.tiled_mlp": f.mlp_tile or f.tiled_mlp, "model.offload_checkpoints": f.offload_checkpoints,
            "model.tiled_attention": f.tiled_attention,
            "hybrid_zero_optimizer.cpu_offload": f.offload_optimizer, "loss.chunked": f.chunked_loss,
            "loss.chunk_size": f.loss_chunk, "train.device": device, **PRECISION_KEYS[f.precision]}
    return load_config(None, [x for k, v in keys.items() for x in (f"--{k}", str(v))])


def plan_options(f: Features, seq_len: int, device: str, doc_len: int | None = None) -> PlanOptions:
    """``seqpack plan``'s options for the measured step: one rank, one micro-batch, AdamW, documents of
    ``doc_len`` tokens."""
    return PlanOptions(seq_len, checkpoint=f.checkpoint, precision=f.precision, device=device, doc_len=doc_len,
                       micro_num=1, keep_logits=True, chunked_loss=f.chunked_loss, loss_chunk=f.loss_chunk,
                       tiled_mlp=f.tiled_mlp or f.mlp_tile is not None, mlp_tile=f.mlp_tile,
                       offload_checkpoints=f.offload_checkpoints, offload_optimizer=f.offload_optimizer,
                       tiled_attention=f.tiled_attention)


@dataclass
class Attempt:
    """One real step at ``seq_len`` tokens: did it fit, its peak device bytes (of the step that fitted, or up to
    the failure), its seconds."""

    seq_len: int
    fits: bool
    peak: int
    seconds: float


class Device:
    """The device steps run on, its memory budget, and one try of a step there."""

    def __init__(self, kind: str, budget: int | None, doc_len: int, warmup_len: int):
        import torch

        from ..parallel import init_topology

        self.torch, self.kind, self.doc_len, self.warmup_len = torch, kind, doc_len, warmup_len
        if kind == "cpu" and budget is None:
            raise ValueError("--mem is required on the CPU (the budget of the simulated accelerator), e.g. 512MiB")
        self.topo = init_topology(device=kind)
        if kind == "cuda":
            free, total = torch.cuda.mem_get_info(self.topo.device)
            if budget is not None and budget > total:
                raise ValueError(f"--mem {budget / GiB:.1f} GiB is more than the GPU's {total / GiB:.1f} GiB")
            if budget is not None:
                torch.cuda.set_per_process_memory_fraction(budget / total, self.topo.device)
            budget = budget or free
        self.budget = budget

    def close(self) -> None:
        self.topo.destroy()

    def attempt(self, cfg, vocab: int, seq_len: int) -> Attempt:
        """Build the model and optimizer of ``cfg``, warm up, and try one step on ``seq_len`` tokens."""
        from ..bench.train_step import TrainStep, packed_row

        torch = self.torch
        run = TrainStep(cfg, vocab, self.topo)
        try:
            run.step(packed_row(min(self.warmup_len, seq_len), vocab, self.doc_len))
            row = packed_row(seq_len, vocab, self.doc_len)
            gc.collect()
            return self._cuda_step(run, row) if self.kind == "cuda" else self._tracked_step(run, row)
        finally:
            del run
            gc.collect()
            if self.kind == "cuda":
                torch.cuda.empty_cache()

    def _cuda_step(self, run, row) -> Attempt:
        torch = self.torch
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.topo.device)
        try:
            run.step(row)
        except torch.cuda.OutOfMemoryError:
            run.optimizer.zero_grad(set_to_none=True)
            return Attempt(row.num_tokens, False, torch.cuda.max_memory_allocated(self.topo.device), 0.0)
        return Attempt(row.num_tokens, True, torch.cuda.max_memory_allocated(self.topo.device), run.times[-1])

    def _tracked_step(self, run, row) -> Attempt:
        from ..bench.budget import BudgetExceeded, DeviceBudget

        budget = DeviceBudget(self.budget)
        offload_optimizer = run.cfg.hybrid_zero_optimizer.cpu_offload
        hooks = []
        if not offload_optimizer:  # parameter shards and AdamW moments stay on the device
            budget.resident([list(run.model.parameters()), list(run.optimizer.state.values())])
        else:  # FSDP2 moves each reduced gradient shard to the host
            hooks = [p.register_post_accumulate_grad_hook(lambda p: budget.host(p.grad.to_local()))
                     for p in run.model.parameters() if p.requires_grad]
        budget.resident([list(run.model.buffers()), row.input_ids, row.shift_labels, row.position_ids,
                         row.cu_seqlens])
        if run.checkpoint_offload is not None:
            run.checkpoint_offload.on_host = budget.host
        t0 = time.perf_counter()
        try:
            with budget:
                run.forward_backward(row)
                if not offload_optimizer:
                    run.update()
            if offload_optimizer:  # the optimizer steps the host shards on the host
                run.update()
        except BudgetExceeded:
            return Attempt(row.num_tokens, False, budget.peak, 0.0)
        finally:
            for h in hooks:
                h.remove()
        return Attempt(row.num_tokens, True, budget.peak, time.perf_counter() - t0)


def bisect_longest(fits, first: int, limit: int) -> tuple[int, int]:
    """(lo, hi): the largest n >= 1 with ``fits(n)`` and hi = lo + 1 (which does not fit), starting at ``first``
    and galloping from there; (0, 1) when n = 1 does not fit. ``fits`` must be monotone; n stays <= ``limit``
    (lo = limit, hi = limit + 1 untried when everything fits)."""
    n = max(1, min(first, limit))
    if fits(n):
        lo, step = n, 1
        while True:
            hi = min(lo + step, limit + 1)
            if hi > limit or not fits(hi):
                break
            lo, step = hi, step * 2
    else:
        hi, step = n, 1
        while True:
            lo = max(hi - step, 0)
            if lo == 0 or fits(lo):
                break
            hi, step = lo, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi


@dataclass
class Longest:
    """What ``seqpack bench longest`` found for one set of features."""

    features: Features
    granularity: int
    budget: int
    measured: int  # longest T that trained a step (0: not even one granularity)
    failed: int  # the next multiple, which did not fit (or was not tried: above --max-tokens)
    peak: int  # tracked / allocated peak at ``measured``
    planned: int  # the plan's longest T (0: nothing fits)
    planned_peak: int  # the plan's allocated peak at ``measured``
    tries: list[Attempt]


def find_longest(shape: ModelShape, f: Features, device: Device, granularity: int = 256,
                 max_tokens: int = 1 << 20) -> Longest:
    """Bisect the longest packed row (a multiple of ``granularity``) whose real step fits ``device``'s budget."""
    cfg = train_config(shape, f, device.kind)
    plan = longest_fit(shape, plan_options(f, granularity, device.kind, device.doc_len), device.budget, multiple=granularity)
    planned = plan.options.seq_len if plan is not None else 0
    tried: dict[int, Attempt] = {}

    def fits(n: int) -> bool:
        if n not in tried:
            tried[n] = device.attempt(cfg, shape.vocab_size, n * granularity)
        return tried[n].fits

    lo, hi = bisect_longest(fits, max(planned // granularity, 1), max_tokens // granularity)
    T = lo * granularity
    planned_peak = plan_memory(shape, plan_options(f, T, device.kind, device.doc_len)).allocated if T else 0
    return Longest(f, granularity, device.budget, T, hi * granularity, tried[lo].peak if lo else 0, planned,
                   planned_peak, [tried[n] for n in sorted(tried)])


OFFLOADS = {"no offload": {}, "checkpoint offload": {"offload_checkpoints": True},
            "optimizer offload": {"offload_optimizer": True},
            "both offloads": {"offload_checkpoints": True, "offload_optimizer": True}}


def offload_times(shape: ModelShape, f: Features, device: Device, seq_len: int, steps: int = 2,
                  repeats: int = 2) -> dict[str, float | None]:
    """Median step seconds at ``seq_len`` of the features without offloads and with each (settings in turn,
    ``repeats`` rounds of ``steps`` steps on a fresh model each); None for a setting that does not fit (CUDA). On
    the CPU the steps are not tracked: the budget does not apply."""
    from ..bench.train_step import TrainStep, packed_row

    settings = {name: replace(f, **{"offload_checkpoints": False, "offload_optimizer": False, **keys})
                for name, keys in OFFLOADS.items() if f.checkpoint > 0 or "offload_checkpoints" not in keys}
    times: dict[str, list | None] = {name: [] for name in settings}
    row = packed_row(seq_len, shape.vocab_size, device.doc_len)
    warm = packed_row(min(device.warmup_len, seq_len), shape.vocab_size, device.doc_len)
    torch = device.torch
    for _ in range(repeats):
        for name, features in settings.items():
            if times[name] is None:
                continue
            run = TrainStep(train_config(shape, features, device.kind), shape.vocab_size, device.topo)
            try:
                run.step(warm)
                run.times.clear()
                for _ in range(steps):
                    run.step(row)
                times[name] += run.times
            except torch.cuda.OutOfMemoryError:
                times[name] = None
            finally:
                del run
                gc.collect()
                if device.kind == "cuda":
                    torch.cuda.empty_cache()
    return {name: statistics.median(t) if t else None for name, t in times.items()}


def render(shape: ModelShape, result: Longest, times: dict, device: Device) -> str:
    """The results as Markdown tables."""
    f, mib = result.features, 2**20
    on = [f"checkpoint {f.checkpoint:.0%}", f.precision, "chunked loss" if f.chunked_loss else "full logits"]
    on += ["tiled MLP"] * (f.tiled_mlp or f.mlp_tile is not None) + ["tiled attention"] * f.tiled_attention
    on += ["checkpoint offload"] * f.offload_checkpoints + ["optimizer offload"] * f.offload_optimizer
    where = "CPU (tracked budget)" if device.kind == "cpu" else device.torch.cuda.get_device_name(device.topo.device)
    ratio = f"{result.measured / result.planned:.2f}" if result.planned else "-"
    peak = f"{result.peak / mib:.1f} vs {result.planned_peak / mib:.1f} " \
           f"({result.planned_peak / result.peak - 1:+.1%})" if result.measured else "-"
    lines = [f"{where}, budget {result.budget / mib:.0f} MiB; model h={shape.hidden_size} L={shape.num_layers} "
             f"N={shape.num_heads} Nkv={shape.num_kv_heads} i={shape.intermediate_size} V={shape.vocab_size}; "
             f"{', '.join(on)}; documents of {device.doc_len} tokens; {len(result.tries)} tries",
             "", "| longest T measured | next T (does not fit) | plan's longest T | measured / plan | "
             "peak MiB at T: measured vs plan |", "|---:|---:|---:|---:|---|",
             f"| {result.measured:,} | {result.failed:,} | {result.planned:,} | {ratio} | {peak} |"]
    if times:
        base = times.get("no offload")
        lines += ["", f"step time at T={result.measured:,}:", "| setting | step ms | vs no offload |",
                  "|---|---:|---:|"]
        for name, t in times.items():
            cell = "does not fit" if t is None else f"{t * 1e3:.0f}"
            vs = f"{t / base:.2f}x" if t is not None and base else ""
            lines.append(f"| {name} | {cell} | {vs} |")
    return "\n".join(lines)


EXAMPLES = """examples:
  seqpack bench longest --mem 512MiB --hidden 128 --layers 2 --checkpoint 1
  seqpack bench longest --mem 512MiB --checkpoint 1 --offload-checkpoints --json
  seqpack bench longest --hidden 2048 --layers 22 --heads 32 --kv-heads 4 --inter 5632 --vocab 32000 \\
      --checkpoint 1 --tiled-mlp --tiled-attention --offload-checkpoints --offload-optimizer \
      --granularity 4096   # on a GPU"""


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (also the source of its reference page)."""
    parser = argparse.ArgumentParser(prog="seqpack bench longest", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="model shape: a local HF model folder, config.json or "
                        "InternEvo-style config (.py); default: the --hidden/--layers/... flags")
    parser.add_argument("--hidden", type=positive_int, default=128, help="hidden size (default 128)")
    parser.add_argument("--layers", type=positive_int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--heads", type=positive_int, default=4, help="attention heads (default 4)")
    parser.add_argument("--kv-heads", type=positive_int, help="key/value heads (default: --heads)")
    parser.add_argument("--inter", type=positive_int, help="MLP intermediate size (default: 8/3 x hidden, "
                        "rounded up to a multiple of 32)")
    parser.add_argument("--vocab", type=positive_int, default=4096, help="vocabulary size (default 4096)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the steps run (default: cuda when available)")
    parser.add_argument("--mem", help="device memory budget, e.g. 512MiB, 80GiB; required on the CPU; on CUDA "
                        "default: the GPU's free memory")
    parser.add_argument("--checkpoint", type=fraction, default=0.0,
                        help="fraction of layers with activation checkpointing (default 0)")
    parser.add_argument("--precision", choices=sorted(PRECISION_KEYS), help="fp32; bf16-mixed: FSDP2 mixed "
                        "precision over float32 weights; bf16-autocast (default: bf16-mixed on CUDA, fp32 on CPU)")
    parser.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=True,
                        help="loss over sequence chunks, never the [T, vocab] logits (default on, as seqpack train)")
    parser.add_argument("--loss-chunk", type=positive_int, default=1024, help="tokens per loss chunk (default 1024)")
    parser.add_argument("--tiled-mlp", action=argparse.BooleanOptionalAction, default=False,
                        help="MLP over sequence tiles, recomputed in backward (default off)")
    parser.add_argument("--mlp-tile", type=positive_int, help="tokens per MLP tile (default: hidden size)")
    parser.add_argument("--tiled-attention", action=argparse.BooleanOptionalAction, default=False,
                        help="attention backward one key/value head group at a time, recomputing its forward "
                        "(default off)")
    parser.add_argument("--offload-checkpoints", action=argparse.BooleanOptionalAction, default=False,
                        help="inputs of checkpointed layers in host memory (needs --checkpoint)")
    parser.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=False,
                        help="float32 weights, gradients and AdamW state in host memory")
    parser.add_argument("--granularity", type=positive_int, default=256,
                        help="T is a multiple of this many tokens (default 256)")
    parser.add_argument("--max-tokens", type=positive_int, default=1 << 20,
                        help="longest T tried (default 1048576)")
    parser.add_argument("--doc-len", type=positive_int, default=2048,
                        help="tokens per document of the packed row, the last one cut (default 2048)")
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps per setting and round (default 2)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="rounds over the offload settings (default 2)")
    parser.add_argument("--no-times", action="store_true", help="skip the step times with and without offloads")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def shape_of(args) -> ModelShape:
    """The model shape of the command line (a file, or the shape flags)."""
    if args.source:
        return load_shape(args.source, args.vocab)[0]
    inter = args.inter or 32 * -(-8 * args.hidden // (3 * 32))
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    return ModelShape("llama", args.hidden, args.layers, args.heads, args.kv_heads or args.heads,
                      args.hidden // args.heads, inter, args.vocab, **FAMILIES["llama"])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from ..parallel.topology import choose_device

    try:
        kind = choose_device(args.device)[1].type
        shape = shape_of(args)
        features = Features(args.checkpoint, args.precision or ("bf16-mixed" if kind == "cuda" else "fp32"),
                            args.chunked_loss, args.loss_chunk, args.tiled_mlp, args.mlp_tile,
                            args.offload_checkpoints, args.offload_optimizer, args.tiled_attention)
        budget = parse_memory(args.mem, "--mem") if args.mem else None
        if kind == "cpu":
            torch.set_num_threads(1)
        device = Device(kind, budget, args.doc_len, warmup_len=args.granularity)
    except ValueError as err:
        parser.error(str(err))
    try:
        result = find_longest(shape, features, device, args.granularity, args.max_tokens)
        times = {} if args.no_times or not result.measured else \
            offload_times(shape, features, device, result.measured, args.steps, args.repeats)
    finally:
        device.close()
    if args.json:
        print(json.dumps(dict(shape=asdict(shape), device=kind, **asdict(result), step_seconds=times), indent=1))
    else:
        print(render(shape, result, times, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

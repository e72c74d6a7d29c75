"""``seqpack bench train``: what the training loop costs around the step, and what the step features save.

Speed (one process, same model, same batches from the same loader):
  (a)  bare step: ``model(**inputs).logits`` -> ``causal_lm_loss`` -> backward, per micro-batch -> AdamW step
  (a') the same bare step with the chunked loss (``model(..., chunked_loss_labels=...)``)
  (b)  ``seqpack train`` steps (its own ``step_time`` from metrics.jsonl), chunked loss off and on
  printed: (b)/(a) with the same loss, and (b, defaults)/(a, full logits) — fastest and median step after warm-up.

Memory (a fresh process per row, so each peak is its own): one training step (forward + backward + AdamW) of a
packed row of T tokens (log-normal documents), with the chunked loss and the tiled MLP on/off; peak = growth of
the process's peak RSS over its size after a warm-up step. A row whose peak, extrapolated linearly from the same
configuration at the previous T, would exceed ``--max-gib`` is not run (the machine is shared). Longest row under
a cap: from a linear fit peak(T) = a + b·T per configuration (attention memory is linear in T here: per-document
buckets), with the cap = the chunked-loss-only peak at the middle T.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..cli_types import positive_float, positive_int

MEMORY_CONFIGS = {  # name -> overrides
    "full logits": ["--loss.chunked", "False", "--model.tiled_mlp", "False"],
    "chunked loss": ["--loss.chunked", "True", "--model.tiled_mlp", "False"],
    "tiled MLP": ["--loss.chunked", "False", "--model.tiled_mlp", "True"],
    "chunked + tiled": ["--loss.chunked", "True", "--model.tiled_mlp", "True"],
}


def model_overrides(args) -> list[str]:
    return ["--model.hidden_size", str(args.hidden), "--model.num_layers", str(args.layers),
            "--model.num_attention_heads", "4", "--model.num_kv_attention_heads", "2",
            "--model.vocab_size", str(args.vocab), "--model.max_position_embeddings", str(1 << 17)]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_one(T: int, overrides: list[str], seed: int = 0) -> dict:
    """One training step of a T-token packed row in this process: peak RSS growth (MiB) and seconds."""
    import torch

    import seqpack
    from seqpack.bench.measure import doc_lengths
    from seqpack.parallel import StepLoss
    from seqpack.train import load_config
    from seqpack.train.loop import build_optimizer
    from seqpack.train.model import build_model, uses_chunked_loss

    cfg = load_config(None, overrides)
    model = build_model(cfg, cfg.model.vocab_size)
    optimizer = build_optimizer(model, cfg)
    torch.manual_seed(seed)
    chunked = uses_chunked_loss(model)

    def step(length: int) -> None:
        docs = [torch.randint(3, cfg.model.vocab_size, (n,)) for n in doc_lengths(length, "lognormal", seed)]
        batch = seqpack.pack(docs)
        loss = StepLoss([batch], None)
        if chunked:
            loss.sum_loss(model(**batch.model_inputs(), chunked_loss_labels=batch.shift_labels).loss).backward()
        else:
            loss(model(**batch.model_inputs()).logits, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(256)  # warm-up: optimizer state, lazy initialisation
    base = _rss_mib()
    start = time.perf_counter()
    step(T)
    seconds = time.perf_counter() - start
    return dict(T=T, peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, step_s=seconds)


def memory_table(args) -> list[dict]:
    results = []
    for name in args.configs:
        previous = None
        for T in args.T:
            if previous is not None and previous["peak_mib"] * T / previous["T"] > args.max_gib * 1024:
                est = previous["peak_mib"] * T / previous["T"] / 1024
                print(f"  {name:16s} T={T:6d}  not run: ~{est:.1f} GiB extrapolated > --max-gib {args.max_gib}",
                      flush=True)
                results.append(dict(config=name, T=T, skipped=f"~{est:.1f} GiB extrapolated"))
                continue
            cmd = [sys.executable, "-m", "seqpack.bench.train", "--one-memory", str(T), *model_overrides(args),
                   *MEMORY_CONFIGS[name]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"  {name:16s} T={T:6d}  failed: {tail}", flush=True)
                results.append(dict(config=name, T=T, skipped=f"failed: {tail[:80]}"))
                continue
            r = dict(config=name, **json.loads(proc.stdout.strip().splitlines()[-1]))
            previous = r
            results.append(r)
            print(f"  {name:16s} T={T:6d}  peak +{r['peak_mib']:8.0f} MiB  step {r['step_s']:6.2f} s", flush=True)
    return results


def longest_under_cap(results: list[dict], cap_mib: float) -> dict:
    """{config: longest T with peak <= cap} from a least-squares line through the measured points (>= 2)."""
    out = {}
    for name in dict.fromkeys(r["config"] for r in results):
        pts = [(r["T"], r["peak_mib"]) for r in results if r["config"] == name and "peak_mib" in r]
        if len(pts) < 2:
            continue
        mt, mp = statistics.fmean(t for t, _ in pts), statistics.fmean(p for _, p in pts)
        slope = sum((t - mt) * (p - mp) for t, p in pts) / sum((t - mt) ** 2 for t, _ in pts)
        out[name] = int((cap_mib - (mp - slope * mt)) / slope)
    return out


def speed(args) -> dict:
    """Median step seconds of the bare step and of `seqpack train` on the same model and batches."""
    import torch

    import seqpack
    from seqpack.parallel import init_topology
    from seqpack.train import load_config, train
    from seqpack.train.loop import build_optimizer
    from seqpack.train.model import build_model
    from seqpack.train.setup import build_loader, load_tokenizer

    base = [*model_overrides(args), "--data.seq_len", str(args.speed_T), "--data.micro_num", "2",
            "--lr_scheduler.total_steps", str(args.steps), "--train.tensorboard", "False",
            "--ckpt.enable_save_ckpt", "False", "--ckpt.export_hf", "False", "--model.tiled_mlp", "False"]
    skip = min(2, args.steps - 1)
    times = {}
    for chunked in (False, True):
        cfg = load_config(None, [*base, "--loss.chunked", str(chunked)])
        tokenizer = load_tokenizer(cfg)
        topo = init_topology()
        loader = build_loader(cfg, tokenizer, topo, vocab_size=cfg.model.vocab_size)
        steps = [next(loader) for _ in range(args.steps)]
        model = build_model(cfg, len(tokenizer), topo)
        optimizer = build_optimizer(model, cfg)
        bare = []
        for rows in steps:  # (a): the bare step
            t0 = time.perf_counter()
            valid = sum(b.num_valid_targets for b in rows)
            for b in rows:
                if chunked:
                    (model(**b.model_inputs(), chunked_loss_labels=b.shift_labels).loss / valid).backward()
                else:
                    seqpack.causal_lm_loss(model(**b.model_inputs()).logits, b, num_valid=valid).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bare.append(time.perf_counter() - t0)
        del model, optimizer
        with tempfile.TemporaryDirectory() as run_dir:  # (b): seqpack train on the same rows
            train(load_config(None, [*base, "--loss.chunked", str(chunked), "--train.run_dir", run_dir]))
            loop = [json.loads(line)["step_time"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
                    if line.strip()]
        times[chunked] = {"median": (statistics.median(bare[skip:]), statistics.median(loop[skip:])),
                          "best": (min(bare[skip:]), min(loop[skip:]))}
        torch.manual_seed(0)
    return times


EXAMPLES = "examples:\n  seqpack bench train --part memory --T 8192 16384"


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (also the source of its reference page)."""
    parser = argparse.ArgumentParser(prog="seqpack bench train", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "speed", "memory"), default="all", help="which measurement")
    parser.add_argument("--T", type=positive_int, nargs="+", default=[8192, 16384, 32768], help="row lengths (memory)")
    parser.add_argument("--configs", nargs="+", default=list(MEMORY_CONFIGS), choices=list(MEMORY_CONFIGS),
                        help="step features to compare (memory)")
    parser.add_argument("--hidden", type=positive_int, default=256, help="hidden size of the Llama-shaped model")
    parser.add_argument("--layers", type=positive_int, default=2, help="decoder layers")
    parser.add_argument("--vocab", type=positive_int, default=32000, help="vocabulary size (the logits grow with it)")
    parser.add_argument("--max-gib", type=positive_float, default=6.0, help="do not run rows extrapolated above this peak")
    parser.add_argument("--speed-T", type=positive_int, default=1024, help="tokens per micro-batch row (speed; 2 per step)")
    parser.add_argument("--steps", type=positive_int, default=12, help="steps per speed measurement (2 warm-up)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one-memory", type=int, help=argparse.SUPPRESS)  # worker mode: T, then config overrides
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.one_memory:
        print(json.dumps(memory_one(args.one_memory, rest)))
        return 0
    print(f"llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32 CPU, "
          f"threads: {os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    report = {}
    if args.part in ("all", "speed"):
        times = speed(args)
        report["speed"] = {str(k): v for k, v in times.items()}
        print(f"\nspeed: 2 x {args.speed_T} tokens per step, {args.steps - 2} steps after 2 warm-up; best = fastest "
              "step (other processes only ever slow a step down), median")
        print("| loss | statistic | (a) bare step s | (b) seqpack train step s | (b)/(a) |\n|---|---|---|---|---|")
        for chunked, name in ((False, "full logits"), (True, "chunked")):
            for stat in ("best", "median"):
                a, b = times[chunked][stat]
                print(f"| {name} | {stat} | {a:.3f} | {b:.3f} | {b / a:.3f} |")
        for stat in ("best", "median"):
            print(f"`seqpack train` with its defaults (chunked) / bare step with full logits ({stat}): "
                  f"{times[True][stat][1] / times[False][stat][0]:.3f}")
    if args.part in ("all", "memory"):
        print("\nmemory: one training step (forward + backward + AdamW)", flush=True)
        results = memory_table(args)
        report["memory"] = results
        print("| T | " + " | ".join(args.configs) + " |\n|---|" + "---|" * len(args.configs))
        for T in args.T:
            cells = []
            for name in args.configs:
                r = next(r for r in results if r["config"] == name and r["T"] == T)
                cells.append(f"{r['peak_mib']:.0f} MiB" if "peak_mib" in r else f"not run ({r['skipped']})")
            print(f"| {T} | " + " | ".join(cells) + " |")
        mid = args.T[len(args.T) // 2]
        ref = {r["config"]: r for r in results if r["T"] == mid and "peak_mib" in r}
        if "full logits" in ref and "chunked loss" in ref:
            cut = 1 - ref["chunked loss"]["peak_mib"] / ref["full logits"]["peak_mib"]
            print(f"chunked loss cuts the whole-step peak at T={mid} by {cut:.0%}")
        if "chunked loss" in ref:
            cap = ref["chunked loss"]["peak_mib"]
            longest = longest_under_cap(results, cap)
            print(f"longest row under a {cap:.0f} MiB cap (linear fit): "
                  + ", ".join(f"{k} {v}" for k, v in longest.items()))
            if "chunked loss" in longest and "chunked + tiled" in longest:
                print(f"tiled MLP grows it {longest['chunked + tiled'] / longest['chunked loss']:.2f}x")
            report["longest_under_cap"] = dict(cap_mib=cap, **longest)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

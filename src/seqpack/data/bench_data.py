"""Data benchmarks: packing speed and fill ratio per strategy, and ftdp reading throughput.

    python -m seqpack.data.bench_data --docs 1000000 --pack 8192          # packing table
    python -m seqpack.data.bench_data --read FOLDER                       # + reading throughput of a folder

Packing works on lengths only (the plan); fill = real tokens / token slots of the packs (``cut``/``into_one``
lose only the tail of each file; ``bfd``/``padded`` pad every pack to the pack size).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..cli_types import positive_int
from .packing import plan_bfd, plan_cut, plan_padded


def lognormal_lengths(n: int, mu: float = 6.0, sigma: float = 1.0, max_len: int = 32768, seed: int = 0) -> np.ndarray:
    """[n] int64 document lengths ~ LogNormal(mu, sigma) clipped to 1..max_len (median e^mu ~ 400 tokens)."""
    return np.clip(np.random.default_rng(seed).lognormal(mu, sigma, size=n), 1, max_len).astype(np.int64)


def bench_packing(lengths: np.ndarray, pack: int, repeats: int = 3) -> list[dict]:
    """Best-of-``repeats`` planning time per strategy -> rows {strategy, docs_per_s, fill, packs}."""
    strategies = {
        "cut": lambda: plan_cut(lengths, pack),
        "into_one": lambda: plan_cut(lengths, pack),  # same plan; only segment boundaries differ when rendered
        "bfd": lambda: plan_bfd(lengths, pack, "split"),
        "padded": lambda: plan_padded(lengths, pack, "split"),
    }
    rows = []
    for name, fn in strategies.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            plan = fn()
            best = min(best, time.perf_counter() - t0)
        used = int((plan.end - plan.start).sum())
        rows.append(dict(strategy=name, docs_per_s=len(lengths) / best, seconds=best,
                         fill=used / (plan.num_units * pack), packs=plan.num_units))
    return rows


def bench_reading(folder: str, seq_len: int = 8192, steps: int = 50) -> dict:
    """Tokens/s of ``PackedLoader`` (cut) over an ftdp folder: read + parse + build PackedBatch rows."""
    from .loader import PackedLoader

    loader = PackedLoader(folder, seq_len=seq_len)
    steps = min(steps, loader.stats["steps_per_epoch"])
    t0 = time.perf_counter()
    for _ in range(steps):
        next(loader)
    seconds = time.perf_counter() - t0
    return dict(tokens_per_s=steps * seq_len / seconds, rows=steps, seconds=seconds)


EXAMPLES = "examples:\n  seqpack bench data --docs 1000000 --pack 8192"


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (also the source of its reference page)."""
    parser = argparse.ArgumentParser(prog="seqpack bench data", description=__doc__.splitlines()[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=positive_int, default=1_000_000, help="documents to pack (log-normal lengths)")
    parser.add_argument("--pack", type=positive_int, default=8192, help="tokens per pack")
    parser.add_argument("--read", default=None, help="ftdp folder to measure reading throughput on")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    lengths = lognormal_lengths(args.docs)
    print(f"{args.docs} documents, LogNormal(6, 1) lengths (mean {lengths.mean():.0f}, max {lengths.max()}), "
          f"pack {args.pack}")
    print("| strategy | docs/s | fill | packs |\n|---|---:|---:|---:|")
    for r in bench_packing(lengths, args.pack):
        print(f"| {r['strategy']} | {r['docs_per_s'] / 1e6:.2f} M | {100 * r['fill']:.3f} % | {r['packs']} |")
    if args.read:
        r = bench_reading(args.read, args.pack)
        print(f"reading {args.read}: {r['tokens_per_s'] / 1e6:.2f} M tokens/s ({r['rows']} rows of {args.pack})")


if __name__ == "__main__":
    main()

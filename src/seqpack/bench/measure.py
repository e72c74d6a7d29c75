"""Measurement helpers shared by the packing benchmarks (``packing.py``, ``packing_ssm.py``): document lengths,
one measurement per fresh worker process and its memory, and the results table with ratios against seqpack."""

from __future__ import annotations

import json
import math
import os
import random
import resource
import subprocess
import sysconfig
from pathlib import Path

LEAK_TOLERANCE = 1e-4  # max |change| of a document's logits when the document before it changes ("separates")


def doc_lengths(total: int, dist: str = "lognormal", seed: int = 0, median: int = 400) -> list[int]:
    """Document lengths (tokens) filling exactly ``total``; the last one is cut."""
    rng = random.Random(seed)
    if dist == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        sizes = sorted(max(1, p.stat().st_size // 4) for p in root.rglob("*.py"))
        rng.shuffle(sizes)
        draw = iter(sizes).__next__
    else:
        draw = lambda: max(1, int(rng.lognormvariate(math.log(median), 1.1)))  # noqa: E731
    lengths, used = [], 0
    while used < total:
        n = min(draw(), total - used)
        lengths.append(n)
        used += n
    return lengths


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _padded_micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Documents in order, cut into micro-batches whose padded size (rows x longest) stays within ``budget``."""
    groups, current, longest = [], [], 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    return groups + [current]


def run_worker(cmd: list[str], method: str, T: int) -> dict:
    """Run one measurement in a fresh process (``cmd``); its last stdout line is the JSON result. A failed worker
    gives ``{"method", "T", "failed": last stderr line}`` (printed) instead."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        print(f"T={T} {method}: failed ({tail[0]})")
        return dict(method=method, T=T, failed=tail[0])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render_table(results: list[dict]) -> str:
    """Markdown table with ratios against seqpack at each T, each method's loss next to the exact per-document
    loss, and whether the method separates documents (leak probe)."""
    mfu = any("mfu" in r for r in results)
    head = ["T", "docs", "method", "step (s)", "tokens/s"] + ["MFU"] * mfu + \
        ["peak mem (MB)", "seqpack speed-up", "memory vs seqpack", "loss", "per-document loss", "separates documents"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_t: dict[int, dict] = {}
    for r in results:
        by_t.setdefault(r["T"], {})[r["method"]] = r
    for T, group in by_t.items():
        ours = group.get("seqpack")
        ours = ours if ours and "failed" not in ours else None
        for method, r in group.items():
            if "failed" in r:
                rows.append(f"| {T} | | {method} | failed: {r['failed'][:60]} |" + " |" * (len(head) - 4))
                continue
            note = f" (slot waste {r['slot_waste']:.2f}x)" if method == "padded" else ""
            cells = [str(T), str(r["docs"]), method + note, f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}"]
            if mfu:
                cells.append(f"{r['mfu']:.1%}" if "mfu" in r else "")
            cells += [f"{r['peak_mb']:.0f}", f"{r['step_s'] / ours['step_s']:.2f}x" if ours else "",
                      f"{r['peak_mb'] / max(ours['peak_mb'], 1):.2f}x" if ours else ""]
            if "loss" in r:
                exact = "yes" if r["leak"] <= LEAK_TOLERANCE else f"**no** (leak {r['leak']:.1e})"
                cells += [f"{r['loss']:.5f}", f"{r['exact_loss']:.5f}", exact]
            else:
                cells += ["", "", ""]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)

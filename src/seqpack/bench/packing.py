"""``seqpack bench packing``: one training step (forward + backward) on the same documents three ways.

- seqpack: one packed row, ``attn_implementation="seqpack"`` (exact varlen, no T x T mask)
- sdpa-packed: the same row through transformers' own packed path (``attn_implementation="sdpa"`` with restarting
  position_ids, which builds a dense [T, T] block mask)
- padded: the same documents one per row, padded to the longest in each micro-batch (at most T slots each)

Document lengths follow a log-normal distribution (median 400 tokens, sigma 1.1: many short documents, a heavy
tail), or with ``--dist stdlib`` the sizes of the running interpreter's standard-library files (4 bytes per
token); the last document is cut at T. Each (method, T) runs in a fresh process so its peak memory is its own
(peak RSS growth over the process's size once the model is built).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1 << 16)
METHODS = ("seqpack", "sdpa-packed", "padded")


def doc_lengths(total: int, dist: str = "lognormal", seed: int = 0) -> list[int]:
    """Document lengths (tokens) filling exactly ``total``; the last one is cut."""
    rng = random.Random(seed)
    if dist == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        sizes = sorted(max(1, p.stat().st_size // 4) for p in root.rglob("*.py"))
        rng.shuffle(sizes)
        draw = iter(sizes).__next__
    else:
        draw = lambda: max(1, int(rng.lognormvariate(math.log(400), 1.1)))  # noqa: E731
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


def run_one(method: str, T: int, steps: int, seed: int, dist: str, attention_only: bool = False) -> dict:
    """Time ``steps`` training steps (after one warm-up) of ``method`` on a row of T tokens; in this process.
    ``attention_only``: forward + backward of one attention call (the model's q/k/v shapes) instead of the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import seqpack

    torch.manual_seed(seed)
    lengths = doc_lengths(T, dist, seed)
    docs = [torch.randint(3, MODEL["vocab_size"], (n,)) for n in lengths]
    cfg = AutoConfig.for_model("llama", **MODEL)
    impl = {"seqpack": "seqpack", "sdpa-packed": "sdpa", "padded": "sdpa"}[method]
    cfg._attn_implementation = impl
    model = _AttentionOnly(cfg) if attention_only else AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    batch = seqpack.pack(docs)

    def loss_of(inputs, labels, num_valid):
        if attention_only:
            return model(**inputs).sum() / num_valid
        return seqpack.causal_lm_loss(model(**inputs).logits, labels, num_valid=num_valid)

    def packed_step():
        inputs = batch.model_inputs() if method == "seqpack" else dict(input_ids=batch.input_ids,
                                                                        position_ids=batch.position_ids)
        loss_of(inputs, batch.shift_labels, batch.num_valid_targets).backward()

    micro_batches = _padded_micro_batches(lengths, T)

    def padded_step():
        valid = batch.num_valid_targets
        for group in micro_batches:
            L = max(lengths[i] for i in group)
            ids = torch.zeros(len(group), L, dtype=torch.long)
            mask = torch.zeros(len(group), L, dtype=torch.long)
            labels = torch.full((len(group), L), -100)
            for r, i in enumerate(group):
                ids[r, :lengths[i]], mask[r, :lengths[i]] = docs[i], 1
                labels[r, :lengths[i] - 1] = docs[i][1:]
            loss_of(dict(input_ids=ids, attention_mask=mask), labels, valid).backward()

    step = padded_step if method == "padded" else packed_step
    base = _rss_mb()
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    slots = sum(len(g) * max(lengths[i] for i in g) for g in micro_batches)
    return dict(method=method, T=T, docs=len(lengths), step_s=seconds, tokens_per_s=T / seconds,
                peak_mb=_peak_rss_mb() - base, slot_waste=slots / T)


class _AttentionOnly:
    """Stands in for the model: random q/k/v of the model's shapes through the registered attention function only,
    with the mask transformers itself builds for it. Returns the attention output [B, L, N, D]."""

    def __init__(self, cfg):
        import torch
        from transformers import AttentionInterface

        self.cfg, self.torch = cfg, torch
        self.n, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = cfg.hidden_size // self.n
        self.fn = AttentionInterface()[cfg._attn_implementation]
        self.module = torch.nn.Module()
        self.module.num_key_value_groups, self.module.is_causal, self.module.layer_idx = self.n // self.nkv, True, 0

    def __call__(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        from transformers.masking_utils import create_causal_mask

        torch = self.torch
        B, L = input_ids.shape
        q = torch.randn(B, self.n, L, self.d, requires_grad=True)
        k, v = (torch.randn(B, self.nkv, L, self.d, requires_grad=True) for _ in range(2))
        mask = create_causal_mask(config=self.cfg, inputs_embeds=torch.empty(B, L, 1), attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids)
        return self.fn(self.module, q, k, v, mask, scaling=self.d ** -0.5, position_ids=position_ids, **kwargs)[0]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seqpack bench packing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384], help="row lengths T")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dist", choices=("lognormal", "stdlib"), default="lognormal", help="document lengths")
    parser.add_argument("--attention-only", action="store_true",
                        help="time one attention call (fwd+bwd) with the mask transformers builds, not the model")
    parser.add_argument("--model", choices=("llama", "mamba", "mamba2"), default="llama",
                        help="mamba / mamba2: a tiny SSM, packed vs padded (bench/packing_ssm.py)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args(argv)
    if args.model != "llama":
        from .packing_ssm import main as ssm_main

        return ssm_main(args)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps, args.seed, args.dist,
                                    args.attention_only)))
        return 0

    what = "one attention call of" if args.attention_only else "training step of"
    print(f"{what} llama {MODEL}; documents: {args.dist}; threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    results = []
    for T in args.lengths:
        for method in args.methods:
            cmd = [sys.executable, "-m", "seqpack.bench.packing", "--one", method, str(T), "--steps", str(args.steps),
                   "--seed", str(args.seed), "--dist", args.dist] + ["--attention-only"] * args.attention_only
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
                print(f"T={T} {method}: failed ({tail[0]})")
                results.append(dict(method=method, T=T, failed=tail[0]))
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"T={T:6d} {method:12s} {r['step_s']:8.3f} s/step  {r['tokens_per_s']:8.0f} tok/s  "
                  f"peak +{r['peak_mb']:7.0f} MB", flush=True)
    print(render_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def render_table(results: list[dict]) -> str:
    """Markdown table with ratios against seqpack at each T."""
    rows = ["| T | docs | method | step (s) | tokens/s | peak mem (MB) | seqpack speed-up | memory vs seqpack |",
            "|---|---|---|---|---|---|---|---|"]
    by_t: dict[int, dict] = {}
    for r in results:
        by_t.setdefault(r["T"], {})[r["method"]] = r
    for T, group in by_t.items():
        ours = group.get("seqpack")
        for method, r in group.items():
            if "failed" in r:
                rows.append(f"| {T} | | {method} | failed: {r['failed'][:60]} | | | | |")
                continue
            note = f" (slot waste {r['slot_waste']:.2f}x)" if method == "padded" else ""
            speed = f"{r['step_s'] / ours['step_s']:.2f}x" if ours and "failed" not in ours else ""
            mem = f"{r['peak_mb'] / max(ours['peak_mb'], 1):.2f}x" if ours and "failed" not in ours else ""
            rows.append(f"| {T} | {r['docs']} | {method}{note} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                        f"{r['peak_mb']:.0f} | {speed} | {mem} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())

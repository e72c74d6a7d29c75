"""``seqpack bench packing --model mamba|mamba2``: one training step of a tiny Mamba on the same documents, packed
vs padded.

- packed: one row of T tokens, ``seqpack.dispatch`` (every mixer restarts at each document)
- padded: the same documents one per row, right-padded to the longest of each micro-batch (at most T slots),
  ``attention_mask`` on the padding — the usual way to train transformers' Mamba without packing

Document lengths and the padded micro-batches are those of the Llama benchmark (``packing.py``); each (method, T)
runs in a fresh process so its peak memory is its own. Step time is this process's CPU time (``step_s``; wall
time in ``wall_s``): on a shared machine it does not count the time other processes hold the cores. Run with
``OMP_NUM_THREADS=1`` so that CPU time is compute time.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .measure import _padded_micro_batches, _peak_rss_mb, _rss_mb, doc_lengths, render_table, run_worker

MODELS = {
    "mamba": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, state_size=16, expand=2, conv_kernel=4),
    "mamba2": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, state_size=16, expand=2, conv_kernel=4,
                   num_heads=8, head_dim=32, n_groups=1, chunk_size=64),
}
METHODS = ("seqpack", "padded")


def run_one(model_type: str, method: str, T: int, steps: int, seed: int, dist: str) -> dict:
    """Time ``steps`` training steps (after one warm-up) of ``method`` on a row of T tokens; in this process."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import seqpack

    torch.manual_seed(seed)
    lengths = doc_lengths(T, dist, seed)
    docs = [torch.randint(3, MODELS[model_type]["vocab_size"], (n,)) for n in lengths]
    model = seqpack.dispatch(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type,
                                                                                   **MODELS[model_type])))
    model.train()
    batch = seqpack.pack(docs)
    micro_batches = _padded_micro_batches(lengths, T)

    def packed_step():
        logits = model(**batch.model_inputs()).logits
        seqpack.causal_lm_loss(logits, batch).backward()

    def padded_step():
        for group in micro_batches:
            L = max(lengths[i] for i in group)
            ids = torch.zeros(len(group), L, dtype=torch.long)
            mask = torch.zeros(len(group), L, dtype=torch.long)
            labels = torch.full((len(group), L), -100)
            for r, i in enumerate(group):
                ids[r, :lengths[i]], mask[r, :lengths[i]] = docs[i], 1
                labels[r, :lengths[i] - 1] = docs[i][1:]
            logits = model(input_ids=ids, attention_mask=mask).logits
            seqpack.causal_lm_loss(logits, labels, num_valid=batch.num_valid_targets).backward()

    step = padded_step if method == "padded" else packed_step
    base = _rss_mb()
    step()  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    seconds = (time.process_time() - cpu_start) / steps
    slots = sum(len(g) * max(lengths[i] for i in g) for g in micro_batches)
    return dict(method=method, T=T, docs=len(lengths), step_s=seconds, wall_s=(time.perf_counter() - start) / steps,
                tokens_per_s=T / seconds, peak_mb=_peak_rss_mb() - base, slot_waste=slots / T)


def main(args) -> int:
    """Called by ``seqpack bench packing`` with its parsed arguments when ``--model`` is an SSM."""
    if args.one:
        print(json.dumps(run_one(args.model, args.one[0], int(args.one[1]), args.steps, args.seed, args.dist)))
        return 0
    if args.attention_only:
        raise ValueError("--attention-only has no meaning for an SSM (no attention); drop it")
    methods = [m for m in args.methods if m in METHODS]
    if not methods:
        raise ValueError(f"--model {args.model} compares {', '.join(METHODS)}; --methods {args.methods} has none")
    print(f"training step of {args.model} {MODELS[args.model]}; documents: {args.dist}; "
          f"threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; step (s) = CPU time of the process")
    results = []
    for T in args.lengths:
        for method in methods:
            cmd = [sys.executable, "-m", "seqpack.bench.packing", "--model", args.model, "--one", method, str(T),
                   "--steps", str(args.steps), "--seed", str(args.seed), "--dist", args.dist]
            r = run_worker(cmd, method, T)
            results.append(r)
            if "failed" in r:
                continue
            print(f"T={T:6d} {method:8s} {r['step_s']:8.3f} CPU s/step ({r['wall_s']:.3f} wall)  "
                  f"{r['tokens_per_s']:8.0f} tok/CPU s  peak +{r['peak_mb']:7.0f} MB", flush=True)
    print(render_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0

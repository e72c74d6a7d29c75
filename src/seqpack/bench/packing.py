"""``seqpack bench packing``: one training step (forward + backward) on the same documents several ways.

- seqpack: one packed row, ``attn_implementation="seqpack"`` (exact varlen, no T x T mask)
- sdpa-packed: the same row through transformers' own packed path: ``attn_implementation="sdpa"``, restarting
  position_ids and ``use_cache=False``; transformers then detects the documents from position_ids and builds a
  dense [T, T] block mask (exact)
- sdpa-posids: the same but with the model's default ``use_cache=True`` (what ``model(input_ids, position_ids)``
  does): transformers (5.24) creates a cache, skips the packed-sequence detection and runs plain causal attention
  over the whole row, so documents attend to each other and the loss is not the per-document loss
- flex-packed / flex-posids: the same two with ``attn_implementation="flex_attention"`` (a BlockMask; CUDA)
- padded: the same documents one per row, padded to the longest in each micro-batch (at most T slots each)

Every method's loss is printed next to the exact per-document loss (each document alone through the same
weights, with transformers' ``sdpa`` for every method),
and a leak probe decides the "separates documents" column: the logits of a document must not change when the
document packed before it changes (max |change| <= 1e-4; exact methods give 0).

Document lengths follow a log-normal distribution (median 400 tokens on CPU, 1024 with ``--device cuda``; sigma
1.1: many short documents, a heavy tail), or with ``--dist stdlib`` the sizes of the running interpreter's
standard-library files (4 bytes per token); the last document is cut at T. Each (method, T) runs in a fresh
process so its peak memory is its own: on CPU the peak RSS growth once the model is built, on CUDA the peak
allocated memory (weights included). ``--device cuda`` uses a TinyLlama-shaped model (hidden 2048, 22 layers,
32 heads, 4 KV heads, vocab 32000) in bf16 with activation checkpointing and reports MFU against the GPU's bf16
peak (model FLOPs: 6 N tokens + causal attention within documents).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..cli_types import positive_int
from .measure import _padded_micro_batches, _peak_rss_mb, _rss_mb, doc_lengths, render_table, run_worker

MODELS = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096),  # tests
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1 << 16),
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=1 << 18),
}
MODEL = MODELS["small"]
METHODS = ("seqpack", "sdpa-packed", "sdpa-posids", "flex-packed", "flex-posids", "padded")
IMPL = {"seqpack": "seqpack", "sdpa-packed": "sdpa", "sdpa-posids": "sdpa", "flex-packed": "flex_attention",
        "flex-posids": "flex_attention", "padded": "sdpa"}


def run_one(method: str, T: int, steps: int, seed: int, dist: str, attention_only: bool = False,
            device: str = "cpu", model_name: str = "small", median: int = 400, checkpointing: bool = False) -> dict:
    """Time ``steps`` training steps (after one warm-up) of ``method`` on a row of T tokens; in this process.
    ``attention_only``: forward + backward of one attention call (the model's q/k/v shapes) instead of the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import seqpack

    dev = torch.device(device)
    torch.manual_seed(seed)
    shape = MODELS[model_name]
    lengths = doc_lengths(T, dist, seed, median)
    docs = [torch.randint(3, shape["vocab_size"], (n,)) for n in lengths]
    cfg = AutoConfig.for_model("llama", **shape)
    impl = IMPL[method]
    cfg._attn_implementation = impl
    if attention_only:
        model = _AttentionOnly(cfg)
    else:
        with dev:  # same seed, same device: every method gets the same weights
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl,
                                                     dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = seqpack.pack(docs).to(dev)

    def loss_of(inputs, labels, num_valid):
        if attention_only:
            return model(**inputs).sum() / num_valid
        return seqpack.causal_lm_loss(model(**inputs).logits, labels, num_valid=num_valid)

    def packed_step():
        loss = loss_of(_packed_inputs(method, batch), batch.shift_labels, batch.num_valid_targets)
        loss.backward()
        return float(loss.detach())

    micro_batches = _padded_micro_batches(lengths, T)

    def padded_step():
        valid, total = batch.num_valid_targets, 0.0
        for group in micro_batches:
            ids, mask, labels = _padded_rows([docs[i] for i in group], dev)
            loss = loss_of(dict(input_ids=ids, attention_mask=mask, use_cache=False), labels, valid)
            loss.backward()
            total += float(loss.detach())
        return total

    step = padded_step if method == "padded" else packed_step
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    base = _rss_mb()
    loss = step()  # warm-up (and compile, for flex_attention)
    model.zero_grad(set_to_none=True) if not attention_only else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
        model.zero_grad(set_to_none=True) if not attention_only else None
    sync()
    seconds = (time.perf_counter() - start) / steps
    slots = sum(len(g) * max(lengths[i] for i in g) for g in micro_batches)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mb() - base
    result = dict(method=method, T=T, docs=len(lengths), step_s=seconds, tokens_per_s=T / seconds, peak_mb=peak_mb,
                  slot_waste=slots / T, device=device)
    if not attention_only:
        result.update(loss=loss, exact_loss=_per_document_loss(model, docs, dev), leak=_leak(model, method, dev, seed))
        if dev.type == "cuda":
            from ..train.metrics import device_peak_flops, step_flops
            from ..train.model import count_params

            peak, result["peak_source"] = device_peak_flops(dev)
            result["mfu"] = step_flops(cfg, count_params(model)[1], [batch]) / seconds / peak
    return result


def _packed_inputs(method: str, batch) -> dict:
    """``model(**...)`` inputs of a packed method: seqpack's varlen metadata, or restarting position_ids alone —
    with ``use_cache=False`` ("-packed", as a training loop passes it) or the model's default ("-posids")."""
    if method == "seqpack":
        return dict(batch.model_inputs(), use_cache=False)
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids)
    return inputs if method.endswith("-posids") else dict(inputs, use_cache=False)


def _padded_rows(docs, dev):
    """Documents one per row, right-padded: (input_ids, attention_mask, shifted labels) each [B, L]."""
    import torch

    L = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), L, dtype=torch.long)
    mask = torch.zeros(len(docs), L, dtype=torch.long)
    labels = torch.full((len(docs), L), -100)
    for r, d in enumerate(docs):
        ids[r, :len(d)], mask[r, :len(d)] = d, 1
        labels[r, :len(d) - 1] = d[1:]
    return ids.to(dev), mask.to(dev), labels.to(dev)


def _per_document_loss(model, docs, dev) -> float:
    """The exact loss: token mean over every document's targets, each document alone through the same weights with
    transformers' plain ``sdpa`` (the same reference for every method; flex_attention would recompile per length)."""
    import torch

    import seqpack

    total, count = 0.0, 0
    own = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            for d in docs:
                if len(d) < 2:
                    continue
                logits = model(input_ids=d[None].to(dev), use_cache=False).logits
                total += float(seqpack.ops.loss.token_loss_sum(logits[:, :-1], d[None, 1:].to(dev)))
                count += len(d) - 1
    finally:
        model.set_attn_implementation(own)
    return total / count


def _leak(model, method: str, dev, seed: int) -> float:
    """Max |change| of document B's logits when the document packed before it (A, 96 tokens) is replaced."""
    import torch

    import seqpack

    g = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    a, a2, b = (torch.randint(3, vocab, (n,), generator=g) for n in (96, 96, 64))
    outs = []
    with torch.no_grad():
        for first in (a, a2):
            if method == "padded":
                ids, mask, _ = _padded_rows([first, b], dev)
                outs.append(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[1, :len(b)])
                continue
            outs.append(model(**_packed_inputs(method, seqpack.pack([first, b]).to(dev))).logits[0, len(first):])
    return float((outs[0].float() - outs[1].float()).abs().max())


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


EXAMPLES = "examples:\n  seqpack bench packing --lengths 4096 8192 --steps 2\n  seqpack bench packing --device cuda"


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (also the source of its reference page)."""
    parser = argparse.ArgumentParser(prog="seqpack bench packing", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (cuda: bf16, larger model)")
    parser.add_argument("--model", choices=[*sorted(MODELS), "mamba", "mamba2"],
                        help="model shape (default: small on cpu, tinyllama on cuda); mamba / mamba2: a tiny SSM, "
                        "packed vs padded (bench/packing_ssm.py)")
    parser.add_argument("--lengths", type=positive_int, nargs="+", help="row lengths T (default: 4096 8192 16384 on cpu, "
                        "16384 65536 131072 on cuda)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: seqpack sdpa-packed sdpa-posids "
                        "padded on cpu, seqpack sdpa-packed sdpa-posids flex-packed flex-posids on cuda")
    parser.add_argument("--median", type=positive_int, help="median document length (default 400 on cpu, 1024 on cuda)")
    parser.add_argument("--checkpointing", choices=("on", "off"), help="activation checkpointing (default: on for "
                        "cuda, off for cpu)")
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document lengths and weights")
    parser.add_argument("--dist", choices=("lognormal", "stdlib"), default="lognormal", help="document lengths")
    parser.add_argument("--attention-only", action="store_true",
                        help="time one attention call (fwd+bwd) with the mask transformers builds, not the model")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)  # worker mode
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    model = args.model or ("tinyllama" if cuda else "small")
    median = args.median or (1024 if cuda else 400)
    checkpointing = (args.checkpointing or ("on" if cuda else "off")) == "on"
    lengths = args.lengths or ([16384, 65536, 131072] if cuda else [4096, 8192, 16384])
    methods = args.methods or ["seqpack", "sdpa-packed", "sdpa-posids"] + \
        (["flex-packed", "flex-posids"] if cuda else ["padded"])
    if model in ("mamba", "mamba2"):
        from .packing_ssm import main as ssm_main

        args.lengths, args.methods = lengths, methods
        return ssm_main(args)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps, args.seed, args.dist,
                                 args.attention_only, args.device, model, median, checkpointing)))
        return 0

    what = "one attention call of" if args.attention_only else "training step of"
    print(f"{what} llama {MODELS[model]} on {args.device}"
          f"{' (bf16)' if cuda else ' (fp32)'}{', activation checkpointing' if checkpointing else ''}; documents: "
          f"{args.dist} (median {median}); threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    results = []
    for T in lengths:
        for method in methods:
            cmd = [sys.executable, "-m", "seqpack.bench.packing", "--one", method, str(T), "--steps", str(args.steps),
                   "--seed", str(args.seed), "--dist", args.dist, "--device", args.device, "--model", model,
                   "--median", str(median), "--checkpointing", "on" if checkpointing else "off"] + \
                ["--attention-only"] * args.attention_only
            r = run_worker(cmd, method, T)
            results.append(r)
            if "failed" in r:
                continue
            loss = f"  loss {r['loss']:.5f} (per-document {r['exact_loss']:.5f}, leak {r['leak']:.1e})" \
                if "loss" in r else ""
            print(f"T={T:6d} {method:12s} {r['step_s']:8.3f} s/step  {r['tokens_per_s']:8.0f} tok/s  "
                  f"peak {r['peak_mb']:7.0f} MB{loss}", flush=True)
    print(render_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if results and all("failed" in r for r in results):
        print("seqpack bench packing: error: every measurement failed (see the reasons above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

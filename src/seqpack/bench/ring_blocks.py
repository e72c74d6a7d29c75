"""``seqpack bench ring``: what ring attention's blockwise computation costs against one varlen kernel call over
the same documents, on one device (no communication).

Shape legend: T tokens of the packed row, C ring degree (virtual ranks), H query heads, Hkv key/value heads,
D head dim.

The row (log-normal documents, as ``seqpack bench sp``) is split as 2D sequence parallelism splits it
(:func:`seqpack.parallel.ring_split.split_positions`). Each of the C virtual ring ranks then runs exactly what
:mod:`seqpack.attention.ring` runs at each ring step — the (query, key) segments the global ``cu_seqlens``
connect, one kernel call each, merged into float32 accumulators by online softmax, and the blockwise float32
backward — with the key/value blocks taken from the other virtual ranks instead of received. The alternative is
one ``varlen_attention`` call (forward + backward) on the whole row. Both are exact; the table prints their step
times, the ratio, and the largest difference of the outputs and input gradients (the check that the simulation is
the real computation).

    seqpack bench ring --T 65536 131072 --ring 4 --device cuda          # bf16 on a GPU: flash-attn or torch varlen
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..cli_types import positive_int


def lognormal_row(T: int, seed: int = 0) -> list[int]:
    """``cu_seqlens`` of a row of T tokens of log-normal documents (median 400, as the other benchmarks)."""
    from .measure import doc_lengths

    lengths = doc_lengths(T, "lognormal", seed)
    return [0] + torch.tensor(lengths).cumsum(0).tolist()


def virtual_ring(q, k, v, dout, cu: list[int], ring: int, spec, backend: str):
    """Ring attention's forward and backward for ``ring`` virtual ranks on one device. q [T, H, D], k/v
    [T, Hkv, D], dout [T, H, D] in row order -> (out, dq, dk, dv) in row order, each rank's work as
    ``seqpack.attention.ring`` does it."""
    from ..attention.ring import _block_forward
    from ..attention.ring_blocks import block_segments, segment_backward, tiles
    from ..parallel.ring_split import split_positions

    cu_t = tuple(cu)
    pos = [split_positions(cu_t, ring, 1, c).to(q.device) for c in range(ring)]
    qs, ks, vs, dos = ([x[p] for p in pos] for x in (q, k, v, dout))
    outs, lses = [], []
    for c in range(ring):  # forward: C steps per rank, the KV block of rank (c - step) mod C at each
        out_acc = torch.zeros(qs[c].shape, dtype=torch.float32, device=q.device)
        lse_acc = torch.full(qs[c].shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for step in range(ring):
            r = (c - step) % ring
            kv = torch.stack([ks[r], vs[r]])
            _block_forward(qs[c], kv, block_segments(cu_t, ring, c, r, spec.sliding_window, spec.causal), spec,
                           backend, out_acc, lse_acc)
        outs.append(out_acc)
        lses.append(lse_acc)
    dq = [torch.zeros(x.shape, dtype=torch.float32, device=q.device) for x in qs]
    dk = [torch.zeros(x.shape, dtype=torch.float32, device=q.device) for x in ks]
    dv = [torch.zeros(x.shape, dtype=torch.float32, device=q.device) for x in vs]
    for c in range(ring):  # backward: recomputed block by block from the merged output and log-sum-exp
        for step in range(ring):
            r = (c - step) % ring
            for seg in block_segments(cu_t, ring, c, r, spec.sliding_window, spec.causal):
                for tile in tiles(seg, spec.sliding_window):
                    segment_backward(qs[c], ks[r], vs[r], dos[c], outs[c], lses[c], tile, spec.scale,
                                     spec.sliding_window, spec.softcap, dq[c], dk[r], dv[r])
    results = []
    for parts, like in ((outs, q), (dq, q), (dk, k), (dv, v)):
        full = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        for p, x in zip(pos, parts):
            full[p] = x.to(like.dtype)
        results.append(full)
    return tuple(results)


def one_call(q, k, v, dout, cu: list[int], spec, backend: str):
    """One varlen attention call over the row, forward + backward -> (out, dq, dk, dv)."""
    from ..attention.kernels import varlen_attention

    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = varlen_attention(q, k, v, cu, max(b - a for a, b in zip(cu, cu[1:])), spec, backend)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _timed(fn, device, repeats: int):
    """(median seconds, last result) of ``repeats`` runs after one warm-up."""
    times, result = [], fn()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(T: int, ring: int, heads: int, kv_heads: int, head_dim: int, device, dtype, backend: str,
            repeats: int, seed: int = 0) -> dict:
    """One row of the table: both methods on the same q, k, v, output gradient and documents."""
    from ..attention import backends
    from ..attention.kernels import AttnSpec
    from ..parallel.ring_split import split_multiple

    if T % split_multiple(ring, 1):
        raise ValueError(f"--T {T}: the ring split needs a multiple of {split_multiple(ring, 1)} tokens")
    cu = lognormal_row(T, seed)
    spec = AttnSpec(scale=head_dim ** -0.5)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, dout = (torch.randn(T, heads, head_dim, generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(T, kv_heads, head_dim, generator=g).to(device, dtype) for _ in range(2))
    chosen = backends.resolve_backend(backend, device, spec, dtype, head_dim)
    t_one, ref = _timed(lambda: one_call(q, k, v, dout, cu, spec, chosen), device, repeats)
    t_ring, got = _timed(lambda: virtual_ring(q, k, v, dout, cu, ring, spec, chosen), device, repeats)
    errors = [float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
              for a, b in zip(got, ref)]
    return dict(T=T, ring=ring, documents=len(cu) - 1, backend=chosen, one_call_s=t_one, ring_s=t_ring,
                ratio=t_ring / t_one, max_rel_diff=max(errors))


EXAMPLES = """examples:
  seqpack bench ring --T 4096 --ring 4                                  # CPU, float32, the exact SDPA path
  seqpack bench ring --T 65536 131072 --ring 4 --device cuda            # GPU, bf16"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqpack bench ring", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=positive_int, nargs="+", default=[4096], help="row lengths (default 4096)")
    parser.add_argument("--ring", type=positive_int, default=4, help="virtual ring ranks C (default 4)")
    parser.add_argument("--heads", type=positive_int, default=32, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=positive_int, default=8, help="key/value heads (default 8)")
    parser.add_argument("--head-dim", type=positive_int, default=128, help="head dim (default 128)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--backend", default="auto", help="attention backend of both methods (default auto)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per method (default 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU that torch can use")
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device == "cuda" else
                                                                           "fp32")]
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        rows = [measure(T, args.ring, args.heads, args.kv_heads, args.head_dim, device, dtype, args.backend,
                        args.repeats) for T in args.T]
    except ValueError as err:
        parser.error(str(err))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, one thread"
    print(f"{where}, {dtype}, {args.heads}/{args.kv_heads} heads x {args.head_dim}, causal, log-normal documents; "
          f"median of {args.repeats}; both exact")
    print("| T | documents | backend | one varlen call ms | ring, C virtual blocks ms | ratio | max rel. difference |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']:,} | {r['documents']} | {r['backend']} | {r['one_call_s'] * 1e3:.1f} | "
              f"{r['ring_s'] * 1e3:.1f} (C={r['ring']}) | {r['ratio']:.2f}x | {r['max_rel_diff']:.1e} |")
    return 0

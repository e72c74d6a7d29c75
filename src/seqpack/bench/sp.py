"""``seqpack bench sp``: memory, time and communication per rank of one training step for sp = 1, 2, 4 on CPU
(gloo), and Ulysses vs ring vs 2D at equal sp (``--split 4:1 4:2 4:4``: sp:ring).

Every sp runs in its own fresh process group (spawned here, no torchrun), on the same packed row of total length T
(log-normal document lengths, as ``seqpack bench packing``), with a Llama-shaped model dispatched to seqpack
attention over the SP group. Per rank it reports

- saved activations: bytes of the tensors autograd keeps for backward (parameters excluded) — the activation
  memory sequence parallelism divides by S;
- peak RSS growth: the process's resident peak (Linux VmHWM, reset once the model and data are built) during
  the steps, over its size at that point — everything a step allocates, transient buffers included;
- step time: median forward + backward wall time (all ranks share this machine's cores);
- bytes sent per rank per layer: counted on the collectives of one step (all-to-all, ring send) over the layers;
- attention imbalance: the ring split's per-rank attention work (causal query-key pairs), max / mean - 1
  (Ulysses ranks all compute the whole row for their heads: 0).

The memory-cap search then finds, for each sp, the longest T whose peak RSS growth per rank stays under
``--cap-mib``: it predicts T from the per-token cost measured at the fixed T, runs that T, and steps down (then
up) by 1/8 while the runs say so (every reported T was run, not extrapolated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from ..cli_types import non_negative_float, positive_int

MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=1 << 17)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _count_sent(dist, sent: list) -> None:
    """Wrap the collectives seqpack's SP uses so that every byte this rank sends is added to ``sent[0]``."""
    a2a, isend = dist.all_to_all_single, dist.isend

    def all_to_all_single(output, input, *args, **kwargs):
        world = dist.get_world_size(kwargs.get("group"))
        sent[0] += input.nbytes * (world - 1) // world  # its own chunk stays
        return a2a(output, input, *args, **kwargs)

    def send(tensor, *args, **kwargs):
        sent[0] += tensor.nbytes
        return isend(tensor, *args, **kwargs)

    dist.all_to_all_single, dist.isend = all_to_all_single, send


def _rank_main(rank: int, world: int, init_file: str, T: int, steps: int, seed: int, ring: int,
               out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    import seqpack
    from seqpack.bench.measure import doc_lengths
    from seqpack.parallel import ParallelDims, StepLoss, shard_batch
    from seqpack.parallel.ring_split import attention_work, imbalance

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        topo = ParallelDims(sp=world, ring=ring)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **MODEL)).float()
        seqpack.dispatch(model, **topo.attention_groups())
        g = torch.Generator().manual_seed(seed)
        docs = [torch.randint(3, MODEL["vocab_size"], (n,), generator=g) for n in doc_lengths(T, seed=seed)]
        shard = shard_batch(seqpack.pack(docs), topo.sp_size, topo.sp_rank, ring_size=ring)
        sent = [0]
        if world > 1:
            _count_sent(dist, sent)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def one_step(count_saved: bool) -> tuple[float, int]:
            saved: dict[int, int] = {}

            def pack_hook(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    saved[ptr] = t.untyped_storage().nbytes()
                return t

            step = StepLoss([shard], topo.world_group)
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            if count_saved:
                with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
                    loss = step(model(**shard.model_inputs()).logits, shard)
            else:
                loss = step(model(**shard.model_inputs()).logits, shard)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - start, sum(saved.values())

        base = _status_kib("VmRSS")  # model, optimizer-free state and data in place
        reset = _reset_peak()
        _, saved_bytes = one_step(count_saved=True)  # warm-up, and the saved-activation count
        layer_bytes = sent[0] / MODEL["num_hidden_layers"]
        times = []
        for _ in range(steps):
            times.append(one_step(count_saved=False)[0])
        peak = _status_kib("VmHWM")
        work = attention_work(shard.cu_seqlens.tolist(), ring) if ring > 1 else [1]
        result = dict(rank=rank, sp=world, ring=ring, T=T, local_T=shard.num_tokens, saved_mib=saved_bytes / 2**20,
                      sent_mib_per_layer=layer_bytes / 2**20, attn_imbalance=imbalance(work),
                      peak_growth_mib=(peak - base) / 1024 if reset else float("nan"), peak_rss_mib=peak / 1024,
                      step_s=statistics.median(times))
        write_rank_result(out_dir, rank, result)
    finally:
        if world > 1:
            dist.destroy_process_group()


def spawn_ranks(worker, world: int, *args) -> list[dict]:
    """Run ``worker(rank, world, init_file, *args, out_dir)`` in ``world`` fresh processes (the process group
    rendezvous through ``init_file`` in a temporary folder); each writes its result with
    :func:`write_rank_result`. Returns the results in rank order."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="seqpack-bench-") as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "pg"), *args, tmp), nprocs=world, join=True)
        ranks = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    return ranks


def write_rank_result(out_dir: str, rank: int, result: dict) -> None:
    """A worker's result as ``out_dir/rank{rank}.json``, written whole or not at all."""
    tmp = os.path.join(out_dir, f"rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.json"))


def measure(sp: int, T: int, steps: int = 1, seed: int = 0, ring: int = 1) -> dict:
    """Run one configuration in ``sp`` fresh processes; per-rank maxima of memory, time and bytes sent."""
    ranks = spawn_ranks(_rank_main, sp, T, steps, seed, ring)
    return dict(sp=sp, ring=ring, T=T, local_T=ranks[0]["local_T"], saved_mib=max(r["saved_mib"] for r in ranks),
                sent_mib_per_layer=max(r["sent_mib_per_layer"] for r in ranks),
                attn_imbalance=ranks[0]["attn_imbalance"],
                peak_growth_mib=max(r["peak_growth_mib"] for r in ranks),
                peak_rss_mib=max(r["peak_rss_mib"] for r in ranks), step_s=max(r["step_s"] for r in ranks))


def longest_fitting(sp: int, per_token_mib: float, cap_mib: float, seed: int, multiple: int = 256) -> dict | None:
    """Largest T (multiple of ``multiple``, found in steps of 1/8) whose peak RSS growth per rank fits
    ``cap_mib``: starts from the linear prediction, steps down until a run fits, then up while runs fit."""
    def fits(T):
        r = measure(sp, T, steps=1, seed=seed)
        return r if r["peak_growth_mib"] <= cap_mib else None

    T = int(cap_mib / per_token_mib) // multiple * multiple
    best = None
    while T >= multiple and best is None:
        best = fits(T)
        T = T if best else int(T * 7 / 8) // multiple * multiple
    while best is not None and best["T"] == T:
        T = max(-(-T * 9 // 8) // multiple * multiple, T + multiple)
        best = fits(T) or best
    return best


EXAMPLES = "examples:\n  seqpack bench sp --T 8192 --sp 1 2 4"


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (also the source of its reference page)."""
    parser = argparse.ArgumentParser(prog="seqpack bench sp", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=positive_int, default=8192, help="total tokens of the packed row")
    parser.add_argument("--sp", type=positive_int, nargs="+", default=[1, 2, 4], help="sequence parallel degrees")
    parser.add_argument("--split", nargs="*", default=[], metavar="SP:RING",
                        help="also compare these splits at equal sp, e.g. 4:1 4:2 4:4 (Ulysses, 2D, ring only)")
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--cap-mib", type=non_negative_float, default=512.0,
                        help="per-process memory cap (peak RSS growth of a step) for the longest-T search; 0 = skip")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document lengths and weights")
    parser.add_argument("--json", help="also write the results to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(s < 1 for s in args.sp):
        parser.error(f"--sp degrees must be >= 1, got {args.sp}")
    splits = []
    for text in args.split:
        try:
            sp, ring = (int(x) for x in text.split(":"))
        except ValueError:
            parser.error(f"--split {text!r}: write SP:RING, e.g. 4:2")
        if ring < 1 or sp % ring:
            parser.error(f"--split {text}: the ring degree must divide sp")
        splits.append((sp, ring))

    print(f"llama {MODEL}; CPU gloo, OMP_NUM_THREADS=1 per rank, {os.cpu_count()} cores; T={args.T}")
    rows = [measure(sp, args.T, args.steps, args.seed) for sp in args.sp]
    base = rows[0]
    print(f"\n{'sp':>3} {'T/S':>6} {'saved act MiB':>14} {'x sp=' + str(base['sp']):>8} {'peak growth MiB':>16} "
          f"{'x sp=' + str(base['sp']):>8} {'peak RSS MiB':>13} {'step s':>7} {'x':>6}")
    for r in rows:
        print(f"{r['sp']:>3} {r['local_T']:>6} {r['saved_mib']:>14.1f} {r['saved_mib'] / base['saved_mib']:>8.2f} "
              f"{r['peak_growth_mib']:>16.1f} {r['peak_growth_mib'] / base['peak_growth_mib']:>8.2f} "
              f"{r['peak_rss_mib']:>13.1f} {r['step_s']:>7.2f} {r['step_s'] / base['step_s']:>6.2f}")
    fits = []
    if args.cap_mib > 0:
        print(f"\nlongest T with peak RSS growth per rank <= {args.cap_mib:g} MiB:")
        for r in rows:
            fit = longest_fitting(r["sp"], r["peak_growth_mib"] / r["T"], args.cap_mib, args.seed)
            fits.append(fit)
            if fit is None:
                print(f"  sp={r['sp']}: nothing fits")
            else:
                print(f"  sp={r['sp']}: T={fit['T']:>7} (peak growth {fit['peak_growth_mib']:.0f} MiB, "
                      f"step {fit['step_s']:.1f} s)  x{fit['T'] / (fits[0] or fit)['T']:.2f}")
    compared = [measure(sp, args.T, args.steps, args.seed, ring) for sp, ring in splits]
    if compared:
        print(f"\nUlysses vs ring vs 2D at T={args.T} (log-normal documents):")
        print(f"{'sp':>3} {'ulysses x ring':>15} {'sent MiB/layer':>15} {'saved act MiB':>14} {'peak growth MiB':>16} "
              f"{'step s':>7} {'attn imbalance':>15}")
        for r in compared:
            print(f"{r['sp']:>3} {str(r['sp'] // r['ring']) + ' x ' + str(r['ring']):>15} "
                  f"{r['sent_mib_per_layer']:>15.2f} {r['saved_mib']:>14.1f} {r['peak_growth_mib']:>16.1f} "
                  f"{r['step_s']:>7.2f} {100 * r['attn_imbalance']:>14.1f}%")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(model=MODEL, fixed_T=rows, cap_mib=args.cap_mib, longest=fits, splits=compared), f,
                      indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

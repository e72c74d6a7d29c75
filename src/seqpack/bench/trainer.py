"""``seqpack bench trainer``: transformers' ``Trainer`` with seqpack packing vs padded batches, and sp = 1/2/4.

Part 1, one process: the same examples (log-normal lengths, as ``seqpack bench packing``) through the same
``transformers.Trainer`` with

- ``seqpack``: ``attn_implementation="seqpack"`` + :class:`seqpack.hf.DataCollatorForPacking` (one packed row);
- ``padded``: ``attn_implementation="sdpa"`` + TRL's default collator (rows padded to the batch's longest).

Part 2, sp = 1, 2, 4 processes (gloo, one thread each): :class:`seqpack.hf.SequenceParallelTrainer` with
``sp_size=S`` on batches whose packed row has ``--long-T`` tokens.

Each configuration runs one warm-up and ``--steps`` timed optimizer steps (plain SGD) in fresh processes; per rank
it reports real (non-padding) tokens per second over the timed steps, the median step time and the peak RSS growth
during all steps (Linux VmHWM, reset before the first step, over the RSS at that point). Llama-shaped model of
``seqpack bench sp``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

from ..cli_types import positive_int
from .sp import MODEL, _reset_peak, _status_kib


def _examples(total_tokens: int, seed: int, max_len: int) -> list[dict]:
    import torch

    from .measure import doc_lengths

    g = torch.Generator().manual_seed(seed)
    lengths = [min(n, max_len) for n in doc_lengths(total_tokens, seed=seed) if n >= 2]
    return [{"input_ids": torch.randint(3, MODEL["vocab_size"], (n,), generator=g).tolist()} for n in lengths]


def _rank_main(rank: int, world: int, port: int, method: str, examples: list, batch: int, steps: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from ..hf import DataCollatorForPacking, SequenceParallelTrainer

    torch.set_num_threads(1)
    step_times, marks = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:  # model and data in place: memory is measured from here
                marks["base"] = _status_kib("VmRSS")
                marks["reset"] = _reset_peak()
            marks["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > 1:
                step_times.append(time.perf_counter() - marks["t"])

    tmp = tempfile.mkdtemp(prefix="seqpack-bench-trainer-")
    args = TrainingArguments(output_dir=tmp, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                             logging_strategy="no", optim="sgd", learning_rate=1e-3, max_grad_norm=0.0,
                             per_device_train_batch_size=batch, max_steps=steps + 1, remove_unused_columns=False,
                             train_sampling_strategy="sequential", dataloader_pin_memory=False)
    torch.manual_seed(0)
    attn = "sdpa" if method == "padded" else "seqpack"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **MODEL), attn_implementation=attn)
    common = dict(model=model, args=args, train_dataset=examples, callbacks=[Clock()])
    if method == "padded":
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        trainer = Trainer(data_collator=DataCollatorForLanguageModeling(pad_token_id=0), **common)
    elif method == "seqpack":
        trainer = Trainer(data_collator=DataCollatorForPacking(), **common)
    else:  # "sp": SequenceParallelTrainer over all ranks
        trainer = SequenceParallelTrainer(data_collator=DataCollatorForPacking(), sp_size=world, **common)
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
        peak = _status_kib("VmHWM")
        tokens = sum(len(e["input_ids"]) for e in examples[batch:batch * (steps + 1)])  # real tokens, timed steps
        result = dict(rank=rank, step_s=statistics.median(step_times), tokens_per_s=tokens / sum(step_times),
                      peak_growth_mib=(peak - marks["base"]) / 1024 if marks.get("reset") else float("nan"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(method: str, world: int, examples: list, batch: int, steps: int) -> dict:
    """One configuration in ``world`` fresh processes: slowest rank's step time, largest per-rank memory."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="seqpack-bench-trainer-") as tmp:
        mp.spawn(_rank_main, args=(world, port, method, examples, batch, steps, tmp), nprocs=world, join=True)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
    step_s = max(r["step_s"] for r in ranks)
    return dict(method=method, world=world, step_s=step_s, tokens_per_s=min(r["tokens_per_s"] for r in ranks),
                peak_growth_mib=max(r["peak_growth_mib"] for r in ranks))


EXAMPLES = "examples:\n  seqpack bench trainer --sp 1 2"


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (also the source of its reference page)."""
    parser = argparse.ArgumentParser(prog="seqpack bench trainer", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, default=8192, help="real tokens per step at most (with --batch examples per step)")
    parser.add_argument("--max-len", type=positive_int, default=2048, help="longest example (tokens)")
    parser.add_argument("--batch", type=positive_int, default=8, help="examples per step (per_device_train_batch_size)")
    parser.add_argument("--steps", type=positive_int, default=2, help="timed optimizer steps after one warm-up step")
    parser.add_argument("--long-T", type=positive_int, default=8192, help="tokens of the packed row for the sp comparison")
    parser.add_argument("--sp", type=positive_int, nargs="*", default=[1, 2, 4], help="SP degrees (empty: skip part 2)")
    parser.add_argument("--json", help="also write the results to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    print(f"llama {MODEL}; CPU, one thread per process, {os.cpu_count()} cores")
    # enough examples for warm-up + steps, each step ~ --tokens real tokens
    examples = _examples(args.tokens * (args.steps + 2) * 2, seed=0, max_len=args.max_len)
    per_batch = len(examples) // (args.steps + 2) // 2
    batch = min(args.batch, per_batch) if args.batch else per_batch
    rows = [measure(m, 1, examples, batch, args.steps) for m in ("seqpack", "padded")]
    timed = examples[batch:batch * (args.steps + 1)]
    print(f"\nTrainer, {batch} examples per step, {sum(len(e['input_ids']) for e in timed) / args.steps:.0f} real "
          "tokens per step on average")
    print(f"{'method':>8} {'step s':>8} {'tokens/s':>9} {'peak growth MiB':>16} {'speed-up':>9} {'memory':>7}")
    for r in rows:
        speed, memory = rows[0]["tokens_per_s"] / r["tokens_per_s"], r["peak_growth_mib"] / rows[0]["peak_growth_mib"]
        print(f"{r['method']:>8} {r['step_s']:>8.2f} {r['tokens_per_s']:>9.0f} {r['peak_growth_mib']:>16.1f} "
              f"{speed:>8.2f}x {memory:>6.2f}x")

    sp_rows = []
    if args.sp:
        long_examples = _examples(args.long_T * (args.steps + 1), seed=1, max_len=args.long_T)
        # one packed row of ~long_T tokens per step: group examples greedily into steps of equal count
        per_step = max(1, len(long_examples) // (args.steps + 1))
        sp_rows = [measure("sp", sp, long_examples, per_step, args.steps) for sp in args.sp]
        timed = long_examples[per_step:per_step * (args.steps + 1)]
        mean_T = sum(len(e["input_ids"]) for e in timed) / args.steps
        print(f"\nSequenceParallelTrainer, {per_step} examples per step: packed rows of {mean_T:.0f} tokens on average")
        print(f"{'sp':>3} {'step s':>8} {'tokens/s':>9} {'peak growth MiB / rank':>23} {'x sp=' + str(args.sp[0]):>8}")
        for r in sp_rows:
            print(f"{r['world']:>3} {r['step_s']:>8.2f} {r['tokens_per_s']:>9.0f} {r['peak_growth_mib']:>23.1f} "
                  f"{r['peak_growth_mib'] / sp_rows[0]['peak_growth_mib']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=MODEL, trainer=rows, sp=sp_rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``seqpack bench offload``: step time of bf16 mixed precision against float32, and of each offload (checkpoint
inputs, optimizer) against the same step without it, side by side in one process; bytes each moves off the device.

Every setting runs ``seqpack train``'s step (``build_model`` + ``build_optimizer``, chunked loss, full activation
checkpointing, AdamW) on one packed row, one process (FSDP2 on a one-rank group where a setting needs it). The
settings take turns, ``--repeats`` rounds of ``--steps`` steps each, and the median step time of each is reported as
a ratio to its natural alternative, so machine load cancels out. On a CPU the host *is* the device: the offloads
here cost their copies and hooks but save nothing; the bytes they would take off a GPU are counted from the
tensors they move (checkpoint inputs: recorded by the hooks; optimizer: parameter shards, gradients, moments).
On CUDA (``--device cuda``) the table also gives each setting's peak allocated memory
(``torch.cuda.max_memory_allocated`` over its timed steps).
"""

from __future__ import annotations

import argparse
import statistics

from ..cli_types import positive_int
from .train_step import TrainStep, packed_row

SETTINGS = {  # name -> (config keys, the setting it is compared with)
    "fp32": ({}, None),
    "bf16": ({"model.mixed_precision": "fsdp"}, "fp32"),
    "bf16 + checkpoint offload": ({"model.mixed_precision": "fsdp", "model.offload_checkpoints": True}, "bf16"),
    "bf16 + optimizer offload": ({"model.mixed_precision": "fsdp", "hybrid_zero_optimizer.cpu_offload": True},
                                 "bf16"),
    "bf16 + both offloads": ({"model.mixed_precision": "fsdp", "model.offload_checkpoints": True,
                              "hybrid_zero_optimizer.cpu_offload": True}, "bf16"),
}


class _Run(TrainStep):
    """One setting's model, optimizer and timed steps, and the bytes its offloads move."""

    def __init__(self, keys: dict, args, topo):
        from ..train import load_config

        flags = ["--model.hidden_size", str(args.hidden), "--model.num_layers", str(args.layers),
                 "--model.num_attention_heads", str(args.heads),
                 "--model.num_kv_attention_heads", str(args.kv_heads or args.heads), "--model.checkpoint", "True",
                 "--train.device", topo.device.type]
        if args.inter:  # intermediate = ceil(ratio x hidden): exactly --inter
            flags += ["--model.mlp_ratio", str((args.inter - 0.5) / args.hidden), "--model.multiple_of", "1"]
        for key, value in keys.items():
            flags += [f"--{key}", str(value)]
        super().__init__(load_config(None, flags), args.vocab, topo)
        offload = self.checkpoint_offload
        self.record = [] if offload is not None else None
        self.peak = 0  # CUDA: the largest torch.cuda.max_memory_allocated of a timed step
        if offload is not None:
            offload.record = self.record

    def moved_bytes(self) -> int:
        """Bytes per step this setting takes off a GPU."""
        moved = 0
        if self.record is not None and self.times:
            moved += sum(r[3] for r in self.record) // (len(self.times))
        if self.cfg.hybrid_zero_optimizer.cpu_offload:
            n = sum(p.numel() for p in self.model.parameters())
            moved += n * (4 + 4 + 8)  # fp32 shards, fp32 gradients, two fp32 AdamW moments
        return moved


    def timed_step(self, row) -> None:
        """One timed step; on CUDA its peak allocated bytes join ``peak``."""
        import torch

        cuda = self.topo.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.topo.device)
        self.step(row)
        if cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.topo.device))


EXAMPLES = """examples:
  seqpack bench offload --seq-len 4096 --steps 3 --repeats 3
  seqpack bench offload --device cuda --seq-len 65536 --hidden 2048 --layers 22 --heads 32 --kv-heads 4 \\
      --inter 5632 --vocab 32000 --steps 2 --repeats 2          # the TinyLlama shape on a GPU"""


def build_parser() -> argparse.ArgumentParser:
    """The options of this benchmark (also the source of its reference page)."""
    parser = argparse.ArgumentParser(prog="seqpack bench offload", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=positive_int, default=4096, help="tokens of the packed row (default 4096)")
    parser.add_argument("--hidden", type=positive_int, default=256, help="hidden size of the Llama-shaped model")
    parser.add_argument("--layers", type=positive_int, default=4, help="decoder layers")
    parser.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    parser.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--inter", type=positive_int, default=None,
                        help="MLP intermediate size (default: seqpack train's, 8/3 x hidden rounded up)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the steps run (default cpu)")
    parser.add_argument("--vocab", type=positive_int, default=8192, help="vocabulary size")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per round (default 3)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="rounds over all settings (default 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from ..parallel import init_topology

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU that torch can use")
    if not cuda:
        torch.set_num_threads(1)
    row = packed_row(args.seq_len, args.vocab)
    topo = init_topology(device=args.device)
    runs = {}
    try:
        for name, (keys, _) in SETTINGS.items():
            runs[name] = _Run(keys, args, topo)
            runs[name].timed_step(row)  # warm-up: allocations, AdamW state
            runs[name].times.clear()
            if runs[name].record is not None:
                runs[name].record.clear()
        for _ in range(args.repeats):
            for run in runs.values():
                for _ in range(args.steps):
                    run.timed_step(row)
    finally:
        topo.destroy()
    lengths = row.cu_seqlens.diff().tolist()
    where = torch.cuda.get_device_name(topo.device) if cuda else "CPU, OMP_NUM_THREADS=1"
    print(f"{where}, one process, T={args.seq_len} ({len(lengths)} documents), hidden {args.hidden}, "
          f"{args.layers} layers, {args.heads}/{args.kv_heads or args.heads} heads, vocab {args.vocab}, full "
          f"checkpointing, chunked loss, AdamW; median of {args.steps * args.repeats} steps each, settings interleaved")
    print("| setting | step ms | vs | time ratio | MiB off the GPU per step |" + (" peak GiB |" if cuda else "")
          + "\n|---|---:|---|---:|---:|" + ("---:|" if cuda else ""))
    medians = {name: statistics.median(run.times) for name, run in runs.items()}
    for name, (_, against) in SETTINGS.items():
        ratio = f"{medians[name] / medians[against]:.2f}x" if against else ""
        print(f"| {name} | {medians[name] * 1e3:.0f} | {against or ''} | {ratio} | "
              f"{runs[name].moved_bytes() / 2**20:.1f} |" + (f" {runs[name].peak / 2**30:.2f} |" if cuda else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

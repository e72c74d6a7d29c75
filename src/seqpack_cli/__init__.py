"""The ``seqpack`` command: one subcommand per module of ``seqpack``, imported only when that command runs.

This package sits beside ``seqpack`` so that ``seqpack`` alone and ``seqpack --help`` answer at once: importing
``seqpack`` itself loads torch and transformers (it registers ``attn_implementation="seqpack"``), which takes
seconds. Each command module defines ``add_arguments(parser)`` and ``run(args) -> int | None``, and may define
``parse_args(parser, argv)`` when it takes arguments argparse cannot describe (``--section.key VALUE``).

    >>> build_parser("tokenize").prog
    'seqpack tokenize'
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

DOCS = "docs/index.md (or the built site) for guides and the full reference"


class Command(NamedTuple):
    module: str
    summary: str
    examples: tuple[str, ...]


COMMANDS = {
    "train": Command("seqpack.tasks", "train a model from an InternEvo-style config (default: the embedded "
                     "demo job, about three minutes on a CPU)",
                     ("seqpack train --run_dir runs/demo",
                      "seqpack train configs/demo.py --nproc 2 --parallel.tensor.size 2")),
    "generate": Command("seqpack.train.generate", "sample text from a run folder or a Hugging Face model folder",
                        ('seqpack generate runs/demo --prompt "def "',)),
    "demo": Command("seqpack.demo", "a 60-line packed training loop on a tiny model and the embedded corpus",
                    ("seqpack demo --steps 30",)),
    "tokenize": Command("seqpack.data.tokenize_cli", "tokenize JSONL / parquet / datasets folders into an ftdp "
                        "training folder",
                        ("seqpack tokenize chats.jsonl -o data/tokenized --type sft",)),
    "data": Command("seqpack.data.check", "data check FOLDER: validate an ftdp folder and print its statistics",
                    ("seqpack data check data/tokenized --vocab-size 92544",)),
    "bench": Command("seqpack.bench", "benchmarks against the natural alternative: packing, sp, data, train, "
                     "trainer, flux, plan",
                     ("seqpack bench packing --lengths 4096", "seqpack bench packing --help")),
    "convert": Command("seqpack.convert.cli", "convert checkpoints between InternEvo and Hugging Face formats",
                       ("seqpack convert hf-to-internevo --src hf_ckpt --tgt evo_ckpt --tp_size 2",
                        "seqpack convert internevo-to-hf --help")),
    "plan": Command("seqpack.plan.cli", "per-GPU memory, FLOPs and the longest context that fits, before renting "
                    "GPUs",
                    ("seqpack plan configs/shapes/llama-3-8b.json --gpus 8 --gpu-mem 80GiB --max",)),
}


def examples_epilog(examples) -> str:
    """The ``examples:`` block every ``--help`` ends with."""
    return "examples:\n" + "\n".join(f"  {e}" for e in examples)


def build_parser(name: str) -> argparse.ArgumentParser:
    """The argparse parser of ``seqpack NAME`` (imports that command's module)."""
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    parser = argparse.ArgumentParser(prog=f"seqpack {name}", description=command.summary,
                                     epilog=examples_epilog(command.examples),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser


def usage() -> str:
    lines = ["usage: seqpack COMMAND [options]", "", "commands:"]
    lines += [f"  {name:10s} {c.summary}" for name, c in COMMANDS.items()]
    lines += ["", examples_epilog(["seqpack train --run_dir runs/demo", 'seqpack generate runs/demo --prompt "def "',
                                   "seqpack plan --help"]),
              "", f"Run `seqpack COMMAND --help` for a command's options; see {DOCS}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``seqpack ARGV``; returns the exit code (0 done, 2 usage or bad input, others per command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv:
            print(f"seqpack: unknown command {argv[0]!r}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    parser = build_parser(name)
    module = sys.modules[COMMANDS[name].module]
    parse = getattr(module, "parse_args", None)
    args = parse(parser, rest) if parse else parser.parse_args(rest)
    return int(module.run(args) or 0)

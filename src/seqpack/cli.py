"""``seqpack`` command line: one subcommand per module, imported only when used.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int | None``, and may define
``parse_args(parser, argv)`` when it takes arguments argparse cannot describe (``--section.key VALUE``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("seqpack.tasks", "train a model from an InternEvo-style config (default: embedded demo run)"),
    "generate": ("seqpack.train.generate", "sample text from a run folder or a Hugging Face model folder"),
    "demo": ("seqpack.demo", "packed training demo on a tiny model and the embedded corpus"),
    "tokenize": ("seqpack.data.tokenize_cli", "tokenize JSONL / parquet / datasets folders into ftdp format"),
    "data": ("seqpack.data.check", "data check FOLDER: validate an ftdp folder and print its statistics"),
    "bench": ("seqpack.bench", "benchmarks: packing (vs sdpa packed and padded), sp (memory and time per sp), data, train"),
    "convert": ("seqpack.convert.cli", "convert checkpoints between InternEvo and Hugging Face formats"),
    "plan": ("seqpack.plan.cli", "per-GPU memory, FLOPs and the longest context that fits, before renting GPUs"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        return _usage(0)
    if not argv or argv[0].startswith("-"):
        argv = ["train", *argv]  # `seqpack` alone runs the embedded default training job
    if argv[0] not in COMMANDS:
        print(f"seqpack: unknown command {argv[0]!r}", file=sys.stderr)
        return _usage(2)
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"seqpack {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    parse = getattr(module, "parse_args", None)
    args = parse(parser, rest) if parse else parser.parse_args(rest)
    return int(module.run(args) or 0)


def _usage(code: int) -> int:
    print("usage: seqpack COMMAND [options]\n\ncommands:", file=sys.stderr)
    for name, (_, help_text) in COMMANDS.items():
        print(f"  {name:10s} {help_text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

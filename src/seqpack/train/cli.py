"""``seqpack train [CONFIG] [--nproc N] [--run_dir DIR] [--section.key VALUE ...]``.

Without CONFIG it trains the embedded default: a small Llama-architecture model from scratch on the embedded
stdlib-source corpus, on CPU, in about three minutes, into ``runs/<timestamp>``. With ``--nproc N > 1`` it starts
torchrun's launcher itself (``torch.distributed.run``, standalone rendezvous on this machine) with N workers that
run this same command; launched by ``torchrun`` directly (multi-node, elastic restarts) it trains as that rank.

    seqpack train                                           # embedded default run
    seqpack train configs/demo.py --nproc 2 --parallel.tensor.size 2
    torchrun --nnodes 2 --nproc_per_node 8 -m seqpack.cli train configs/7B_hf.py --ckpt.auto_resume True

Exit codes: 0 done; 1 a file could not be written (disk full, permissions; the last complete checkpoint is kept);
2 bad config, data or run folder (nothing was changed); 3 training diverged (NaN/Inf; the last checkpoint with finite
loss and gradients is kept); 4 stopped by SIGTERM/SIGINT after finishing a step and saving a checkpoint (run the same
command to resume); 128 + N: a second signal N ended the run at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone

from ..cli_types import positive_int
from .config import Config
from .config_load import describe, load_config
from .guard import EXIT_STOPPED

_OWN = {"--nproc", "--run_dir", "-h", "--help"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="Python config file in InternEvo's shape (default: the embedded "
                        "demo job, see configs/demo.py)")
    parser.add_argument("--nproc", type=positive_int, default=1, help="processes on this machine (starts torchrun's launcher)")
    parser.add_argument("--run_dir", help="run folder (= --train.run_dir); default runs/<UTC timestamp>")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    keys = "config keys (override any with --section.key VALUE):\n" + "\n".join(describe(Config))
    parser.epilog = keys + (f"\n\n{parser.epilog}" if parser.epilog else "")


def parse_args(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """`--section.key VALUE` pairs are not argparse options: split them off before argparse sees the rest."""
    own, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and name not in _OWN:
            if "=" not in arg and (i + 1 >= len(args) or args[i + 1].startswith("--")):
                parser.error(f"{arg} has no value; write {arg} VALUE (or {arg}=VALUE)")
            step = 1 if "=" in arg else 2
            overrides += args[i:i + step]
            i += step
        else:
            own.append(arg)
            i += 1
    ns = parser.parse_args(own)
    ns.overrides = overrides
    return ns


def run(args: argparse.Namespace, select_task=None) -> int:
    """``seqpack train``; ``select_task(cfg)`` gives the run's task (default: the causal LM,
    :class:`seqpack.train.task.CausalLM`; the command uses :func:`seqpack.tasks.select_task`)."""
    overrides = list(getattr(args, "overrides", []))
    if args.run_dir:
        overrides += ["--train.run_dir", args.run_dir]
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as e:
        print(f"seqpack train: error: {e}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch(args.nproc, args.config, overrides, cfg)
    if args.nproc < 1:
        print(f"seqpack train: error: --nproc {args.nproc} must be >= 1", file=sys.stderr)
        return 2
    from .guard import TrainingStopped
    from .loop import TrainingDiverged, train

    try:
        train(cfg, select_task(cfg) if select_task is not None else None)
    except TrainingStopped as e:
        print(f"seqpack train: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except TrainingDiverged as e:
        print(f"seqpack train: error: {e}", file=sys.stderr)
        return 3
    except ValueError as e:  # bad data / model folder / degrees: a message, not a traceback
        print(f"seqpack train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a permission change mid-run; checkpoints and exports are atomic
        print(f"seqpack train: error: {e.strerror or e} writing {e.filename or 'a file'}; the last complete "
              "checkpoint is kept and nothing half-written is left: free space or fix permissions, then run the "
              "same command to resume", file=sys.stderr)
        return 1
    return 0


def launch(nproc: int, config: str | None, overrides: list[str], cfg: Config) -> int:
    """Start ``nproc`` workers on this machine through torchrun's launcher; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    if cfg.train.run_dir is None:  # every worker must write into the same folder
        overrides = overrides + ["--train.run_dir", f"runs/{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    argv = ["--standalone", "--nproc_per_node", str(nproc), "--module", "seqpack.cli", "train",
            *([config] if config else []), *overrides]
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        torchrun_main(argv)
    except SignalException as e:  # the launcher forwarded the signal to the workers, which saved and stopped
        print(f"seqpack train: stopped by {e.sigval.name}; the workers' messages are above", file=sys.stderr)
        return EXIT_STOPPED
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        print(f"seqpack train: a worker failed (exit codes {sorted(codes)}); see the messages above", file=sys.stderr)
        return max(codes) if all(c > 0 for c in codes) else 1
    return 0

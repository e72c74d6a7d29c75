"""``python -m seqpack.cli``: the ``seqpack`` command (``seqpack_cli``), e.g. for ``torchrun -m seqpack.cli``."""

from __future__ import annotations

import sys

from seqpack_cli import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())

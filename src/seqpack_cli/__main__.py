"""``python -m seqpack_cli``: the ``seqpack`` command."""

import sys

from . import main

sys.exit(main())

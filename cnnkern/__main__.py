"""``python -m cnnkern``: the ``cnnkern`` command (cnnkern/cli.py)."""

from cnnkern.cli import main

raise SystemExit(main())

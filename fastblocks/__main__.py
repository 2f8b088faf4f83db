"""``python -m fastblocks ...`` is the ``fastblocks`` command."""

from fastblocks.cli import main

raise SystemExit(main())

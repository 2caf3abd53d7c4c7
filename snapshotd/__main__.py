"""``python -m snapshotd``: the command line."""

from snapshotd.cli import main

raise SystemExit(main())

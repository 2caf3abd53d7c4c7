"""Entry point: ``python -m benchmarks [--quick] [--json PATH] [--dir PATH] ...``."""

from __future__ import annotations

from benchmarks.cli import main

raise SystemExit(main())

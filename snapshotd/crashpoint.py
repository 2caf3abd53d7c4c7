"""Named crash points: a test hook that kills this process with SIGKILL at a chosen step.

Set ``SNAPSHOTD_CRASHPOINT=NAME`` (or ``NAME:N`` for the N-th time NAME is reached) and
the process dies exactly there, the way a power cut or the OOM killer would end it,
without running any cleanup. Durability code calls :func:`crashpoint` between its steps
so tests can check that every prefix of a commit leaves a consistent store. With the
variable unset it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["crashpoint"]

_ENV = "SNAPSHOTD_CRASHPOINT"
_hits: dict[str, int] = {}


def crashpoint(name: str) -> None:
    """SIGKILL this process if ``$SNAPSHOTD_CRASHPOINT`` names this point (and count)."""
    wanted = os.environ.get(_ENV)
    if not wanted:
        return
    target, _, nth = wanted.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)

"""The command line's exit codes, and which error means which. Part of the interface.

====  ==========================================================================
0     success
1     ``verify`` found at least one bad snapshot
2     usage or configuration error (nothing was done)
3     no snapshot (or no good snapshot) to act on; also when the version asked
      for fails verification
4     the store failed: an I/O error, a lock, a file we cannot read
5     no daemon is running (``status``, ``snapshot``, ``restore NAME``); for
      ``start``: it stopped after repeated I/O failures (systemd restarts it)
6     the experiment is not registered, did not answer, or skipped the snapshot; or the
      daemon accepted the command line's connection, then hung up or gave no answer
====  ==========================================================================

``restore NAME -- CMD ARGS...`` exits with CMD's own exit code. The daemon uses the same
mapping for the code in its replies, so a command run through the daemon exits with the
same code as one run directly.
"""

from __future__ import annotations

from snapshotd.errors import (
    ConfigError,
    DaemonError,
    NoSnapshot,
    PeerError,
    PeerUnreachable,
    SnapshotCorrupt,
    SnapshotdError,
    UsageError,
)

__all__ = [
    "BAD_SNAPSHOT",
    "EXPERIMENT",
    "MEANINGS",
    "NO_DAEMON",
    "NO_SNAPSHOT",
    "OK",
    "STORE",
    "USAGE",
    "of",
]

#: Each code with what it means, as ``snapshotd --help`` lists them.
MEANINGS = (
    (0, "success"),
    (1, "verify found a bad snapshot"),
    (2, "usage or config error"),
    (3, "no (good) snapshot to act on"),
    (4, "the store failed"),
    (5, "no daemon running (start: stopped after repeated I/O failures)"),
    (6, "the experiment (or the daemon) did not answer, or it is not registered or skipped"),
)

OK = 0
BAD_SNAPSHOT = 1
USAGE = 2
NO_SNAPSHOT = 3
STORE = 4
NO_DAEMON = 5
EXPERIMENT = 6


def of(exc: SnapshotdError) -> int:
    """The exit code for an error."""
    if isinstance(exc, DaemonError):
        return exc.code
    if isinstance(exc, ConfigError | UsageError):
        return USAGE
    if isinstance(exc, NoSnapshot | SnapshotCorrupt):
        return NO_SNAPSHOT
    if isinstance(exc, PeerUnreachable) and exc.name == "daemon":
        return NO_DAEMON
    if isinstance(exc, PeerError):
        return EXPERIMENT
    return STORE

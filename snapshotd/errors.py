"""The exception tree of snapshotd, split by who is at fault and what the caller can do.

Everything snapshotd raises on purpose derives from :class:`SnapshotdError`::

    SnapshotdError
    ├── UsageError              the caller asked for something impossible (our API, your call)
    │   ├── InvalidName         a run name outside [A-Za-z0-9][A-Za-z0-9._-]{0,127}
    │   ├── StateError          the state tree holds something we cannot store; .path names it
    │   └── RestoreMismatch     stored names/shapes do not fit the target; lists them all
    ├── ConfigError             the YAML config is wrong; .key_path names the key
    ├── StoreError              the snapshot store failed us; .path names the file
    │   ├── StoreLocked         another process holds the store (or the run) lock
    │   ├── CommitFailed        an I/O error ended a commit; older versions are untouched
    │   ├── SnapshotCorrupt     a file failed verification; .reason says which check
    │   └── NoSnapshot          nothing (good) to load for that run
    │       └── NoGoodSnapshot  versions exist, but none of them verifies
    ├── ProtocolError           a wire message broke the protocol (abstract)
    │   ├── LocalProtocolError  we were about to send something invalid: our bug
    │   └── RemoteProtocolError the peer sent something invalid: drop the peer
    ├── PeerError               talking to another process failed; .name says which
    │   ├── PeerUnreachable     connect, read or write failed or timed out; __cause__ has why
    │   ├── PeerRefused         the peer's uid is not allowed (SO_PEERCRED)
    │   └── SnapshotSkipped     the experiment reached no safe point in time
    └── DaemonError             the daemon answered a command with an error; .code

Warnings (not errors): :class:`FallbackWarning` is issued when a load skipped a bad
snapshot and used an older one, so callers can catch or escalate it.

Foreign exceptions (``OSError``, ``json``, ``yaml``) are translated once, in the module
that touched the foreign thing, with ``raise X(...) from exc`` so the cause stays visible.
"""

from __future__ import annotations

import os

__all__ = [
    "CommitFailed",
    "ConfigError",
    "DaemonError",
    "FallbackWarning",
    "InvalidName",
    "LocalProtocolError",
    "NoGoodSnapshot",
    "NoSnapshot",
    "PeerError",
    "PeerRefused",
    "PeerUnreachable",
    "ProtocolError",
    "RemoteProtocolError",
    "RestoreMismatch",
    "SnapshotCorrupt",
    "SnapshotSkipped",
    "SnapshotdError",
    "StateError",
    "StoreError",
    "StoreLocked",
    "UsageError",
]


class SnapshotdError(Exception):
    """Root of every error snapshotd raises on purpose."""


class UsageError(SnapshotdError):
    """The caller asked for something the API cannot do."""


class InvalidName(UsageError):
    """A run name that is not ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``."""


class StateError(UsageError):
    """A value in the state tree that snapshotd cannot store.

    Attributes:
        path: where in the tree, written as Python would index it (``state['opt'][2]``).
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class RestoreMismatch(UsageError):
    """A stored state does not fit the target it is loaded into.

    Raised before anything in the target is changed: never a silent partial restore.
    """

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        parts = []
        if missing:
            parts.append("missing from the snapshot: " + ", ".join(missing))
        if unexpected:
            parts.append("not in the target: " + ", ".join(unexpected))
        if mismatched:
            parts.append("shape or dtype differs: " + ", ".join(mismatched))
        super().__init__("; ".join(parts) or "state does not match the target")
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


class ConfigError(SnapshotdError):
    """The configuration is invalid.

    Attributes:
        key_path: the offending key, dotted (``experiments.mnist-*.keep.last``); "" for
            the whole document.
        source: the file, when the config was read from one; the message starts with it.
    """

    def __init__(
        self, key_path: str, problem: str, source: str | os.PathLike[str] | None = None
    ) -> None:
        where = key_path or "config"
        super().__init__(
            f"{os.fspath(source)}: {where}: {problem}" if source else f"{where}: {problem}"
        )
        self.key_path = key_path
        self.problem = problem
        self.source = None if source is None else os.fspath(source)


class StoreError(SnapshotdError):
    """The snapshot store could not do what was asked.

    Attributes:
        path: the file or directory involved, when there is one.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class StoreLocked(StoreError):
    """Another process holds the lock this operation needs."""


class CommitFailed(StoreError):
    """A commit was abandoned; no new version exists and older ones are untouched.

    Attributes:
        published: the file had already been renamed to its final name (and was then
            withdrawn), so a reader may have seen that version number.
    """

    def __init__(self, message: str, path: str | None = None, *, published: bool = False) -> None:
        super().__init__(message, path)
        self.published = published


class SnapshotCorrupt(StoreError):
    """A snapshot file failed verification.

    Attributes:
        reason: which check failed, in words.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}", path)
        self.reason = reason


class NoSnapshot(StoreError):
    """There is no snapshot to load for this run (or not the version asked for)."""


class NoGoodSnapshot(NoSnapshot):
    """Snapshots exist for this run, but none of them verifies."""


class ProtocolError(SnapshotdError):
    """A message broke the wire protocol. Abstract: raise a subclass."""

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection must be dropped."""


class PeerError(SnapshotdError):
    """Talking to another snapshotd process (an experiment, the daemon) failed.

    Attributes:
        name: the experiment's name, or ``"daemon"``.
    """

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


class PeerUnreachable(PeerError):
    """Connecting, reading or writing failed or timed out; ``__cause__`` says why."""


class PeerRefused(PeerError):
    """The process at the other end runs as a uid we do not accept."""


class SnapshotSkipped(PeerError):
    """The experiment did not reach a safe point (or free its lock) in time."""


class DaemonError(SnapshotdError):
    """The daemon could not carry out a command.

    Attributes:
        code: the exit code the command line uses for it.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class FallbackWarning(UserWarning):
    """A load skipped one or more bad snapshots and used an older good one."""

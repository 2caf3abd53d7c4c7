"""The versioned store: the only code that names, lists, locks, moves or deletes snapshots.

Layout under the root (directories 0700, files 0600)::

    <root>/<run>/.lock                      flock'd by every writer of <run>; holds the
                                            highest version handed out (a hint)
    <root>/<run>/v000001.safetensors        committed snapshots, one file each
    <root>/<run>/.tmp.v000002...            a commit in progress (or a crashed one)
    <root>/<run>/quarantine/v000003.safetensors         bad files, moved aside, never deleted
    <root>/<run>/quarantine/v000003.safetensors.reason  why

Rules:

- Versions start at 1, increase, and are never reused: the next one is one more than
  the highest seen in the run directory, in quarantine and in the lock file's hint.
- Every change to a run (commit, prune, quarantine) holds the run's ``flock``, so two
  writers, in one process or many, never collide. The kernel drops the lock when a
  process dies: no stale-lock heuristics. A temporary file present while we hold the
  lock belongs to a writer that died, and is removed.
- Loading takes the newest version that verifies; each bad newer one is moved to
  quarantine with its reason and a :class:`~snapshotd.errors.FallbackWarning` is issued.
- Pruning keeps what the retention policy says, never the newest good version, never
  a file whose name or header is not ours; a damaged file is quarantined, not deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from snapshotd import collector, retention, snapshot
from snapshotd.crashpoint import crashpoint
from snapshotd.errors import (
    CommitFailed,
    FallbackWarning,
    NoGoodSnapshot,
    NoSnapshot,
    SnapshotCorrupt,
    StoreError,
    UsageError,
)
from snapshotd.format import Header, Template
from snapshotd.names import check_name
from snapshotd.target import adapt, state_of
from snapshotd.tree import Flat, flatten

__all__ = ["Check", "Store", "Version"]

_FILE = re.compile(r"v(\d{6,})\.safetensors")
_QUARANTINE = "quarantine"
_LOCK = ".lock"
_UNKNOWN_TIME = datetime.min.replace(tzinfo=UTC)


def file_name(version: int) -> str:
    """The file name of a version: ``v000042.safetensors``."""
    return f"v{version:06d}.safetensors"


@dataclass(frozen=True)
class Version:
    """One listed snapshot. ``problem`` is set when its header could not be read.

    Satisfies :class:`snapshotd.retention.Candidate` (``version``, ``created``).
    """

    name: str
    version: int
    path: Path
    nbytes: int
    step: int | None = None
    created: datetime = _UNKNOWN_TIME
    safe_point: bool | None = None
    problem: str | None = None

    @property
    def state(self) -> str:
        return "ok" if self.problem is None else "damaged"


@dataclass(frozen=True)
class Check:
    """The result of fully verifying one version."""

    name: str
    version: int
    path: Path
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


class Store:
    """A directory of runs, each a directory of versioned snapshot files."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        # The last header template per run: a state whose shapes and tree did not change
        # reuses its layout and the prepared bulk of its header.
        self._templates: dict[str, Template] = {}
        # Snapshot files never change once committed, so what was read of one (keyed by
        # its inode, size, mtime and ctime) is remembered: a daemon that prunes after every
        # commit then reads only the new file, not the headers of every version again.
        self._described: dict[tuple[str, int], tuple[tuple[int, int, int, int], Version]] = {}
        # The last file this store committed per run, known good without reading it back.
        self._written: dict[str, tuple[int, int, int, int]] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- writing ---------------------------------------------------------------------

    def commit(
        self,
        name: str,
        state: object,
        *,
        step: int | None = None,
        metadata: Mapping[str, str] | None = None,
        safe_point: bool | None = None,
        created: datetime | None = None,
    ) -> int:
        """Write ``state`` as the next version of ``name``; durable when it returns.

        ``state`` is a state tree, a dict, or an object with ``__getstate__``.

        Returns:
            The new version number.

        Raises:
            InvalidName: ``name`` is not a valid run name.
            StateError: the state holds something that cannot be stored.
            CommitFailed: an I/O error; no new version exists, older ones are untouched.
        """
        with collector.paused():
            flat = flatten(state_of(state))
        return self.commit_flat(
            name,
            flat,
            step=step,
            metadata=metadata,
            safe_point=safe_point,
            created=created,
        )

    def commit_flat(
        self,
        name: str,
        flat: Flat,
        *,
        step: int | None = None,
        metadata: Mapping[str, str] | None = None,
        safe_point: bool | None = None,
        created: datetime | None = None,
    ) -> int:
        """:meth:`commit` for a state that is already flattened."""
        previous = self._templates.get(name)
        with collector.paused():
            payload = snapshot.Payload.of_flat(flat, previous.layout if previous else None)
        return self.commit_payload(
            name,
            payload,
            step=step,
            metadata=metadata,
            safe_point=safe_point,
            created=created,
        )

    def commit_payload(
        self,
        name: str,
        payload: snapshot.Payload,
        *,
        step: int | None = None,
        metadata: Mapping[str, str] | None = None,
        safe_point: bool | None = None,
        created: datetime | None = None,
    ) -> int:
        """:meth:`commit` for laid-out data (the daemon writes an arena this way).

        Raises as :meth:`commit`, and for data still arriving (``payload.ready``) the
        ``PeerError`` or ``ProtocolError`` that ended it; no version is used up.
        """
        run = self._run_dir(check_name(name), create=True)
        with self._locked(run) as lock_fd:
            _remove_temporaries(run)
            version = self._next_version(run, lock_fd)
            when = created or datetime.now(UTC)
            fields = {
                "name": name,
                "version": version,
                "step": step,
                "created": when,
                "safe_point": safe_point,
                "user": snapshot.user_metadata(metadata),
            }
            try:
                # The write too: it makes a view and a digest per tensor (20,000 of them
                # took 9 ms instead of 2 ms when the collector ran in between).
                with collector.paused():
                    encoded = snapshot.encode(payload, fields, self._templates.get(name))
                    self._templates[name] = encoded.template
                    snapshot.write(run, file_name(version), encoded)
            except CommitFailed as exc:
                # A commit withdrawn after its rename (the directory fsync failed) may have
                # been seen by a reader: its number is never handed out again.
                if exc.published:
                    _record_version(lock_fd, version)
                raise
            _record_version(lock_fd, version)
        path = run / file_name(version)
        identity = _identity(path)
        if identity is not None:
            # Remember what was written, so pruning never reads this header back.
            self._written[name] = identity
            # As read back from the file: UTC (the header keeps no other zone).
            created_utc = when.astimezone(UTC)
            described = Version(name, version, path, identity[1], step, created_utc, safe_point)
            self._described[(name, version)] = (identity, described)
        return version

    def recover(self) -> int:
        """Remove temporary files left by crashed writers in every run; return how many.

        Takes each run's lock in turn, so a live writer's temporary file is never touched.
        """
        removed = 0
        for name in self.names():
            run = self._run_dir(name)
            with self._locked(run):
                removed += _remove_temporaries(run)
        return removed

    # -- reading ---------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every run with a directory in the store, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _is_name(p.name))

    def numbers(self, name: str) -> list[int]:
        """The version numbers of ``name``'s files, oldest first, without reading them."""
        return [version for version, _path in _listed(self._run_dir(check_name(name)))]

    def versions(self, name: str) -> list[Version]:
        """The listed versions of ``name``, oldest first (headers read, data not)."""
        run = self._run_dir(check_name(name))
        return [self._describe(name, version, path) for version, path in _listed(run)]

    def load(
        self,
        name: str,
        version: int | None = None,
        into: object = None,
        *,
        in_place: bool = False,
    ) -> Any:
        """Load the newest good version (or ``version``); see :func:`snapshotd.load`.

        ``in_place``: restore into the arrays ``into``'s state holds now, where they fit,
        verified before any of them changes: no second copy of the state in memory
        (see :func:`snapshot.restore_into` for what ``into`` must promise).

        Raises:
            NoSnapshot: no versions at all, or ``version`` does not exist.
            NoGoodSnapshot: versions exist but none verifies (all were quarantined).
            SnapshotCorrupt: the explicitly requested ``version`` is bad (quarantined).
        """
        if into is None:
            return self.read(name, version).tree()
        reader = functools.partial(self.read, name, version)
        snapshot.restore_into(adapt(into), reader, in_place)
        return into

    def read(
        self,
        name: str,
        version: int | None = None,
        into: Mapping[str, np.ndarray[Any, Any]] | None = None,
    ) -> snapshot.Loaded:
        """The verified snapshot (header and arrays) that :meth:`load` would use.

        ``into``: arrays to restore into, as :func:`snapshot.read` takes them; a version
        that fails verification leaves them unchanged, and the next older one is tried.
        """
        run = self._run_dir(check_name(name))
        if version is not None:
            return self._read_exact(name, run, version, into)
        listed = _listed(run)
        if not listed and self.quarantined(name):
            raise NoGoodSnapshot(
                f"no good snapshot of {name!r}: every one is in {run / _QUARANTINE}", str(run)
            )
        if not listed:
            raise NoSnapshot(f"no snapshots of {name!r} in {self.root}", str(run))
        for found, path in reversed(listed):
            try:
                return _read_verified(name, found, path, into)
            except SnapshotCorrupt as exc:
                self._quarantine(run, found, path, exc.reason)
                _warn_fallback(name, found, exc.reason)
        raise NoGoodSnapshot(
            f"none of the {len(listed)} snapshots of {name!r} verifies; "
            f"the bad files are in {run / _QUARANTINE}",
            str(run),
        )

    def _read_exact(
        self,
        name: str,
        run: Path,
        version: int,
        into: Mapping[str, np.ndarray[Any, Any]] | None,
    ) -> snapshot.Loaded:
        path = run / file_name(version)
        if not path.exists():
            raise NoSnapshot(f"{name!r} has no version {version}", str(path))
        try:
            return _read_verified(name, version, path, into)
        except SnapshotCorrupt as exc:
            moved = self._quarantine(run, version, path, exc.reason)
            if moved is None:
                raise
            raise SnapshotCorrupt(str(path), f"{exc.reason}; moved to {moved}") from exc

    def verify(self, name: str | None = None) -> list[Check]:
        """Fully re-read and check every version (of ``name``, or of every run).

        Read-only: a bad file is reported, not moved (loading and pruning move it).
        """
        checks = []
        for run_name in [check_name(name)] if name else self.names():
            for found, path in _listed(self._run_dir(run_name)):
                checks.append(Check(run_name, found, path, _problem_of(run_name, found, path)))
        return checks

    def quarantined(self, name: str) -> list[Path]:
        """The files of ``name`` that were moved aside, oldest first."""
        folder = self._run_dir(check_name(name)) / _QUARANTINE
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if _FILE.fullmatch(p.name))

    # -- retention -------------------------------------------------------------------

    def prune(
        self, name: str, policy: retention.Policy, *, dry_run: bool = False
    ) -> list[retention.Decision]:
        """Apply ``policy`` to ``name`` now; return one decision per version, newest first.

        The newest version that verifies anchors the policy and is always kept. Newer
        versions that fail verification, and versions whose header cannot be read, are
        moved to quarantine, never deleted (on a dry run, only reported): their decision
        keeps them, and its reason says why and where.
        """
        run = self._run_dir(check_name(name))
        if not run.is_dir():
            return []
        with self._locked(run):
            candidates, damaged = self._prune_candidates(name, run, dry_run)
            decisions = retention.plan(candidates, policy)
            if not dry_run:
                self._delete(run, sorted(d.version for d in decisions if not d.keep))
        where = "would be moved to quarantine" if dry_run else "moved to quarantine"
        quarantined = [
            retention.Decision(v.version, True, (f"damaged ({problem}), {where}",), damaged=True)
            for v, problem in damaged
        ]
        return sorted([*decisions, *quarantined], key=lambda d: d.version, reverse=True)

    def _prune_candidates(
        self, name: str, run: Path, dry_run: bool
    ) -> tuple[list[Version], list[tuple[Version, str]]]:
        """The versions the policy judges, and those found damaged (with why), which
        are moved to quarantine unless ``dry_run``."""
        found = _listed(run)
        present = {v for v, _ in found}
        for key in [k for k in self._described if k[0] == name and k[1] not in present]:
            del self._described[key]  # forget what was pruned or moved away
        listed = [self._describe(name, v, p) for v, p in found]
        usable = [version for version in listed if version.problem is None]
        damaged = [(version, version.problem) for version in listed if version.problem]
        while usable and (problem := self._problem_of_newest(name, usable[-1])):
            damaged.append((usable.pop(), problem))
        if not dry_run:
            for version, why in damaged:
                self._quarantine(run, version.version, version.path, why)
        return usable, damaged

    def _problem_of_newest(self, name: str, newest: Version) -> str | None:
        # The newest version anchors the policy, so it must verify; one this store has
        # just written and fsynced is known good without reading it all back.
        if _identity(newest.path) == self._written.get(name):
            return None
        return _problem_of(name, newest.version, newest.path)

    def _delete(self, run: Path, versions: list[int]) -> None:
        for version in versions:
            crashpoint("prune.before_unlink")
            os.unlink(run / file_name(version))
        if versions:
            snapshot.fsync_directory(run)

    # -- export ----------------------------------------------------------------------

    def export(
        self, name: str, destination: str | os.PathLike[str], version: int | None = None
    ) -> int:
        """Write one verified version as ``.safetensors`` or ``.npz``; return its version.

        The ``.safetensors`` copy is the snapshot file itself (all metadata kept). The
        ``.npz`` holds one array per tensor name and loads with ``allow_pickle=False``;
        scalars that are not numpy values and the tree structure are not in it.

        Raises:
            UsageError: the destination has another suffix, or its directory is missing.
        """
        target = Path(destination)
        if target.suffix not in (".safetensors", ".npz"):
            raise UsageError(
                f"export to .safetensors or .npz, not {target.suffix or target.name!r}"
            )
        if not target.parent.is_dir():
            raise UsageError(f"cannot export to {target}: there is no directory {target.parent}")
        loaded = self.read(name, version)
        if target.suffix == ".npz":
            _write_npz(target, loaded.arrays)
        else:
            fields = _fields_of(loaded.header)
            payload = snapshot.Payload.of_flat(Flat(loaded.arrays, loaded.header.meta.structure))
            snapshot.write(target.parent, target.name, snapshot.encode(payload, fields))
        return loaded.header.meta.version

    # -- internals -------------------------------------------------------------------

    def _run_dir(self, name: str, *, create: bool = False) -> Path:
        run = self.root / name
        if create and not run.is_dir():
            _make_private_dir(self.root)
            _make_private_dir(run)
        return run

    @contextlib.contextmanager
    def _locked(self, run: Path) -> Iterator[int]:
        try:
            fd = os.open(run / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the lock of {run}: {exc.strerror}", str(run)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def _next_version(self, run: Path, lock_fd: int) -> int:
        seen = [v for v, _ in _listed(run)] + [v for v, _ in _listed(run / _QUARANTINE)]
        hint = os.pread(lock_fd, 32, 0).strip()
        if hint.isdigit():
            seen.append(int(hint))
        return max(seen, default=0) + 1

    def _describe(self, name: str, version: int, path: Path) -> Version:
        identity = _identity(path)
        known = self._described.get((name, version))
        if known is not None and identity is not None and known[0] == identity:
            return known[1]
        described = self._read_description(name, version, path)
        if identity is not None and described.problem is None:
            self._described[(name, version)] = (identity, described)
        return described

    def _read_description(self, name: str, version: int, path: Path) -> Version:
        try:
            header = snapshot.read_header(path)
        except StoreError as exc:
            size = path.stat().st_size if path.exists() else 0
            # The reason alone: the version's path is beside it already.
            why = exc.reason if isinstance(exc, SnapshotCorrupt) else str(exc)
            return Version(name, version, path, size, problem=why)
        meta = header.meta
        if meta.version != version or meta.name != name:
            problem = (
                _misnamed(meta.version)
                if meta.version != version
                else (f"the header names run {meta.name!r}")
            )
            return Version(name, version, path, header.file_size, problem=problem)
        return Version(
            name, version, path, header.file_size, meta.step, meta.created, meta.safe_point
        )

    def _quarantine(self, run: Path, version: int, path: Path, reason: str) -> Path | None:
        """Move a bad file aside, with its reason beside it; where it went (None: it could
        not be moved, which is warned about)."""
        folder = run / _QUARANTINE
        try:
            _make_private_dir(folder)
            target = folder / file_name(version)
            suffix = 1
            while target.exists():
                suffix += 1
                target = folder / f"{file_name(version)}.{suffix}"
            os.rename(path, target)
            _write_private(target.with_name(target.name + ".reason"), (reason + "\n").encode())
            snapshot.fsync_directory(run)
            snapshot.fsync_directory(folder)
        except OSError as exc:
            warnings.warn(
                f"could not move bad snapshot {path} to quarantine: {exc}",
                FallbackWarning,
                stacklevel=3,
            )
            return None
        return target


def _listed(run: Path) -> list[tuple[int, Path]]:
    """Committed snapshot files in ``run`` by version, oldest first; nothing else."""
    try:
        entries = list(os.scandir(run))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        match = _FILE.fullmatch(entry.name)
        if match and entry.is_file(follow_symlinks=False):
            found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """Inode, size, mtime and ctime of a file: a different file, or a changed one, differs.

    The ctime too: a program that rewrites a file can set its mtime back, not its ctime.
    """
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _record_version(lock_fd: int, version: int) -> None:
    # Only a hint (the files are the record), so a failure to write it is not an error.
    with contextlib.suppress(OSError):
        os.pwrite(lock_fd, f"{version}\n".encode(), 0)


def _read_verified(
    name: str,
    version: int,
    path: Path,
    into: Mapping[str, np.ndarray[Any, Any]] | None = None,
) -> snapshot.Loaded:
    """Read and verify ``path`` as version ``version`` of run ``name`` (restoring into
    ``into`` as :func:`snapshot.read` does).

    Besides the file's own checks, the header must name this run and this version: a
    valid file copied under another run's or another version's name is caught here,
    before any data is read.
    """

    def check(header: Header) -> None:
        meta = header.meta
        if meta.name != name:
            raise SnapshotCorrupt(str(path), f"the header names run {meta.name!r}, not {name!r}")
        if meta.version != version:
            raise SnapshotCorrupt(str(path), _misnamed(meta.version))

    return snapshot.read(path, into, check)


def _problem_of(name: str, version: int, path: Path) -> str | None:
    try:
        _read_verified(name, version, path)
    except SnapshotCorrupt as exc:
        return exc.reason
    except StoreError as exc:
        return str(exc)
    return None


def _misnamed(header_version: int) -> str:
    return f"the header says version {header_version}, the file name says otherwise"


def _remove_temporaries(run: Path) -> int:
    # Called with the run lock held: every writer holds it while its temporary file
    # exists, so any temporary file seen now belongs to a writer that died.
    removed = 0
    for entry in os.scandir(run):
        if entry.name.startswith(snapshot.TMP_PREFIX):
            os.unlink(entry.path)
            removed += 1
    return removed


def _make_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror}", str(path)) from exc
    snapshot.fsync_directory(path.parent)


def _is_name(text: str) -> bool:
    try:
        check_name(text)
    except UsageError:
        return False
    return True


def _warn_fallback(name: str, version: int, reason: str) -> None:
    warnings.warn(
        f"snapshot {name!r} version {version} is bad ({reason}); "
        "moved to quarantine, falling back to an older version",
        FallbackWarning,
        stacklevel=4,
    )


def _fields_of(header: Header) -> dict[str, Any]:
    meta = header.meta
    return {
        "name": meta.name,
        "version": meta.version,
        "step": meta.step,
        "created": meta.created,
        "safe_point": meta.safe_point,
        "user": dict(meta.user),
    }


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_npz(target: Path, arrays: Mapping[str, np.ndarray[Any, Any]]) -> None:
    tmp = target.with_name(f"{snapshot.TMP_PREFIX}{target.name}.{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with os.fdopen(os.open(tmp, flags, 0o600), "wb") as stream:
            # What np.savez does, without its keyword arguments colliding with tensor names.
            with zipfile.ZipFile(stream, "w") as archive:
                for name, array in arrays.items():
                    with archive.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, array, allow_pickle=False)
            stream.flush()
            os.fsync(stream.fileno())
        os.rename(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CommitFailed(f"writing {target} failed: {exc}", str(target)) from exc
    snapshot.fsync_directory(target.parent)

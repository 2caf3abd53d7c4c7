"""Where experiments and the daemon meet: the runtime directory, its sockets, their owners.

Layout (directories 0700, sockets 0600)::

    <runtime_dir>/control.sock               the daemon's control socket
    <runtime_dir>/experiments/<name>.sock    one per registered experiment
    <runtime_dir>/experiments/<name>.lock    flock'd by <name>'s registration, removed at its end

The runtime directory comes from an argument, else ``$SNAPSHOTD_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/snapshotd``, else ``/run/snapshotd`` for root and
``/tmp/snapshotd-<uid>`` for anyone else.

Security rules, each with its reason:

- Path sockets only, never the abstract namespace: abstract sockets have no permission
  checks at all.
- Directories are created 0700 and an existing one must be ours and not group/world
  accessible, or we refuse to use it: on Linux, reaching a socket needs search
  permission on its directory, so the directory is the real access control.
- Sockets are bound under ``umask(0o177)`` (0600): ``fchmod`` does nothing on sockets.
- The peer of every connection is identified with ``SO_PEERCRED``, and only allowed uids
  (default: ours, and root) are served. Credentials are those at ``connect()``; a pid is
  never used for authorisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from snapshotd.errors import PeerRefused, UsageError
from snapshotd.names import NAME_PATTERN, check_name

__all__ = [
    "Peer",
    "bind_private",
    "check_peer",
    "control_socket",
    "default_allowed_uids",
    "ensure_private_dir",
    "experiment_lock",
    "experiment_socket",
    "experiments_dir",
    "peer_of",
    "registered_names",
    "runtime_dir",
]

#: AF_UNIX paths are limited to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_UCRED = struct.Struct("3i")


def runtime_dir(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path:
    """The runtime directory, by the precedence in the module docstring."""
    if explicit:
        return Path(explicit).expanduser()
    if environ.get("SNAPSHOTD_RUNTIME_DIR"):
        return Path(environ["SNAPSHOTD_RUNTIME_DIR"]).expanduser()
    if environ.get("XDG_RUNTIME_DIR"):
        return Path(environ["XDG_RUNTIME_DIR"]) / "snapshotd"
    uid = os.getuid()
    return Path("/run/snapshotd") if uid == 0 else Path(f"/tmp/snapshotd-{uid}")


def experiments_dir(runtime: Path) -> Path:
    return runtime / "experiments"


def experiment_socket(runtime: Path, name: str) -> Path:
    """The socket of experiment ``name``.

    Normally ``<name>.sock``. A socket path may not exceed 107 bytes, and names may be
    128 characters long, so a name that does not fit is shortened and tagged with a hash
    of the whole name (``<prefix>~<hash>.sock``; ``~`` never occurs in a name, so the two
    forms cannot collide). The lock file always carries the whole name.
    """
    folder = experiments_dir(runtime)
    plain = folder / f"{check_name(name)}.sock"
    if len(os.fsencode(plain)) <= MAX_SOCKET_PATH:
        return plain
    tag = hashlib.sha256(name.encode()).hexdigest()[:16]
    room = MAX_SOCKET_PATH - len(os.fsencode(folder)) - len(f"/~{tag}.sock")
    if room < 1:
        return plain  # bind_private refuses it, saying to shorten the runtime directory
    return folder / f"{name[:room]}~{tag}.sock"


def registered_names(runtime: Path) -> set[str]:
    """Names with a lock file and a socket in the runtime directory (live or stale)."""
    try:
        entries = os.listdir(experiments_dir(runtime))
    except FileNotFoundError:
        return set()
    names = {e[: -len(".lock")] for e in entries if e.endswith(".lock")}
    return {
        n for n in names if NAME_PATTERN.fullmatch(n) and experiment_socket(runtime, n).exists()
    }


def experiment_lock(runtime: Path, name: str) -> Path:
    return experiments_dir(runtime) / f"{check_name(name)}.lock"


def control_socket(runtime: Path) -> Path:
    return runtime / "control.sock"


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) 0700, or check that the existing one is safe.

    Raises:
        UsageError: the directory is someone else's, or group/world accessible.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        raise UsageError(f"cannot create runtime directory {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise UsageError(f"{path} belongs to uid {info.st_uid}, not to us ({os.getuid()})")
    if info.st_mode & 0o077:
        raise UsageError(
            f"{path} is accessible to others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run: chmod 700 {path}"
        )


def bind_private(path: Path, backlog: int = 16) -> socket.socket:
    """A listening path socket at ``path`` with mode 0600 (``path`` must not exist).

    The socket is bound under a temporary name, starts listening, and only then is
    linked as ``path``: whoever sees the file appear (the daemon's watcher) can connect
    at once instead of being refused by a socket that is not listening yet.

    Raises:
        FileExistsError: ``path`` exists.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter runtime directory (SNAPSHOTD_RUNTIME_DIR)"
        )
    staging = path.with_name(f".bind-{secrets.token_hex(4)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(staging))
        sock.listen(backlog)
        os.link(staging, path)  # unlike rename, fails if path exists (EEXIST)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
        with contextlib.suppress(OSError):
            staging.unlink()
    return sock


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a Unix socket, as the kernel saw them at connect."""

    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)


def default_allowed_uids() -> frozenset[int]:
    """Our own uid, and root (who can read our memory anyway)."""
    return frozenset({os.getuid(), 0})


def check_peer(sock: socket.socket, allowed: Iterable[int], name: str) -> Peer:
    """Return the peer if its uid is allowed.

    Raises:
        PeerRefused: the peer's uid is not in ``allowed``.
    """
    peer = peer_of(sock)
    if peer.uid not in set(allowed):
        raise PeerRefused(name, f"uid {peer.uid} (pid {peer.pid}) is not allowed to connect")
    return peer

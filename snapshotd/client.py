"""The experiment side: register a run, serve the daemon's requests, resume from a snapshot.

``register(name, target)`` listens on ``<runtime_dir>/experiments/<name>.sock`` and
returns a :class:`Run`. One background thread waits on that socket (blocked in
``select``: it costs nothing while idle and never competes with training). When the
daemon asks for a snapshot, the state is copied **once** into a reused shared-memory
arena and its descriptor is handed over; hashing, writing, fsync and pruning happen in
the daemon's process.

Consistency: a snapshot never mixes two steps.

- **safe point**: once the program calls ``run.step(n)``, a request waits for the next
  ``run.step`` and is served inside it, on the training thread, recording ``n``;
- **lock**: once the program uses ``with run.lock():`` around code that mutates the
  state, a request waits until the lock is free and copies under it;
- **neither**: the state is copied when the request arrives and the snapshot is marked
  as taken without a safe point.

If no safe point (or free lock) comes within the daemon's timeout, the request is
abandoned on both sides: the client answers ``skipped`` and a late ``run.step`` does not
serve it. The arena is not touched again until the daemon says it is done with it.

Pushing a snapshot into a running experiment (``snapshotd restore NAME``) is applied the
same way: at the next safe point, under the lock, or at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snapshotd import collector, rendezvous
from snapshotd.arena import Arena, layout_of, map_readonly, table_of
from snapshotd.channel import Channel, connect
from snapshotd.errors import (
    PeerError,
    ProtocolError,
    RemoteProtocolError,
    SnapshotdError,
    StateError,
    UsageError,
)
from snapshotd.format import Layout
from snapshotd.names import check_name
from snapshotd.protocol import (
    Command,
    Done,
    Filled,
    Hello,
    Message,
    Push,
    PushDone,
    Reply,
    Skipped,
    SnapshotRequest,
    StateReady,
    TensorTable,
    check_arena,
)
from snapshotd.snapshot import STREAM_UNIT, restore_into
from snapshotd.store import Store
from snapshotd.target import Target, adapt
from snapshotd.tree import Skeleton, flatten, same_tree, unflatten

__all__ = ["Resumed", "Run", "register"]

log = logging.getLogger("snapshotd.client")

#: How long one message may take to arrive once it has started, or to be sent.
IO_TIMEOUT = 5.0
#: Connections not yet greeted that we keep; older ones are closed.
_MAX_NEWCOMERS = 4
_MODES = ("auto", "step", "lock", "none")


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run came back from."""

    version: int
    step: int | None


#: Why a request was skipped when no safe point came, and what to do about it.
_NO_SAFE_POINT = (
    "no safe point (run.step) came in time: call run.step more often, or raise the "
    "daemon's timeout (daemon.timeout)"
)


@dataclass
class _Pending:
    """A request waiting for a safe point (or a push waiting to be applied)."""

    id: int
    deadline: float
    push: Any = None  # the state tree of a Push
    origin: Resumed | None = None  # the version and step a Push came from


def register(
    name: str,
    target: object = None,
    *,
    get: Callable[[], Any] | None = None,
    set: Callable[[Any], None] | None = None,
    rename: Mapping[Any, Any] | None = None,
    resume: bool | int = False,
    in_place: bool = False,
    runtime_dir: str | os.PathLike[str] | None = None,
    store: str | os.PathLike[str] | None = None,
    consistency: str = "auto",
    allowed_uids: frozenset[int] | None = None,
) -> Run:
    """Register the experiment ``name`` so the daemon can snapshot ``target``.

    Args:
        name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``; one live registration per name.
        target: an object with ``__getstate__``/``__setstate__``, a dict of named arrays
            (restored in place where shapes match), or ``None`` with ``get=``/``set=``.
        rename: for dict targets, stored name -> current name when resuming.
        resume: ``True`` for the newest good snapshot, or a version number. The
            environment variable ``SNAPSHOTD_RESUME`` (``latest`` or a number), when set,
            takes its place: ``snapshotd restore NAME --version V -- CMD`` sets it. The
            state is loaded into the target before this returns.
        in_place: resume into the arrays the target's state holds now, where they fit:
            no second copy of the state in memory (``snapshot.restore_into``). For
            targets whose ``__getstate__`` returns their own arrays and whose
            ``__setstate__`` keeps them; verified before any array changes.
        runtime_dir: where experiments and the daemon meet (see ``rendezvous``).
        store: the store to resume from when no daemon is running (else
            ``SNAPSHOTD_STORE``).
        consistency: ``auto`` (safe point once ``run.step`` is used, else the lock once
            ``run.lock`` is used, else copy at once), or force ``step``, ``lock``, ``none``.
        allowed_uids: uids that may connect (default: ours and root).

    Raises:
        InvalidName: a bad name.
        UsageError: the name is registered by a live process, or a bad argument.
        StateError: the state holds something that cannot be stored (path named).
        NoSnapshot: a specific version was asked to resume from and does not exist.
    """
    check_name(name)
    if consistency not in _MODES:
        raise UsageError(f"consistency must be one of {', '.join(_MODES)}")
    adapted = adapt(target, get=get, set=set, rename=rename)
    flatten(adapted.get_state())  # refuse unstorable state now, not at the first snapshot
    runtime = rendezvous.runtime_dir(runtime_dir, os.environ)
    claim = _claim_name(runtime, name)
    try:
        resumed = _resume(name, adapted, resume, in_place, runtime, store)
        listener = rendezvous.bind_private(rendezvous.experiment_socket(runtime, name))
    except BaseException:
        _release_name(rendezvous.experiment_lock(runtime, name), claim)
        raise
    return Run(name, adapted, listener, claim, runtime, resumed, consistency, allowed_uids)


def _claim_name(runtime: Path, name: str) -> int:
    """Hold ``<name>.lock`` for the life of the registration; clear a stale socket.

    The file is removed when the registration ends (:func:`_release_name`), so a lock
    taken on a file that was removed or replaced meanwhile is no claim: that is checked
    after locking, and the claim tried again on the file now there.
    """
    folder = rendezvous.experiments_dir(runtime)
    rendezvous.ensure_private_dir(runtime)
    rendezvous.ensure_private_dir(folder)
    lock_path = rendezvous.experiment_lock(runtime, name)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(
                f"experiment {name!r} is already registered (pid {holder}); "
                "close that run first or use another name"
            ) from None
        if _same_file(lock_path, fd):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _reclaim_stale_socket(rendezvous.experiment_socket(runtime, name), name, fd)
    return fd


def _same_file(path: Path, fd: int) -> bool:
    """True when ``path`` is still the file open as ``fd``."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _release_name(lock_path: Path, claim: int) -> None:
    """End a registration: remove its lock file while still holding it (so the runtime
    directory does not fill with the names of runs long gone), then let go."""
    try:
        if _same_file(lock_path, claim):
            lock_path.unlink()
    except OSError:
        pass  # left behind: harmless, the next claim of the name reuses it
    finally:
        os.close(claim)


def _reclaim_stale_socket(path: Path, name: str, claim: int) -> None:
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        path.unlink()  # stale: its process died without cleaning up
        return
    except OSError as exc:
        os.close(claim)
        raise UsageError(f"cannot check the old socket {path} of {name!r}: {exc}") from exc
    finally:
        probe.close()
    os.close(claim)
    raise UsageError(f"experiment {name!r} has a live socket at {path}; it is still running")


# -- resume --------------------------------------------------------------------------


def _resume(
    name: str, target: Target, resume: bool | int, in_place: bool, runtime: Path, store: Any
) -> Resumed | None:
    wanted = _resume_wish(resume, os.environ.get("SNAPSHOTD_RESUME", ""))
    if wanted is None:
        return None
    found = _find_store(runtime, store)
    if not any(v.problem is None for v in found.versions(name)) and wanted == "latest":
        log.info("%s: nothing to resume from in %s", name, found.root)
        return None
    version = None if wanted == "latest" else int(wanted)
    loaded = restore_into(target, functools.partial(found.read, name, version), in_place)
    meta = loaded.header.meta
    log.info("%s: resumed from version %d (step %s)", name, meta.version, meta.step)
    return Resumed(meta.version, meta.step)


def _resume_wish(resume: bool | int, environ_value: str) -> str | int | None:
    """What to resume from: ``SNAPSHOTD_RESUME`` when it is set, else ``resume=``.

    The variable wins because it belongs to this launch, where ``resume=`` is written
    once in the script: ``snapshotd restore NAME --version V -- CMD`` sets it to ``V``
    for a script that says ``resume=True``.
    """
    text = environ_value.strip()
    if text == "latest" or text.isdigit():
        return text
    if text:
        raise UsageError(f"SNAPSHOTD_RESUME must be 'latest' or a version number, not {text!r}")
    if resume is True:
        return "latest"
    if isinstance(resume, int) and resume is not False and resume > 0:
        return resume
    return None


def _find_store(runtime: Path, store: Any) -> Store:
    path = _store_from_daemon(runtime)
    path = path or store or os.environ.get("SNAPSHOTD_STORE")
    if not path:
        raise UsageError(
            "resume needs a store: start the daemon, pass store=..., or set SNAPSHOTD_STORE"
        )
    return Store(path)


def _store_from_daemon(runtime: Path) -> str | None:
    control = rendezvous.control_socket(runtime)
    if not control.exists():
        return None
    try:
        channel = connect(control, "daemon", IO_TIMEOUT)
    except PeerError:
        return None
    try:
        channel.send(Hello("experiment", "resume", os.getpid()))
        channel.send(Command(1, "store"))
        reply = _first_reply(channel)
    except (PeerError, ProtocolError) as exc:
        log.warning("could not ask the daemon for its store: %s", exc)
        return None
    finally:
        channel.close()
    return str(reply.result) if reply is not None and reply.ok else None


def _first_reply(channel: Channel) -> Reply | None:
    for _ in range(4):
        message, fd = channel.receive(IO_TIMEOUT)
        if fd is not None:
            os.close(fd)
        if isinstance(message, Reply):
            return message
    return None


# -- the run -------------------------------------------------------------------------


class Run:
    """A registered experiment. Use ``run.step(n)`` as a safe point and ``close()`` it.

    Attributes:
        name: the experiment's name.
        resumed: the version and step its state last came back from, or ``None``: the
            resume at ``register``, or a snapshot pushed since (``snapshotd restore``).
        last_version: the newest version the daemon committed from this run, or ``None``.
    """

    def __init__(
        self,
        name: str,
        target: Target,
        listener: socket.socket,
        claim: int,
        runtime: Path,
        resumed: Resumed | None,
        consistency: str,
        allowed_uids: frozenset[int] | None,
    ) -> None:
        self.name = name
        self.resumed = resumed
        self.last_version: int | None = None
        self._target = target
        self._runtime = runtime
        self._mode = consistency
        self._allowed = rendezvous.default_allowed_uids() if allowed_uids is None else allowed_uids
        self._mutex = threading.RLock()
        self._guard = threading.Lock()  # protects the fields below
        self._pending: _Pending | None = None
        self._push: _Pending | None = None
        self._busy: int | None = None  # request id whose arena the daemon still reads
        self._used_step = False
        self._used_lock = False
        self._capture = _Capture(name)
        self._service = _Service(self, listener, claim)
        self._service.start()
        weakref.finalize(self, _Service.stop, self._service)

    # -- the experiment's API ----------------------------------------------------------

    def step(self, n: int) -> Resumed | None:
        """A safe point: the state is consistent here. Serves a pending request, if any.

        Cheap when nothing is pending (two attribute reads).

        Returns:
            ``None``, or, when ``snapshotd restore NAME`` pushed a snapshot and it replaced
            the state here, that snapshot's version and step (also in :attr:`resumed`).
            The next snapshots are labelled with the ``n`` given here, so a loop that
            counts its own steps goes on from the returned ``step + 1``.
        """
        self._used_step = True
        if self._pending is not None:
            self._serve_pending(n)
        if self._push is not None:
            return self._apply_push()
        return None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this around code that mutates the state; a snapshot waits for it."""
        self._used_lock = True
        with self._mutex:
            yield
        if self._push is not None and self.mode() == "lock":
            self._apply_push()

    def close(self) -> None:
        """Stop serving, remove the socket and free the name. Idempotent."""
        self._service.stop()
        self._capture.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Run {self.name!r} mode={self.mode()} last_version={self.last_version}>"

    def mode(self) -> str:
        """How requests are served now: ``step``, ``lock`` or ``none``."""
        if self._mode != "auto":
            return self._mode
        if self._used_step:
            return "step"
        return "lock" if self._used_lock else "none"

    # -- serving (called from the service thread or at a safe point) -------------------

    def _serve_pending(self, step: int | None) -> None:
        with self._guard:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        if time.monotonic() > pending.deadline:
            self._service.send(Skipped(pending.id, _NO_SAFE_POINT))
            return
        self._send_state(pending.id, step, safe_point=True)

    def _send_state(self, request: int, step: int | None, safe_point: bool) -> None:
        session = self._service.session
        try:
            taken = self._capture.take(self._target, request, step, safe_point, session)
        except _COPY_ERRORS as exc:
            self._cannot_copy(request, exc, session)
            return
        self._busy = request
        if not self._service.send(taken.message, taken.fd, session=session):
            self._busy = None
            return
        if taken.rest is not None:
            self._stream(request, taken.rest, session)

    def _stream(self, request: int, rest: Iterator[int], session: int) -> None:
        """Copy the rest of a state sent ahead of its copy, saying how far it has come
        after each piece, so the daemon writes the first pieces while the last are copied.

        Stops once the daemon no longer reads it: it answered ``done`` early (a failed
        commit, the staging budget) or the connection went (``_busy`` is cleared then),
        or a send failed. The arena is filled whole again at the next snapshot.
        """
        try:
            for upto in rest:
                if self._busy != request:
                    return
                if not self._service.send(Filled(request, upto), session=session):
                    return
        except _COPY_ERRORS as exc:
            # Withdraws the state: the daemon abandons its commit, and no file is made.
            self._cannot_copy(request, exc, session)

    def _cannot_copy(self, request: int, exc: Exception, session: int) -> None:
        log.error("%s: cannot snapshot the state: %s", self.name, exc)
        # Only to the session that asked: a restarted daemon numbers its requests from 1.
        self._service.send(Skipped(request, f"cannot copy the state: {exc}"), session=session)

    def _on_request(self, request: SnapshotRequest) -> None:
        if self._busy is not None:
            self._service.send(Skipped(request.id, "the previous snapshot is still in flight"))
            return
        mode = self.mode()
        if mode == "none":
            self._send_state(request.id, None, safe_point=False)
        elif mode == "lock":
            self._serve_under_lock(request)
        else:
            with self._guard:
                self._pending = _Pending(request.id, time.monotonic() + request.timeout)

    def _serve_under_lock(self, request: SnapshotRequest) -> None:
        if not self._mutex.acquire(timeout=request.timeout):
            self._service.send(Skipped(request.id, "the state lock was not free in time"))
            return
        try:
            self._send_state(request.id, None, safe_point=True)
        finally:
            self._mutex.release()

    def _expire(self, now: float) -> float | None:
        """Abandon requests and pushes past their deadline; return the next deadline."""
        with self._guard:
            pending, push = self._pending, self._push
            if pending is not None and now > pending.deadline:
                self._pending = None
            if push is not None and now > push.deadline:
                self._push = None
        if pending is not None and now > pending.deadline:
            self._service.send(Skipped(pending.id, _NO_SAFE_POINT))
        if push is not None and now > push.deadline:
            self._service.send(PushDone(push.id, "no safe point came in time; not applied"))
        deadlines = [p.deadline for p in (pending, push) if p is not None and now <= p.deadline]
        return min(deadlines, default=None)

    def _on_done(self, done: Done) -> None:
        if done.id == self._busy:
            self._busy = None
        if done.version is not None:
            self.last_version = done.version
        elif done.error:
            log.warning(
                "%s: the daemon could not commit snapshot %d: %s", self.name, done.id, done.error
            )

    def _on_disconnect(self) -> None:
        self._busy = None  # a daemon that is gone no longer reads the arena
        with self._guard:
            # Requests and pushes die with the connection that brought them: the daemon
            # has already reported them as not done.
            self._pending = None
            self._push = None

    def _on_push(self, push: Push, fd: int) -> None:
        try:
            tree = _read_push(push, fd)
        except (SnapshotdError, ValueError, KeyError, TypeError, OSError) as exc:
            self._service.send(PushDone(push.id, f"cannot read the pushed state: {exc}"))
            return
        finally:
            os.close(fd)
        origin = Resumed(push.version, push.step)
        with self._guard:
            self._push = _Pending(push.id, time.monotonic() + push.timeout, tree, origin)
        mode = self.mode()
        if mode == "none":
            self._apply_push()
        elif mode == "lock" and self._mutex.acquire(timeout=IO_TIMEOUT):
            try:
                self._apply_push()
            finally:
                self._mutex.release()

    def _apply_push(self) -> Resumed | None:
        """Replace the state with the pending push, if any; where it came from, if done."""
        with self._guard:
            push, self._push = self._push, None
        if push is None:
            return None
        if time.monotonic() > push.deadline:
            self._service.send(PushDone(push.id, "no safe point came in time; not applied"))
            return None
        try:
            self._target.set_state(push.push)
        except Exception as exc:  # the user's __setstate__ may raise anything
            log.error("%s: the pushed snapshot was not applied: %s", self.name, exc)
            self._service.send(PushDone(push.id, f"{type(exc).__name__}: {exc}"))
            return None
        self.resumed = push.origin
        if push.origin is not None:
            log.info(
                "%s: restored version %d (step %s), pushed by the daemon",
                self.name,
                push.origin.version,
                push.origin.step,
            )
        self._service.send(PushDone(push.id))
        return push.origin


def _read_push(push: Push, fd: int) -> Any:
    check_arena(push.table, os.fstat(fd).st_size)
    layout = layout_of(push.table)
    mapped = map_readonly(fd, push.table.size)
    try:
        data = np.frombuffer(mapped, dtype=np.uint8, count=push.table.size)
        arrays = {name: array.copy() for name, array in layout.views(data).items()}
        del data
    finally:
        mapped.close()
    return unflatten(push.structure, arrays)


class _Capture:
    """Copies the state into the reused arena; the layout is recomputed only on change.

    It also numbers the state's descriptions (tree and table, see ``StateReady``) and
    remembers the one last sent and to which daemon session, so an unchanged state is
    described once per session, not once per snapshot, and never repeated to a session
    that did not receive it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.layout: Layout | None = None
        self.table: TensorTable | None = None
        self.arena: Arena | None = None
        self.skeleton: Skeleton | None = None
        self._numbered = 0
        self._announced: _Announced | None = None

    def take(
        self, target: Target, request: int, step: int | None, safe_point: bool, session: int
    ) -> _Taken:
        """Copy the state into the arena (or, when it streams, its first piece) and
        describe it. Raises ``StateError``, ``OSError``, ``TypeError``, ``ValueError``."""
        state = target.get_state()
        with collector.paused():
            taken = self._again(state)
            if taken is None:
                taken = self._first(state)
        leaves, structure = taken
        assert self.arena is not None
        assert self.layout is not None
        assert self.table is not None
        assert self.skeleton is not None
        arrays = self.layout.in_order(leaves)
        rest, filled = None, None
        if streams(self.layout):
            rest = self.arena.filling(self.layout, arrays, _piece_size(self.layout))
            filled = next(rest)
        else:
            self.arena.fill_in_order(self.layout, arrays)
        kinds = self.skeleton.kinds
        message = self._describe(request, step, safe_point, structure, kinds, session, filled)
        return _Taken(message, self.arena.fd, rest)

    def _again(self, state: object) -> tuple[list[np.ndarray[Any, Any]], Any] | None:
        """The arrays and structure of ``state`` taken in bulk, when it is the tree taken
        last time with the same shapes and dtypes (see ``Skeleton``); None: flatten it."""
        if self.skeleton is None or self.layout is None:
            return None
        taken = self.skeleton.take(state)
        if taken is None or not self.layout.accepts(taken[0]):
            return None
        return taken

    def _first(self, state: object) -> tuple[list[np.ndarray[Any, Any]], Any]:
        """Flatten ``state`` (a first one, or one that changed) and lay it out anew if
        its shapes or dtypes changed; return its arrays and structure."""
        flat = flatten(state)
        self.skeleton = Skeleton(flat)
        if self.layout is None or not self.layout.matches(flat.arrays):
            self._relayout(Layout.plan(flat.arrays))
        return list(flat.arrays.values()), flat.structure

    def _describe(
        self,
        request: int,
        step: int | None,
        safe_point: bool,
        structure: Any,
        kinds: str | None,
        session: int,
        filled: int | None,
    ) -> StateReady:
        known = self._announced
        table = self.table
        assert table is not None
        if (
            known is not None
            and known.session == session
            and known.table is table
            and same_tree(known.structure, known.kinds, structure, kinds)
        ):
            return StateReady(request, step, safe_point, None, None, known.number, filled)
        self._numbered += 1
        self._announced = _Announced(session, self._numbered, table, structure, kinds)
        return StateReady(request, step, safe_point, structure, table, self._numbered, filled)

    def _relayout(self, layout: Layout) -> None:
        self.close()
        self.arena = Arena(layout.data_size, self.name)
        self.layout = layout
        self.table = table_of(layout)

    def close(self) -> None:
        if self.arena is not None:
            self.arena.close()
            self.arena = None
            self.layout = None


@dataclass(frozen=True)
class _Taken:
    """A state ready to send: the message, the arena's descriptor and, when the state
    streams, the copy still to do (each step yields how far the arena is filled)."""

    message: StateReady
    fd: int
    rest: Iterator[int] | None


#: Errors of taking and copying the state: the snapshot is skipped, training goes on.
_COPY_ERRORS = (StateError, OSError, TypeError, ValueError)

#: Largest mean tensor size of a state that streams (in pieces of ``STREAM_UNIT``).
STREAM_MEAN = 64 << 10


def streams(layout: Layout) -> bool:
    """True when a state of this layout is sent ahead of its copy (``state.filled``).

    Only for states of many small tensors: their copy is bound by the work per array,
    and overlapping it with the daemon's digests and writes shortens a snapshot (about
    21 to 15 ms for 20,000 arrays of 1 KiB, docs/PERFORMANCE.md). A copy of big tensors
    is bound by memory bandwidth instead, and the daemon's work beside it would slow it
    down by as much as the overlap saves, in the experiment's own time.
    """
    count = len(layout.tensors)
    return layout.data_size >= 2 * STREAM_UNIT and layout.data_size <= STREAM_MEAN * count


#: Most pieces a streamed state is copied in. Each one's ``filled`` waits in the socket
#: until the daemon's commit catches up with it, and a few hundred fill the socket's
#: buffer, where a send would block the training thread.
MAX_PIECES = 64


def _piece_size(layout: Layout) -> int:
    """What a streamed state is copied in: ``STREAM_UNIT``, or larger pieces for a big
    state, so that there are at most about ``MAX_PIECES`` of them."""
    return max(STREAM_UNIT, -(-layout.data_size // MAX_PIECES))


@dataclass(frozen=True)
class _Announced:
    """A description sent in full: to which session, under which number, and what."""

    session: int
    number: int
    table: TensorTable
    structure: Any
    kinds: str | None


class _Service:
    """The one background thread: accepts the daemon, reads its messages, expires requests."""

    def __init__(self, run: Run, listener: socket.socket, claim: int) -> None:
        self._run = weakref.ref(run)
        self.name = run.name
        self._allowed = run._allowed
        self._socket_path = rendezvous.experiment_socket(run._runtime, run.name)
        self._lock_path = rendezvous.experiment_lock(run._runtime, run.name)
        self._listener = listener
        self._claim = claim
        self._channel: Channel | None = None
        # Which daemon session ``_channel`` is: it changes with every connect and drop,
        # together with the channel, under the lock.
        self._session = 0
        self._session_lock = threading.Lock()
        self._newcomers: list[Channel] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"snapshotd-{run.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    @property
    def session(self) -> int:
        """The current daemon session's number (it changes on every connect and drop)."""
        return self._session

    def send(self, message: Message, fd: int | None = None, *, session: int | None = None) -> bool:
        """Send to the connected daemon; False (and logged) if there is none or it failed.

        With ``session``, send only if that session is still the current one: a state
        that repeats a description must not reach a daemon that never received it.
        """
        with self._session_lock:
            if session is not None and session != self._session:
                return False
            channel = self._channel
        if channel is None:
            return False
        try:
            channel.send(message, fd, timeout=IO_TIMEOUT)
        except (PeerError, ProtocolError) as exc:
            log.warning("%s: lost the daemon while sending %s: %s", self.name, message.TYPE, exc)
            return False
        return True

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if threading.current_thread() is not self._thread:
            self._stopped.wait(timeout=2 * IO_TIMEOUT)
        self._cleanup()

    def _cleanup(self) -> None:
        with contextlib.suppress(OSError):
            if self._socket_path.exists():
                self._socket_path.unlink()
        for closer in (self._listener.close, self._drop):
            with contextlib.suppress(OSError):
                closer()
        for newcomer in self._newcomers:
            newcomer.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            _release_name(self._lock_path, self._claim)

    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, "accept")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                self._turn(selector)
        except Exception:  # a bug here must not kill training; it must be seen
            log.exception("%s: the snapshot service stopped", self.name)
        finally:
            selector.close()
            self._stopped.set()

    def _turn(self, selector: selectors.BaseSelector) -> None:
        run = self._run()
        if run is None:
            self._stopping = True
            return
        deadline = run._expire(time.monotonic())
        del run
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        for key, _events in selector.select(timeout):
            if key.data == "accept":
                self._accept(selector)
            elif key.data == "message":
                self._read(selector)
            elif isinstance(key.data, Channel):
                self._greet(selector, key.data)

    def _accept(self, selector: selectors.BaseSelector) -> None:
        sock, _addr = self._listener.accept()
        sock.setblocking(True)
        try:
            rendezvous.check_peer(sock, self._allowed, self.name)
        except PeerError as exc:
            log.warning("%s: refused a connection: %s", self.name, exc)
            sock.close()
            return
        # A newcomer is not the daemon's session until it says hello: a connection that
        # only probes whether we are alive must not replace the session in use.
        newcomer = Channel(sock, "daemon")
        self._newcomers.append(newcomer)
        selector.register(sock, selectors.EVENT_READ, newcomer)
        while len(self._newcomers) > _MAX_NEWCOMERS:
            self._forget(selector, self._newcomers[0])

    def _greet(self, selector: selectors.BaseSelector, newcomer: Channel) -> None:
        try:
            message, fd = newcomer.receive(IO_TIMEOUT)
            if fd is not None:
                os.close(fd)
            if not isinstance(message, Hello) or message.role != "daemon":
                raise RemoteProtocolError(f"expected a hello from the daemon, got {message.TYPE}")
        except (PeerError, RemoteProtocolError) as exc:
            log.debug("%s: a connection ended before its hello: %s", self.name, exc)
            self._forget(selector, newcomer)
            return
        self._newcomers.remove(newcomer)
        selector.unregister(newcomer.sock)
        if self._channel is not None:  # a restarted daemon replaces the old session
            self._drop(selector)
        self._switch(newcomer)
        selector.register(newcomer.sock, selectors.EVENT_READ, "message")
        self.send(Hello("experiment", self.name, os.getpid()))

    def _forget(self, selector: selectors.BaseSelector, newcomer: Channel) -> None:
        self._newcomers.remove(newcomer)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(newcomer.sock)
        newcomer.close()

    def _read(self, selector: selectors.BaseSelector) -> None:
        channel = self._channel
        assert channel is not None
        try:
            received: tuple[Message, int | None] | None = channel.receive(IO_TIMEOUT)
            while received is not None:
                self._dispatch(*received)
                received = channel.buffered() if self._channel is channel else None
        except (PeerError, RemoteProtocolError) as exc:
            level = logging.INFO if isinstance(exc, PeerError) else logging.WARNING
            log.log(level, "%s: dropped the daemon connection: %s", self.name, exc)
            self._drop(selector)

    def _dispatch(self, message: Message, fd: int | None) -> None:
        run = self._run()
        if run is None or (fd is not None and not isinstance(message, Push)):
            if fd is not None:
                os.close(fd)
            if run is None:
                return
        if isinstance(message, Hello):
            self.send(Hello("experiment", self.name, os.getpid()))
        elif isinstance(message, SnapshotRequest):
            run._on_request(message)
        elif isinstance(message, Done):
            run._on_done(message)
        elif isinstance(message, Push) and fd is not None:
            run._on_push(message, fd)
        else:
            raise RemoteProtocolError(f"unexpected {message.TYPE} message from the daemon")

    def _switch(self, channel: Channel | None) -> Channel | None:
        """Make ``channel`` the session (a new number); return the one it replaces."""
        with self._session_lock:
            previous, self._channel = self._channel, channel
            self._session += 1
        return previous

    def _drop(self, selector: selectors.BaseSelector | None = None) -> None:
        if self._channel is None:
            return
        channel = self._switch(None)
        if channel is None:
            return
        if selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(channel.sock)
        channel.close()
        run = self._run()
        if run is not None:
            run._on_disconnect()

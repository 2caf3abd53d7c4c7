"""The daemon's side of one experiment's socket: ask for state, map it, push state back.

:class:`Experiment` connects to ``<runtime_dir>/experiments/<name>.sock``, checks that the
process behind it runs as an allowed uid (``SO_PEERCRED``), and speaks the protocol with
a deadline on every wait, so a hung or garbage-sending experiment costs the daemon at
most its timeout and never more than its own connection.

A :class:`Capture` is the state an experiment handed over: a read-only mapping of its
shared memory, checked against the descriptor's real size before it is mapped. The daemon
writes the snapshot straight from that mapping (no private copy of the state), then calls
:meth:`Experiment.done` so the experiment may reuse its arena. The connection keeps the
mapping while the experiment keeps handing over the same arena (see ``_Mapped``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from snapshotd import rendezvous
from snapshotd.arena import Arena, layout_of, map_readonly, table_of
from snapshotd.channel import Channel, connect
from snapshotd.errors import PeerError, PeerUnreachable, RemoteProtocolError, SnapshotSkipped
from snapshotd.format import Layout
from snapshotd.protocol import (
    Done,
    Filled,
    Hello,
    Message,
    Push,
    PushDone,
    Skipped,
    SnapshotRequest,
    StateReady,
    TensorTable,
    check_arena,
)
from snapshotd.snapshot import Loaded, Payload
from snapshotd.tree import Flat, check_structure, refers_to_exactly

__all__ = ["Capture", "Experiment", "StagingBudgetExceeded"]

_M = TypeVar("_M", bound=Message)


class StagingBudgetExceeded(PeerError):
    """The state is larger than the daemon may stage at once; the snapshot is skipped."""


class _Mapped:
    """An experiment's arena as this connection mapped it, kept for its next snapshots.

    An experiment hands over the same memfd for as long as its layout lasts, and a
    mapping made afresh for every snapshot pays a page fault per few pages the first
    time it is read (measured: digesting 64 MiB took 10 ms through a fresh mapping and
    3 ms through a kept one; 1 GiB, 126 ms and 41 ms). The mapping is shared and
    read-only: the pages are the experiment's, and the daemon's own (private) memory
    does not grow by keeping it; its RSS does count them, as shared memory.

    The tensors' views of a layout are kept too: cutting 20,000 of them costs 2 ms.

    It is never closed explicitly: the connection and every :class:`Capture` taken
    through it hold it, and it is unmapped when the last of them lets go (a connection
    closed by another thread mid-snapshot must not unmap what a commit is reading).
    """

    def __init__(self, fd: int, identity: tuple[int, int], size: int) -> None:
        self.identity = identity
        self.size = size
        self.map = map_readonly(fd, size)
        self._views: tuple[Layout, list[memoryview]] | None = None

    def tensors(self, layout: Layout) -> list[memoryview]:
        """Each tensor's bytes in layout order: views of the mapping (no copy)."""
        if self._views is None or self._views[0] is not layout:
            whole = memoryview(self.map)[: layout.data_size]
            self._views = (layout, list(map(whole.__getitem__, layout.slices)))
        return self._views[1]


class _Stream:
    """The part of a streamed state still being copied (``state.filled``): how far the
    arena holds the state, moved on by reading ``filled`` messages as they are needed."""

    def __init__(
        self, experiment: Experiment, request: int, filled: int, size: int, deadline: float
    ) -> None:
        self._experiment = experiment
        self._request = request
        self.filled = filled
        self._size = size
        #: When the whole state must be there (``time.monotonic``): the request's
        #: deadline, so a peer that trickles its pieces cannot hold the commit open.
        self._deadline = deadline

    def wait(self, upto: int) -> None:
        """Return once the arena holds the state up to byte ``upto``.

        Raises:
            SnapshotSkipped: the experiment withdrew the state (its copy failed).
            PeerUnreachable: the connection failed, or no word came within the I/O
                timeout or by the request's deadline; the connection is closed.
            RemoteProtocolError: the experiment broke the protocol; the connection is
                closed.
        """
        while self.filled < min(upto, self._size):
            self.filled = self._experiment.next_filled(
                self._request, self.filled, self._size, self._deadline
            )


@dataclass
class Capture:
    """State handed over by an experiment, mapped read-only. Release it when done.

    A streamed state (``_stream``) may still be arriving: :meth:`payload` hands the
    writer a way to wait for each piece, and :meth:`flat` waits for all of it.
    """

    id: int
    step: int | None
    safe_point: bool
    structure: Any
    layout: Layout
    _mapped: _Mapped | None
    _stream: _Stream | None = field(default=None, repr=False)
    _data: np.ndarray[Any, Any] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.layout.data_size

    @contextlib.contextmanager
    def payload(self) -> Iterator[Payload]:
        """The state as one contiguous buffer in file order (the arena), for writing.

        The buffer is a view of the read-only mapping, valid inside the ``with`` only.
        Its ``ready`` raises as ``_Stream.wait`` when a streamed state stops coming.
        """
        assert self._mapped is not None
        tensors = self._mapped.tensors(self.layout)
        ready = None if self._stream is None else self._stream.wait
        with memoryview(self._mapped.map) as view:
            yield Payload.of_arena(self.layout, view, self.structure, tensors, ready)

    def flat(self) -> Flat:
        """The state as named arrays: read-only views of the shared memory (no copy).

        Raises as ``_Stream.wait`` when a streamed state stops coming."""
        if self._stream is not None:
            self._stream.wait(self.layout.data_size)
        if self._data is None:
            assert self._mapped is not None
            self._data = np.frombuffer(
                self._mapped.map, dtype=np.uint8, count=self.layout.data_size
            )
        return Flat(self.layout.views(self._data), self.structure)

    def release(self) -> None:
        """Let go of the state: the experiment may overwrite it from now on. Views from
        :meth:`flat` must be dropped first. The mapping is unmapped once neither the
        connection nor any capture holds it (see ``_Mapped``)."""
        self._data = None
        self._mapped = None


@dataclass(frozen=True)
class _Description:
    """A state's description as received and checked on this connection."""

    number: int
    structure: Any
    table: TensorTable
    layout: Layout


def _late(message: Message, request: int) -> bool:
    """True for a ``filled`` or ``skipped`` about a request before ``request``: late
    words of a streamed state whose commit ended before its stream did."""
    return isinstance(message, Filled | Skipped) and message.id < request


def _check_tree(structure: Any, table: TensorTable) -> None:
    """The structure must be one we write and name exactly the tensors of the table.

    Checked before committing: a file with a bad tree would only be found corrupt later.
    """
    try:
        named = check_structure(structure)
    except ValueError as exc:
        raise RemoteProtocolError(f"the state's structure is malformed: {exc}") from exc
    if not refers_to_exactly(named, [e.name for e in table.entries]):
        raise RemoteProtocolError("the state's structure and its tensors disagree")


class Experiment:
    """The daemon's connection to one registered experiment."""

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        allowed_uids: Iterable[int] | None = None,
        io_timeout: float = 5.0,
        staging_budget: int | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.pid: int | None = None
        self._allowed = frozenset(
            rendezvous.default_allowed_uids() if allowed_uids is None else allowed_uids
        )
        self._io_timeout = io_timeout
        self._budget = staging_budget
        self._channel: Channel | None = None
        self._ids = itertools.count(1)
        self._last_id = 0  # the last request's id
        # The description last received on this connection, checked, with its layout:
        # a state that repeats it reuses all three (and the store its header template).
        self._description: _Description | None = None
        self._mapped: _Mapped | None = None

    @property
    def connected(self) -> bool:
        return self._channel is not None

    def connect(self) -> None:
        """Connect, check the peer's uid and exchange hellos.

        Raises:
            PeerUnreachable: nobody listens (a stale socket) or the handshake timed out.
            PeerRefused: the experiment runs as a uid that is not allowed.
            RemoteProtocolError: the peer does not speak the protocol.
        """
        channel = connect(self.path, self.name, self._io_timeout)
        try:
            peer = rendezvous.check_peer(channel.sock, self._allowed, self.name)
            channel.send(Hello("daemon", self.name, os.getpid()), timeout=self._io_timeout)
            hello = self._expect(channel, Hello, self._io_timeout)
            if hello.role != "experiment" or hello.name != self.name:
                raise RemoteProtocolError(f"expected experiment {self.name!r}, met {hello!r}")
        except BaseException:
            channel.close()
            raise
        self.pid = peer.pid
        self._description = None
        self._channel = channel

    def snapshot(self, timeout: float) -> Capture:
        """Ask for the state; wait up to ``timeout`` for a safe point.

        Raises:
            SnapshotSkipped: the experiment reached no safe point in time (it said so).
            StagingBudgetExceeded: the state is larger than the staging budget.
            PeerUnreachable: the connection failed, or the experiment stayed silent past
                ``timeout`` plus the I/O timeout; the connection is closed.
            RemoteProtocolError: the experiment broke the protocol; the connection is closed.
        """
        channel = self._require()
        request = SnapshotRequest(self._next_id(), timeout)
        deadline = time.monotonic() + timeout + self._io_timeout
        try:
            channel.send(request, timeout=self._io_timeout)
            message, fd = self._answer(channel, request.id, deadline)
        except BaseException:
            self.close()
            raise
        return self._captured(request, message, fd, deadline)

    def _next_id(self) -> int:
        self._last_id = next(self._ids)
        return self._last_id

    @staticmethod
    def _answer(channel: Channel, request: int, deadline: float) -> tuple[Message, int | None]:
        """The next message by ``deadline`` (``time.monotonic``), passing over late
        words about requests before ``request``: a streamed state's ``filled`` or
        ``skipped`` still on their way when its commit ended early (it failed, or the
        state was over the staging budget)."""
        while True:
            message, fd = channel.receive(deadline - time.monotonic())
            if fd is not None or not _late(message, request):
                return message, fd

    def _captured(
        self, request: SnapshotRequest, message: Message, fd: int | None, deadline: float
    ) -> Capture:
        if isinstance(message, Skipped) and message.id == request.id:
            raise SnapshotSkipped(self.name, message.reason)
        if not isinstance(message, StateReady) or message.id != request.id or fd is None:
            if fd is not None:
                os.close(fd)
            self.close()
            raise RemoteProtocolError(
                f"expected state for request {request.id}, got {message!r:.80}"
            )
        return self._map_state(message, fd, deadline)

    def _map_state(self, state: StateReady, fd: int, deadline: float) -> Capture:
        try:
            described = self._described(state)
            size = described.table.size
            check_arena(described.table, os.fstat(fd).st_size)
            if state.filled is not None and state.filled > size:
                raise RemoteProtocolError(f"filled {state.filled} is past the state's {size} bytes")
            if self._budget is not None and size > self._budget:
                raise StagingBudgetExceeded(
                    self.name,
                    f"state of {size} bytes exceeds the staging budget of {self._budget} bytes",
                )
            mapped = self._mapping(fd, size)
        except StagingBudgetExceeded:
            # The state outgrew the budget: its old arena is not coming back.
            self._forget_mapping()
            self.done(state.id, error="refused by the daemon")
            raise
        except BaseException:
            # A peer that lies about its memory is not talked to again.
            self.close()
            raise
        finally:
            os.close(fd)  # a mapping keeps its file open
        stream = None
        if state.filled is not None and state.filled < size:
            stream = _Stream(self, state.id, state.filled, size, deadline)
        return Capture(
            state.id,
            state.step,
            state.safe_point,
            described.structure,
            described.layout,
            mapped,
            stream,
        )

    def next_filled(self, request: int, filled: int, size: int, deadline: float) -> int:
        """Wait for the next ``filled`` of streamed state ``request``, which holds
        ``filled`` of ``size`` bytes so far; return how far it holds the state now.

        Waits at most the I/O timeout, and not past ``deadline`` (``time.monotonic``).
        Raises as ``_Stream.wait``.
        """
        channel = self._channel
        if channel is None:
            raise PeerUnreachable(self.name, "the connection was closed mid-snapshot")
        try:
            message, fd = channel.receive(min(self._io_timeout, deadline - time.monotonic()))
        except PeerUnreachable as exc:
            self.close()
            if time.monotonic() < deadline:
                raise
            raise PeerUnreachable(
                self.name, "the state did not arrive in time (the request's deadline passed)"
            ) from exc
        except BaseException:
            self.close()
            raise
        if fd is None and isinstance(message, Skipped) and message.id == request:
            raise SnapshotSkipped(self.name, f"the experiment withdrew the state: {message.reason}")
        if (
            fd is None
            and isinstance(message, Filled)
            and message.id == request
            and filled < message.upto <= size
        ):
            return message.upto
        if fd is not None:
            os.close(fd)
        self.close()
        raise RemoteProtocolError(
            f"expected filled past {filled} of {size} bytes for state {request}, "
            f"got {message!r:.80}"
        )

    def _mapping(self, fd: int, size: int) -> _Mapped:
        """The mapping of ``fd``'s ``size`` bytes: the kept one if ``fd`` is the same
        memfd (a mapping keeps its memfd alive, so its inode is not reused meanwhile)."""
        info = os.fstat(fd)
        identity = (info.st_dev, info.st_ino)
        kept = self._mapped
        if kept is not None and kept.identity == identity and kept.size == size:
            return kept
        self._forget_mapping()
        self._mapped = _Mapped(fd, identity, size)
        return self._mapped

    def _forget_mapping(self) -> None:
        self._mapped = None  # unmapped once no capture holds it either

    def _described(self, state: StateReady) -> _Description:
        """The description ``state`` carries or repeats, checked; remembered if new.

        Raises:
            RemoteProtocolError: a malformed tree, or a repeat of a description this
                connection never received.
        """
        known = self._description
        if state.table is None:
            if known is None or known.number != state.description:
                raise RemoteProtocolError(
                    f"the state repeats description {state.description}, "
                    "which this connection has not received"
                )
            return known
        _check_tree(state.structure, state.table)
        # The same table (shapes) as before keeps its layout, and with it the header's
        # prepared tensor entries.
        layout = (
            known.layout
            if known is not None and known.table is state.table
            else layout_of(state.table)
        )
        self._description = _Description(state.description, state.structure, state.table, layout)
        return self._description

    def peer_closed(self) -> bool:
        """True if the connected experiment has hung up (checked without blocking).

        Call only while no request is in flight on this connection.
        """
        channel = self._channel
        if channel is None:
            return False
        while True:
            try:
                # Non-blocking for real: with a timeout set, Python would wait for data.
                channel.sock.settimeout(0.0)
                data = channel.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if data == b"":
                return True
            if not self._drop_late(channel):
                return False

    def _drop_late(self, channel: Channel) -> bool:
        """Read the message waiting on an idle connection: True if it was a late word
        of a stream that ended early (read it, and look again: an end may be behind
        it). Anything else breaks the protocol, as nothing was asked: the connection is
        closed, and the next snapshot connects again."""
        try:
            message, fd = channel.receive(self._io_timeout)
        except (PeerError, RemoteProtocolError):
            self.close()
            return False
        if fd is None and _late(message, self._last_id + 1):
            return True
        if fd is not None:
            os.close(fd)
        self.close()
        return False

    def done(self, request: int, version: int | None = None, error: str | None = None) -> None:
        """Tell the experiment its arena is free again (and what became of the snapshot)."""
        if self._channel is None:
            return
        try:
            self._channel.send(Done(request, version, error), timeout=self._io_timeout)
        except PeerError:
            self.close()

    def push(self, loaded: Loaded, timeout: float) -> None:
        """Send a verified snapshot to be restored at the experiment's next safe point.

        Raises:
            SnapshotSkipped: the experiment did not apply it within ``timeout``, or
                refused it (the reason is in the message).
            PeerUnreachable, RemoteProtocolError: the connection failed; it is closed.
        """
        channel = self._require()
        layout = Layout.plan(loaded.arrays)
        arena = Arena(layout.data_size, f"push-{self.name}")
        try:
            arena.fill(layout, loaded.arrays)
            meta = loaded.header.meta
            push = Push(
                self._next_id(), meta.version, meta.step, meta.structure, table_of(layout), timeout
            )
            channel.send(push, arena.fd, timeout=self._io_timeout)
            # The experiment answers at its deadline at the latest; allow for the trip.
            reply = self._expect(channel, PushDone, timeout + self._io_timeout, push.id)
        except BaseException:
            self.close()
            raise
        finally:
            arena.close()
        if reply.error is not None:
            raise SnapshotSkipped(self.name, f"the experiment refused the state: {reply.error}")

    def close(self) -> None:
        self._description = None  # a description lives as long as its connection
        self._forget_mapping()  # and so does a kept mapping
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _require(self) -> Channel:
        if self._channel is None:
            self.connect()
        assert self._channel is not None
        return self._channel

    def _expect(self, channel: Channel, kind: type[_M], timeout: float, request: int = 0) -> _M:
        """The next message, which must be a ``kind`` (late words before ``request``
        passed over, see ``_answer``)."""
        message, fd = self._answer(channel, request, time.monotonic() + timeout)
        if fd is not None:
            os.close(fd)
        if not isinstance(message, kind):
            raise RemoteProtocolError(f"expected {kind.TYPE}, got {message.TYPE}")
        return message

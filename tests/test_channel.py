"""Channels on real Unix sockets: frames, SCM_RIGHTS descriptors, deadlines, hostile peers.

Every test uses a real ``socketpair(AF_UNIX)`` (one uses a path socket) and, where a
descriptor travels, a real memfd whose bytes the receiver reads back. The misbehaving
peer is a raw socket that writes whatever bytes and descriptors the test wants.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from snapshotd import rendezvous
from snapshotd.arena import Arena, layout_of, map_readonly, table_of
from snapshotd.channel import Channel, connect
from snapshotd.errors import LocalProtocolError, PeerUnreachable, RemoteProtocolError
from snapshotd.format import Layout
from snapshotd.protocol import (
    PROTOCOL_VERSION,
    Done,
    Hello,
    Message,
    Push,
    Reply,
    SnapshotRequest,
    StateReady,
    TensorEntry,
    TensorTable,
    check_arena,
    encode,
)
from snapshotd.tree import flatten

HEADER = struct.Struct("<4sHHI")
Pair = tuple[socket.socket, Channel]

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd") or not hasattr(os, "memfd_create"),
    reason="needs Linux (memfd, /proc/self/fd)",
)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(content: bytes, *, sealed: bool = True) -> int:
    """A memfd holding ``content``, sealed against resizing as a real peer's arena is."""
    fd = os.memfd_create("snapshotd-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, content)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def bytes_table(size: int) -> TensorTable:
    if size == 0:
        return TensorTable((), 0)
    return TensorTable((TensorEntry("x", "uint8", (size,), 0, size),), size)


def state(size: int, request: int = 1) -> StateReady:
    return StateReady(request, 10, True, {"a": "x"} if size else None, bytes_table(size))


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A raw peer socket and our channel on the other end."""
    peer, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(ours, "peer")
    yield peer, channel
    channel.close()
    peer.close()


@pytest.fixture
def channels() -> Iterator[tuple[Channel, Channel]]:
    """Two channels talking to each other."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a, b = Channel(left, "right"), Channel(right, "left")
    yield a, b
    a.close()
    b.close()


# -- messages and descriptors ---------------------------------------------------------


def test_message_without_descriptor(channels: tuple[Channel, Channel]) -> None:
    a, b = channels
    a.send(Hello("daemon", "mnist-lr", 1))
    b.send(Hello("experiment", "mnist-lr", 2))
    assert b.receive(1.0) == (Hello("daemon", "mnist-lr", 1), None)
    assert a.receive(1.0) == (Hello("experiment", "mnist-lr", 2), None)


def test_memfd_travels_with_its_message(channels: tuple[Channel, Channel]) -> None:
    a, b = channels
    content = bytes(range(256)) * 40
    fd = memfd(content)
    try:
        a.send(state(len(content), request=5), fd)
    finally:
        os.close(fd)  # the receiver's copy must not depend on ours
    message, received = b.receive(1.0)
    assert received is not None
    try:
        assert message == state(len(content), request=5)
        assert os.fstat(received).st_size == len(content)
        assert os.pread(received, len(content) + 1, 0) == content
    finally:
        os.close(received)


def test_messages_with_and_without_descriptors_interleave(
    channels: tuple[Channel, Channel],
) -> None:
    a, b = channels
    first, second = memfd(b"first"), memfd(b"second!")
    try:
        a.send(Done(1, 1))
        a.send(state(5, request=2), first)
        a.send(Done(2, 2))
        a.send(state(7, request=3), second)
    finally:
        os.close(first)
        os.close(second)
    got: list[tuple[Message, bytes | None]] = []
    for _ in range(4):
        message, fd = b.receive(1.0)
        if fd is None:
            got.append((message, None))
        else:
            got.append((message, os.pread(fd, 64, 0)))
            os.close(fd)
    assert got == [
        (Done(1, 1), None),
        (state(5, request=2), b"first"),
        (Done(2, 2), None),
        (state(7, request=3), b"second!"),
    ]


@pytest.mark.parametrize(
    "arrays",
    [
        {
            "W": np.arange(7840, dtype=np.float32).reshape(784, 10),
            "b": np.linspace(0, 1, 10),
            "mask": np.array([True, False, True]),
            "z": np.array([1 + 2j], dtype=np.complex128),
        },
        {"empty": np.zeros((0, 3), dtype=np.int16), "one": np.int64(7).reshape(())},
        {},  # a state of scalars only: the arena is empty
        {  # runs of one dtype broken by another of the same item size, 0-d and empty
            f"x{i}": np.arange(i % 7, dtype=np.float32 if i % 3 else np.int32).reshape(
                (1, -1) if i % 5 == 0 else -1
            )
            for i in range(300)
        }
        | {"zero-d": np.float32(2.5).reshape(()), "tail": np.ones((2, 2), np.uint8)},
    ],
    ids=["model", "zero-sized", "no-arrays", "interleaved-runs"],
)
def test_an_arena_travels_with_its_table(
    channels: tuple[Channel, Channel], arrays: dict[str, np.ndarray[Any, Any]]
) -> None:
    a, b = channels
    layout = Layout.plan(arrays)
    arena = Arena(layout.data_size, "test")
    try:
        arena.fill(layout, arrays)
        a.send(StateReady(1, 3, True, None, table_of(layout)), arena.fd)
    finally:
        arena.close()
    message, fd = b.receive(1.0)
    assert isinstance(message, StateReady)
    assert message.table is not None
    assert fd is not None
    try:
        check_arena(message.table, os.fstat(fd).st_size)
        mapped = map_readonly(fd, message.table.size)
        data = np.frombuffer(mapped, dtype=np.uint8, count=message.table.size)
        views = layout_of(message.table).views(data)
        assert views.keys() == arrays.keys()
        for name, array in arrays.items():
            np.testing.assert_array_equal(views[name], array)
            assert views[name].dtype == array.dtype
        del views, data
        mapped.close()
    finally:
        os.close(fd)


def test_an_arena_never_converts_an_array_that_does_not_fit_its_layout() -> None:
    layout = Layout.plan({"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)})
    arena = Arena(layout.data_size, "test")
    try:
        with pytest.raises(TypeError):
            arena.fill(layout, {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float64)})
    finally:
        arena.close()


def test_an_empty_memfd_is_a_valid_empty_arena(channels: tuple[Channel, Channel]) -> None:
    """A peer may describe an empty arena with a 0-byte memfd: check_arena accepts it,
    so the receiving side must be able to map it too (not fail with a ValueError)."""
    a, b = channels
    fd = memfd(b"")
    try:
        a.send(state(0), fd)
    finally:
        os.close(fd)
    message, received = b.receive(1.0)
    assert isinstance(message, StateReady)
    assert message.table is not None
    assert received is not None
    try:
        check_arena(message.table, os.fstat(received).st_size)
        map_readonly(received, message.table.size).close()
    finally:
        os.close(received)


def test_an_unsealed_memfd_is_refused_before_it_is_mapped(
    channels: tuple[Channel, Channel],
) -> None:
    """A peer could shrink an unsealed memfd under our mapping and kill us with SIGBUS."""
    a, b = channels
    fd = memfd(b"x" * 16, sealed=False)
    try:
        a.send(state(16), fd)
    finally:
        os.close(fd)
    message, received = b.receive(1.0)
    assert isinstance(message, StateReady)
    assert message.table is not None
    assert received is not None
    try:
        with pytest.raises(RemoteProtocolError, match="sealed"):
            map_readonly(received, message.table.size)
    finally:
        os.close(received)


def test_received_descriptors_are_close_on_exec(channels: tuple[Channel, Channel]) -> None:
    """A descriptor from a peer must not leak into programs we exec (MSG_CMSG_CLOEXEC)."""
    a, b = channels
    fd = memfd(b"x")
    try:
        a.send(state(1), fd)
    finally:
        os.close(fd)
    _message, received = b.receive(1.0)
    assert received is not None
    try:
        assert fcntl.fcntl(received, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(received)


def test_send_checks_that_the_descriptor_matches_the_message(pair: Pair) -> None:
    peer, channel = pair
    fd = memfd(b"x")
    try:
        with pytest.raises((ValueError, LocalProtocolError)):
            channel.send(state(1))
        with pytest.raises((ValueError, LocalProtocolError)):
            channel.send(Done(1), fd)
    finally:
        os.close(fd)
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(1)  # nothing was sent


# -- peers that break the descriptor rules --------------------------------------------


def test_a_message_that_needs_a_descriptor_arriving_without_one(pair: Pair) -> None:
    peer, channel = pair
    peer.sendall(encode(state(8)))
    with pytest.raises(RemoteProtocolError, match="without"):
        channel.receive(1.0)


@pytest.mark.parametrize(
    "message", [Done(1, 2), Hello("experiment", "x", 1), SnapshotRequest(1, 1.0)]
)
def test_an_unexpected_descriptor_is_refused_and_closed(pair: Pair, message: Message) -> None:
    peer, channel = pair
    before = open_fds()
    fd = memfd(b"secret")
    socket.send_fds(peer, [encode(message)], [fd])
    os.close(fd)
    with pytest.raises(RemoteProtocolError, match="unexpected"):
        channel.receive(1.0)
    assert open_fds() == before, "the stray descriptor must be closed at once"


def test_more_descriptors_than_messages_is_refused(pair: Pair) -> None:
    peer, channel = pair
    data = encode(state(1))
    fd = memfd(b"x")
    try:
        for piece in (data[:5], data[5:10], data[10:]):  # one frame, three descriptors
            socket.send_fds(peer, [piece], [fd])
    finally:
        os.close(fd)
    with pytest.raises(RemoteProtocolError, match="descriptors"):
        channel.receive(1.0)


def _stray_fd(peer: socket.socket, fd: int) -> None:
    socket.send_fds(peer, [encode(Done(1))], [fd])


def _three_fds(peer: socket.socket, fd: int) -> None:
    socket.send_fds(peer, [encode(Done(1))], [fd, fd, fd])


def _fd_then_close_mid_frame(peer: socket.socket, fd: int) -> None:
    socket.send_fds(peer, [encode(state(1))[:9]], [fd])
    peer.shutdown(socket.SHUT_WR)


def _fd_with_garbage(peer: socket.socket, fd: int) -> None:
    socket.send_fds(peer, [b"GARBAGE GARBAGE GARBAGE"], [fd])


def _fd_with_oversized_header(peer: socket.socket, fd: int) -> None:
    socket.send_fds(peer, [HEADER.pack(b"SNPD", PROTOCOL_VERSION, 0, 0xFFFFFFFF)], [fd])


def _two_fds_for_one_state(peer: socket.socket, fd: int) -> None:
    socket.send_fds(peer, [encode(state(1)) + encode(Done(1))], [fd, fd])


def _fds_for_many_messages(peer: socket.socket, fd: int) -> None:
    for _ in range(3):
        socket.send_fds(peer, [encode(state(1))[:5]], [fd])
    peer.sendall(b"\0" * 64)


MISBEHAVIOURS: list[Callable[[socket.socket, int], None]] = [
    _stray_fd,
    _three_fds,
    _fd_then_close_mid_frame,
    _fd_with_garbage,
    _fd_with_oversized_header,
    _two_fds_for_one_state,
    _fds_for_many_messages,
]


def test_misbehaving_peers_leak_no_descriptors() -> None:
    fd = memfd(b"x")
    try:
        before = open_fds()
        for _ in range(200):
            for misbehave in MISBEHAVIOURS:
                peer, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                channel = Channel(ours, "peer")
                try:
                    misbehave(peer, fd)
                    with contextlib.suppress(RemoteProtocolError, PeerUnreachable):
                        while True:
                            _message, received = channel.receive(0.05)
                            if received is not None:
                                os.close(received)  # a claimed descriptor is ours to close
                finally:
                    channel.close()
                    peer.close()
        assert open_fds() == before
    finally:
        os.close(fd)


# -- deadlines and closed peers -------------------------------------------------------


@pytest.mark.parametrize("sent", [0, 7, 12, 20], ids=lambda n: f"{n}-bytes")
def test_a_peer_that_stalls_mid_frame_is_unreachable_after_the_timeout(
    pair: Pair, sent: int
) -> None:
    peer, channel = pair
    data = encode(Reply(1, True, "x" * 100))
    if sent:
        peer.sendall(data[:sent])
    start = time.monotonic()
    with pytest.raises(PeerUnreachable) as caught:
        channel.receive(0.3)
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 1.3
    # Callers tell a silent peer from a gone one by this cause (control.call does).
    assert isinstance(caught.value.__cause__, TimeoutError)
    peer.sendall(data[sent:])  # a late completion is still read whole afterwards
    assert channel.receive(1.0) == (Reply(1, True, "x" * 100), None)


def test_the_timeout_bounds_the_whole_message_not_each_read(pair: Pair) -> None:
    peer, channel = pair
    data = encode(Reply(1, True, "x" * 100))
    stop = threading.Event()

    def trickle() -> None:
        for byte in data[:-1]:
            if stop.wait(0.05):
                return
            peer.sendall(bytes([byte]))

    writer = threading.Thread(target=trickle)
    writer.start()
    try:
        start = time.monotonic()
        with pytest.raises(PeerUnreachable) as caught:
            channel.receive(0.5)
        assert time.monotonic() - start < 1.5
        assert isinstance(caught.value.__cause__, TimeoutError)
    finally:
        stop.set()
        writer.join()


def test_a_peer_that_closes_is_unreachable(pair: Pair) -> None:
    peer, channel = pair
    peer.sendall(encode(Done(1)) + encode(Done(2)))
    peer.close()
    assert channel.receive(1.0) == (Done(1), None)
    assert channel.receive(1.0) == (Done(2), None)
    start = time.monotonic()
    with pytest.raises(PeerUnreachable, match="closed") as caught:
        channel.receive(5.0)
    assert time.monotonic() - start < 1.0
    assert not isinstance(caught.value.__cause__, TimeoutError)


def test_a_peer_that_closes_mid_frame_breaks_the_protocol(pair: Pair) -> None:
    peer, channel = pair
    peer.sendall(encode(Done(1))[:15])
    peer.close()
    with pytest.raises(RemoteProtocolError, match="closed"):
        channel.receive(5.0)


def test_an_oversized_header_is_refused_without_waiting_for_the_body(pair: Pair) -> None:
    peer, channel = pair
    peer.sendall(HEADER.pack(b"SNPD", PROTOCOL_VERSION, 0, 0xFFFFFFFF))
    start = time.monotonic()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        channel.receive(5.0)
    assert time.monotonic() - start < 1.0


def test_a_protocol_error_is_final(pair: Pair) -> None:
    peer, channel = pair
    peer.sendall(b"NOPE" + bytes(8) + encode(Done(1)))
    with pytest.raises(RemoteProtocolError, match="magic"):
        channel.receive(1.0)
    with pytest.raises(RemoteProtocolError, match="magic"):
        channel.receive(1.0)


def test_sending_to_a_peer_that_does_not_read_times_out(pair: Pair) -> None:
    _peer, channel = pair
    big = Reply(1, True, "x" * (8 << 20))  # far more than a socket buffer holds
    start = time.monotonic()
    with pytest.raises(PeerUnreachable):
        channel.send(big, timeout=0.3)
    assert time.monotonic() - start < 1.3


def test_sending_to_a_closed_peer_is_unreachable(pair: Pair) -> None:
    peer, channel = pair
    peer.close()
    with pytest.raises(PeerUnreachable):
        channel.send(Done(1), timeout=1.0)


# -- several messages per read --------------------------------------------------------


def test_buffered_returns_a_second_message_from_the_same_read(pair: Pair) -> None:
    peer, channel = pair
    assert channel.buffered() is None
    peer.sendall(encode(Done(1)) + encode(Done(2)) + encode(Done(3))[:5])
    assert channel.receive(1.0) == (Done(1), None)
    assert channel.buffered() == (Done(2), None)
    assert channel.buffered() is None  # the third is incomplete
    peer.sendall(encode(Done(3))[5:])
    assert channel.receive(1.0) == (Done(3), None)


def test_a_descriptor_for_a_later_message_in_the_same_read_waits_for_it(pair: Pair) -> None:
    peer, channel = pair
    peer.sendall(encode(Done(1)))
    fd = memfd(b"later")
    socket.send_fds(peer, [encode(state(5))], [fd])
    os.close(fd)
    assert channel.receive(1.0) == (Done(1), None)
    second = channel.buffered() or channel.receive(1.0)
    message, received = second
    assert received is not None
    try:
        assert message == state(5)
        assert os.pread(received, 16, 0) == b"later"
    finally:
        os.close(received)


# -- a real path socket ----------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path (AF_UNIX paths hold at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="snpd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_conversation_over_a_path_socket(short_dir: Path) -> None:
    path = short_dir / "exp.sock"
    listener = rendezvous.bind_private(path)
    try:
        daemon = connect(path, "exp", timeout=1.0)
        accepted, _addr = listener.accept()
        experiment = Channel(accepted, "daemon")
        try:
            daemon.send(Hello("daemon", "exp", os.getpid()))
            assert experiment.receive(1.0) == (Hello("daemon", "exp", os.getpid()), None)
            experiment.send(Hello("experiment", "exp", os.getpid()))
            assert daemon.receive(1.0) == (Hello("experiment", "exp", os.getpid()), None)
            fd = memfd(b"pushed state")
            try:
                daemon.send(Push(2, 9, None, {"a": "x"}, bytes_table(12), 5.0), fd)
            finally:
                os.close(fd)
            message, received = experiment.receive(1.0)
            assert received is not None
            try:
                assert isinstance(message, Push)
                assert message.version == 9
                assert os.pread(received, 64, 0) == b"pushed state"
            finally:
                os.close(received)
        finally:
            daemon.close()
            experiment.close()
    finally:
        listener.close()


def test_connect_to_nothing_is_unreachable(short_dir: Path) -> None:
    with pytest.raises(PeerUnreachable):
        connect(short_dir / "missing.sock", "exp", timeout=1.0)
    stale = short_dir / "stale.sock"
    rendezvous.bind_private(stale).close()  # the file stays, nobody listens: ECONNREFUSED
    assert stale.exists()
    with pytest.raises(PeerUnreachable):
        connect(stale, "exp", timeout=1.0)


def test_an_arena_filled_in_order_holds_what_flatten_would_have_copied() -> None:
    # Leaves as a user holds them (transposed, reversed, strided) are copied in C order,
    # exactly as flatten's contiguous copies would be.
    rng = np.random.default_rng(5)
    held: dict[str, np.ndarray[Any, Any]] = {
        "t": rng.standard_normal((3, 4)).T,
        "r": np.arange(6, dtype=np.int16)[::-1],
        "s": np.arange(12, dtype=np.float32)[::3],
        "c": np.arange(4, dtype=np.uint8),
    }
    flat = flatten(held)
    layout = Layout.plan(flat.arrays)
    by_flatten, in_order = Arena(layout.data_size, "a"), Arena(layout.data_size, "b")
    try:
        by_flatten.fill(layout, flat.arrays)
        in_order.fill_in_order(layout, layout.in_order(list(held.values())))
        assert bytes(in_order._map) == bytes(by_flatten._map)
    finally:
        by_flatten.close()
        in_order.close()

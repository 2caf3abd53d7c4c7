"""A connected Unix stream socket that speaks the protocol: messages and descriptors.

:class:`Channel` is the one place where protocol frames meet a real socket, for every
kind of peer (experiment, daemon, command line). It owns the socket, its deadlines and
any descriptor received with ``SCM_RIGHTS`` until a message claims it; an unclaimed
descriptor is closed, so a misbehaving peer cannot make us leak descriptors. Foreign
errors (``OSError``, timeouts) become :class:`PeerUnreachable` here, once.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
import time
from collections import deque

from snapshotd.errors import PeerUnreachable, RemoteProtocolError
from snapshotd.protocol import Decoder, Message, encode

__all__ = ["Channel", "connect"]

_RECV_BYTES = 1 << 16
_MAX_PENDING_FDS = 2
_INT = array.array("i")


def _recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """``recvmsg`` with descriptors marked close-on-exec as they arrive.

    ``socket.recv_fds`` cannot do this (it ignores its flags on Python 3.11), and a
    descriptor without ``FD_CLOEXEC`` would leak into every program we start.
    """
    space = socket.CMSG_SPACE(_MAX_PENDING_FDS * _INT.itemsize)
    data, ancillary, flags, _addr = sock.recvmsg(_RECV_BYTES, space, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _INT.itemsize
            fds.extend(array.array("i", payload[:usable]))
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise RemoteProtocolError("the peer sent more descriptors than a message may carry")
    return data, fds


def connect(path: os.PathLike[str] | str, name: str, timeout: float) -> Channel:
    """Connect to the path socket ``path``.

    Raises:
        PeerUnreachable: nobody listens there (``ECONNREFUSED`` means a stale socket).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise PeerUnreachable(name, f"cannot connect to {path}: {exc}") from exc
    return Channel(sock, name)


class Channel:
    """Send and receive whole messages (with an optional descriptor) on one socket."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self._decoder = Decoder()
        self._fds: deque[int] = deque()
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Message, fd: int | None = None, timeout: float = 10.0) -> None:
        """Send one message; ``fd`` must be given exactly when the message carries one.

        Raises:
            PeerUnreachable: the peer is gone or does not read within ``timeout``.
        """
        if (fd is not None) != message.CARRIES_FD:
            raise ValueError(f"{message.TYPE} {'needs' if message.CARRIES_FD else 'takes no'} fd")
        frame = encode(message)
        with self._send_lock:
            try:
                self.sock.settimeout(timeout)
                sent = 0 if fd is None else socket.send_fds(self.sock, [frame], [fd])
                self.sock.sendall(frame[sent:])
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise PeerUnreachable(self.name, "the process has gone away") from exc
            except OSError as exc:
                raise PeerUnreachable(self.name, f"sending {message.TYPE} failed: {exc}") from exc

    def receive(self, timeout: float | None) -> tuple[Message, int | None]:
        """The next message and its descriptor (``None`` unless the message carries one).

        The caller owns a returned descriptor and must close it.

        Raises:
            PeerUnreachable: the peer closed, or nothing complete came within ``timeout``.
            RemoteProtocolError: the peer sent something that breaks the protocol.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            message = self._decoder.next()
            if isinstance(message, Message):
                return message, self._claim_fd(message)
            if self._decoder.eof:
                raise PeerUnreachable(self.name, "the peer closed the connection")
            self._fill(deadline)

    def buffered(self) -> tuple[Message, int | None] | None:
        """The next message if it has already arrived whole, without reading the socket.

        A reader driven by ``select`` must drain this after each :meth:`receive`: one
        read may bring several messages, and ``select`` will not wake for them again.
        """
        message = self._decoder.next()
        if isinstance(message, Message):
            return message, self._claim_fd(message)
        return None

    def _claim_fd(self, message: Message) -> int | None:
        if message.CARRIES_FD:
            if not self._fds:
                raise RemoteProtocolError(f"{message.TYPE} arrived without its descriptor")
            return self._fds.popleft()
        if self._fds and not self._decoder.pending:
            self._close_fds()
            raise RemoteProtocolError(f"{message.TYPE} arrived with an unexpected descriptor")
        return None

    def _fill(self, deadline: float | None) -> None:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            # A TimeoutError as the cause, like a socket's own timeout: callers tell a
            # silent peer from a gone one by the cause, never by the words.
            late = TimeoutError(f"the deadline passed with {self._decoder.pending} bytes in")
            raise PeerUnreachable(self.name, "timed out waiting for a message") from late
        try:
            self.sock.settimeout(remaining)
            data, fds = _recv_with_fds(self.sock)
        except OSError as exc:
            raise PeerUnreachable(self.name, f"receiving failed: {exc}") from exc
        self._fds.extend(fds)
        if len(self._fds) > _MAX_PENDING_FDS:
            self._close_fds()
            raise RemoteProtocolError("peer sent more descriptors than messages")
        self._decoder.feed(data)

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())

    def close(self) -> None:
        self._close_fds()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

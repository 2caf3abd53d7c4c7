"""The control socket: how the command line (and resuming experiments) talk to the daemon.

The daemon listens on ``<runtime_dir>/control.sock`` (0600, in the 0700 runtime
directory, peer uid checked with ``SO_PEERCRED``). Each connection is one conversation:
a ``hello``, then ``command`` messages, each answered by a ``reply`` with the same id.
A connection gets its own thread with a deadline on every read, so a stalled or
malicious client cannot hold up the daemon or the other clients.

:class:`ControlServer` owns the listening socket and hands commands to a handler
function; :func:`call` is the client side used by ``snapshotd status`` and friends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from snapshotd import exitcode, rendezvous
from snapshotd.channel import Channel, connect
from snapshotd.errors import (
    DaemonError,
    PeerError,
    PeerUnreachable,
    ProtocolError,
    RemoteProtocolError,
    SnapshotdError,
)
from snapshotd.protocol import Command, Hello, Reply

__all__ = ["ControlServer", "call"]

log = logging.getLogger("snapshotd.control")

#: What a handler returns for a command: the result (JSON-able).
Handler = Callable[[str, dict[str, Any]], Any]
_MAX_CLIENTS = 32
#: A control client that says nothing for this long is disconnected.
_IDLE_TIMEOUT = 60.0


class ControlServer:
    """Serves commands on the control socket until :meth:`close`."""

    def __init__(
        self, path: Path, handler: Handler, *, allowed_uids: Iterable[int], io_timeout: float
    ) -> None:
        self.path = path
        self._handler = handler
        self._allowed = frozenset(allowed_uids)
        self._io_timeout = io_timeout
        self._clients = threading.BoundedSemaphore(_MAX_CLIENTS)
        _remove_stale(path)
        self._listener = rendezvous.bind_private(path)
        self._inode = path.stat().st_ino
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        with contextlib.suppress(OSError):
            # Only our own socket: a newer daemon may have replaced a stale one of ours.
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
        self._thread.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                sock, _addr = self._listener.accept()
            except OSError:
                if self._closing:
                    return
                continue
            if not self._clients.acquire(blocking=False):
                log.warning("control: too many clients; refusing one")
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        channel = Channel(sock, "control client")
        try:
            rendezvous.check_peer(sock, self._allowed, "control client")
            self._conversation(channel)
        except PeerUnreachable:
            pass  # the client went away: normal end of a conversation
        except (PeerError, ProtocolError) as exc:
            log.warning("control: dropped a client: %s", exc)
        finally:
            channel.close()
            self._clients.release()

    def _conversation(self, channel: Channel) -> None:
        while True:
            message, fd = channel.receive(_IDLE_TIMEOUT)
            if fd is not None:
                os.close(fd)  # nothing on the control socket carries shared memory
            if isinstance(message, Hello):
                channel.send(Hello("daemon", "control", os.getpid()), timeout=self._io_timeout)
            elif isinstance(message, Command):
                channel.send(self._answer(message), timeout=self._io_timeout)
            else:
                raise RemoteProtocolError(f"unexpected {message.TYPE} on the control socket")

    def _answer(self, command: Command) -> Reply:
        try:
            result = self._handler(command.verb, dict(command.args))
        except SnapshotdError as exc:
            return Reply(command.id, False, error=str(exc), code=exitcode.of(exc))
        except Exception as exc:  # a bug in a handler must not take the daemon down
            log.exception("control: %s failed", command.verb)
            return Reply(command.id, False, error=f"internal error: {exc!r}", code=1)
        return Reply(command.id, True, result=result)


def _remove_stale(path: Path) -> None:
    """Remove a control socket left by a daemon that died; refuse if one is alive."""
    if not path.exists():
        return
    try:
        probe = connect(path, "daemon", timeout=1.0)
    except PeerUnreachable:
        path.unlink()
        return
    try:
        pid = rendezvous.peer_of(probe.sock).pid
    finally:
        probe.close()
    raise DaemonError(
        f"another snapshotd daemon (pid {pid}) serves the runtime directory {path.parent}: "
        f"stop it (kill -TERM {pid}), or give this one its own runtime_dir",
        code=exitcode.STORE,
    )


def _reply(channel: Channel, timeout: float) -> Reply:
    """The daemon's reply to command 1 (other messages are skipped)."""
    while True:
        message, fd = channel.receive(timeout)
        if fd is not None:
            os.close(fd)
        if isinstance(message, Reply) and message.id == 1:
            return message


@contextlib.contextmanager
def _answering(verb: str, timeout: float) -> Iterator[None]:
    """Translate a failure after the daemon accepted the connection. Something listens,
    so it is not "no daemon": no answer in time (the command may still be at work), or
    a hang-up (the daemon refused this client, or stopped)."""
    try:
        yield
    except PeerUnreachable as exc:
        if isinstance(exc.__cause__, TimeoutError):  # a socket's timeout, or our deadline
            why = f"gave no answer to the {verb} command in {timeout:g} s; it may still be at it"
        else:
            why = (
                f"hung up without answering the {verb} command ({exc}): it refuses a uid "
                "not in daemon.allowed_uids and clients beyond its limit, or it stopped"
            )
        raise DaemonError(
            f"the daemon {why}; see snapshotd status and the daemon's log",
            code=exitcode.EXPERIMENT,
        ) from exc


def call(runtime: Path, verb: str, args: dict[str, Any] | None = None, *, timeout: float) -> Any:
    """Send one command to the daemon and return its result.

    Raises:
        PeerUnreachable: no daemon is running on ``runtime`` (nothing accepts there).
        DaemonError: the daemon answered with an error (``.code`` is the exit code), or
            accepted the connection and then hung up or gave no answer within
            ``timeout`` seconds (:data:`exitcode.EXPERIMENT`).
    """
    channel = connect(rendezvous.control_socket(runtime), "daemon", timeout=min(timeout, 5.0))
    try:
        with _answering(verb, timeout):
            channel.send(Hello("cli", "control", os.getpid()), timeout=5.0)
            channel.send(Command(1, verb, args or {}), timeout=5.0)
            message = _reply(channel, timeout)
    finally:
        channel.close()
    if not message.ok:
        raise DaemonError(message.error or "the daemon refused the command", message.code or 1)
    return message.result

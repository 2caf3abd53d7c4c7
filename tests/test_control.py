"""The control socket's server (``snapshotd.control``) on real Unix sockets, in process:
who it answers, and that clients which say nothing cannot lock the others out."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapshotd import control, exitcode, rendezvous
from snapshotd.errors import DaemonError, PeerUnreachable


class Recorder:
    """A handler that answers ``status`` and remembers every command it was given."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, verb: str, args: dict[str, Any]) -> Any:
        self.calls.append(verb)
        return {"pid": os.getpid()}


@pytest.fixture
def handler() -> Recorder:
    return Recorder()


def serve(runtime: Path, handler: Recorder, uids: set[int]) -> control.ControlServer:
    server = control.ControlServer(
        rendezvous.control_socket(runtime), handler, allowed_uids=uids, io_timeout=2.0
    )
    server.start()
    return server


@pytest.fixture
def open_server(runtime: Path, handler: Recorder) -> Iterator[control.ControlServer]:
    server = serve(runtime, handler, {os.getuid()})
    yield server
    server.close()


def test_a_client_of_a_uid_not_allowed_is_dropped_before_any_command_runs(
    runtime: Path, handler: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # The control socket can push a snapshot into a running experiment (restore): the
    # peer's uid, from SO_PEERCRED, must be checked before anything it says is read.
    stranger = 4242 if os.getuid() != 4242 else 4243
    server = serve(runtime, handler, {stranger})
    try:
        refused = pytest.raises(DaemonError, match="hung up without answering the status")
        with caplog.at_level(logging.WARNING, "snapshotd.control"), refused as caught:
            control.call(runtime, "status", timeout=5.0)
        assert caught.value.code == exitcode.EXPERIMENT  # not 5: a daemon is running
        assert handler.calls == []
        assert any(
            f"uid {os.getuid()}" in r.getMessage() and "dropped a client" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
    finally:
        server.close()


def test_an_allowed_client_is_answered(open_server: control.ControlServer, runtime: Path) -> None:
    assert control.call(runtime, "status", timeout=5.0) == {"pid": os.getpid()}


def test_silent_clients_are_hung_up_on_so_they_cannot_hold_every_slot(
    runtime: Path, handler: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "_IDLE_TIMEOUT", 0.5)
    server = serve(runtime, handler, {os.getuid()})
    silent = []
    try:
        for _ in range(control._MAX_CLIENTS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(os.fspath(rendezvous.control_socket(runtime)))
            silent.append(sock)
        time.sleep(0.2)
        with pytest.raises((PeerUnreachable, DaemonError)):
            control.call(runtime, "status", timeout=1.0)  # every slot is taken now
        time.sleep(1.0)  # past the idle timeout: the silent ones were hung up on
        assert control.call(runtime, "status", timeout=5.0) == {"pid": os.getpid()}
        for sock in silent:
            sock.settimeout(1.0)
            assert sock.recv(1) == b"", "a silent client was not hung up on"
    finally:
        for sock in silent:
            sock.close()
        server.close()

"""sd_notify: the Notifier on its own, and the daemon speaking to a socket we bind.

DESIGN §7: ``READY=1`` only after the config is validated, the store locked, the sockets
bound and the first scan done; ``STATUS=``; ``WATCHDOG=1`` from the scheduler's heartbeat
(every third of ``WATCHDOG_USEC``); ``RELOADING=1`` then ``READY=1`` on SIGHUP;
``STOPPING=1`` on SIGTERM.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from snapshotd.sdnotify import Notifier
from tests.daemon_harness import Sandbox, short_dir


@contextlib.contextmanager
def datagram_socket(address: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        sock.settimeout(5.0)
        yield sock
    finally:
        sock.close()


# -- the Notifier -----------------------------------------------------------------------


def test_notify_sends_one_datagram_to_an_abstract_address() -> None:
    name = f"sdtest-{os.getpid()}-{secrets.token_hex(4)}"
    with datagram_socket("\0" + name) as receiver:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        assert notifier.notify(READY=1, STATUS="2 experiment(s)") is True
        data = receiver.recv(4096)
    assert data == b"READY=1\nSTATUS=2 experiment(s)"


def test_notify_sends_to_a_path_socket() -> None:
    folder = short_dir()
    try:
        path = folder / "notify"
        with datagram_socket(os.fspath(path)) as receiver:
            assert Notifier({"NOTIFY_SOCKET": os.fspath(path)}).notify(WATCHDOG=1) is True
            assert receiver.recv(4096) == b"WATCHDOG=1"
    finally:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()


def test_notify_without_a_socket_does_nothing() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.notify(READY=1) is False
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize(
    "address",
    ["/nonexistent-snapshotd-dir/notify", f"@sdtest-nobody-{secrets.token_hex(6)}"],
    ids=["path", "abstract"],
)
def test_notify_to_a_dead_socket_returns_false_and_never_raises(address: str) -> None:
    assert Notifier({"NOTIFY_SOCKET": address}).notify(READY=1) is False


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "3000000"}, 3.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "three"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_follows_systemd_variables(
    environ: dict[str, str], interval: float | None
) -> None:
    assert Notifier(environ).watchdog_interval == interval


# -- the daemon under a fake systemd ------------------------------------------------------


def test_the_daemon_speaks_sd_notify() -> None:
    with Sandbox() as box:
        box.write_config()
        early = box.start_experiment("early")  # registered before the daemon starts
        systemd = box.fake_systemd()
        env = {
            **systemd.env,
            "WATCHDOG_USEC": "3000000",
            "JOURNAL_STREAM": "8:12345",  # as under systemd: journald adds the time
        }
        daemon = box.start_daemon(env=env, wait=False)

        ready_index, ready = systemd.wait("READY", timeout=20)
        assert ready.control_existed, "READY=1 before the control socket was bound"
        # The first scan happened before READY=1: it already counts the early experiment.
        assert ready.fields.get("STATUS", "").startswith("1 experiment(s)"), ready.fields
        daemon.wait_ready(5)

        # WATCHDOG=1 every WATCHDOG_USEC / 3 = 1 s, each with a STATUS line.
        beats = []
        index = ready_index
        for _ in range(3):
            index, beat = systemd.wait("WATCHDOG", timeout=3, after=index + 1)
            beats.append(beat.at)
            assert "experiment(s)" in beat.fields.get("STATUS", ""), beat.fields
        gaps = [b - a for a, b in itertools.pairwise(beats)]
        assert all(0.6 <= gap <= 1.35 for gap in gaps), f"heartbeats {gaps}s apart"

        daemon.send(signal.SIGHUP)
        index, reloading = systemd.wait("RELOADING", timeout=5, after=index + 1)
        stamp = int(reloading.fields["MONOTONIC_USEC"])
        assert abs(stamp - time.monotonic_ns() // 1000) < 10_000_000
        systemd.wait("READY", timeout=5, after=index + 1)

        mark = len(systemd.received())
        assert daemon.stop(signal.SIGTERM) == 0
        systemd.wait("STOPPING", timeout=1, after=mark)
        # Under systemd the log lines carry no time (journald adds it), still one per event.
        for line in daemon.log:
            assert re.match(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S", line), line
        assert early.finish() == 0


def test_a_failed_reload_stays_in_the_status_line_until_one_succeeds() -> None:
    # systemctl status shows the last STATUS=: a heartbeat must not wipe out the news
    # that the daemon runs on an old config because the file on disk is invalid.
    with Sandbox() as box:
        real = box.write_config(box.root / "real.yaml")
        link = box.root / "etc" / "snapshotd.yaml"  # unwatched: only SIGHUP reloads it
        link.parent.mkdir()
        link.symlink_to(real)
        systemd = box.fake_systemd()
        daemon = box.start_daemon(config=link, env={**systemd.env, "WATCHDOG_USEC": "900000"})
        real.write_text(real.read_text().replace("every: 1s", "every: soon"))
        daemon.send(signal.SIGHUP)
        index, ready = systemd.wait("READY", timeout=5, after=len(systemd.received()))
        assert "reload failed" in ready.fields["STATUS"], ready.fields
        for _ in range(2):
            index, beat = systemd.wait("WATCHDOG", timeout=3, after=index + 1)
            assert "reload failed" in beat.fields["STATUS"], beat.fields
            assert "schedule.every" in beat.fields["STATUS"], beat.fields
        box.write_config(real)
        daemon.send(signal.SIGHUP)
        index, ready = systemd.wait("READY", timeout=5, after=index + 1)
        index, beat = systemd.wait("WATCHDOG", timeout=3, after=index + 1)
        assert "reload failed" not in ready.fields["STATUS"] + beat.fields["STATUS"]
        assert daemon.stop() == 0


def test_no_ready_when_the_daemon_cannot_start() -> None:
    with Sandbox() as box:
        box.write_config()
        first = box.start_daemon()
        systemd = box.fake_systemd()
        second = box.start_daemon(env=systemd.env, wait=False)  # the store is locked
        assert second.wait(15) != 0
        assert not [m for m in systemd.received() if "READY" in m.fields]
        assert first.stop() == 0


def test_no_watchdog_pings_for_another_process() -> None:
    # WATCHDOG_PID names the process systemd watches; a daemon that is not it must not
    # ping at WATCHDOG_USEC's rate (it may still send its slow heartbeat).
    with Sandbox() as box:
        box.write_config()
        systemd = box.fake_systemd()
        env = {**systemd.env, "WATCHDOG_USEC": "300000", "WATCHDOG_PID": "1"}
        daemon = box.start_daemon(env=env, wait=False)
        index, _ready = systemd.wait("READY", timeout=20)
        time.sleep(1.5)
        pings = [m for m in systemd.received()[index:] if "WATCHDOG" in m.fields]
        assert len(pings) <= 1, f"{len(pings)} pings in 1.5s"
        assert daemon.stop() == 0

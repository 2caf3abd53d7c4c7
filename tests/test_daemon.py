"""The daemon as a process: discovery, schedule, retention, signals, reload and its log.

Every test runs ``snapshotd start`` as a real child process on a short runtime directory,
with real experiments (``tests/e2e_experiment.py``) registering over real Unix sockets,
and talks to it the way the command line does (the control socket) or with signals.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest

from snapshotd import config as configuration
from snapshotd import control, exitcode, rendezvous
from snapshotd.daemon import Daemon, _Tracked
from snapshotd.errors import DaemonError
from snapshotd.transport import Experiment
from tests.daemon_harness import (
    LOG_LINE,
    DaemonProcess,
    Sandbox,
    clean_env,
    snapshotd_command,
    wait_until,
)


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        sandbox.write_config()
        yield sandbox


def assert_log_is_one_line_per_event(daemon: DaemonProcess) -> None:
    """Every stderr line is ``TIME LEVEL LOGGER: MESSAGE``: no tracebacks, no stray output."""
    lines = daemon.log
    assert lines, "the daemon logged nothing"
    bad = [line for line in lines if not LOG_LINE.match(line)]
    assert not bad, f"lines that are not one log event each: {bad[:5]}"


def schedule_of(daemon: DaemonProcess, name: str) -> str | None:
    entry = daemon.experiment(name)
    return None if entry is None else str(entry["schedule"])


def make_stale_socket(path: Path) -> None:
    """A socket file nobody listens on: what a SIGKILLed process leaves behind."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    sock.close()


def make_stale_registration(runtime: Path, name: str) -> None:
    """The lock file (unlocked) and the dead socket of an experiment that was SIGKILLed."""
    rendezvous.experiment_lock(runtime, name).write_text("12345\n")
    make_stale_socket(rendezvous.experiment_socket(runtime, name))


# -- discovery --------------------------------------------------------------------------


def test_discovers_a_registered_experiment_within_a_second(box: Sandbox) -> None:
    # A rescan only every 30 s: only the file system events can be this quick.
    box.write_config(daemon={"timeout": "2s", "rescan": "30s"})
    daemon = box.start_daemon()
    delays = []
    for name in ("first", "second"):
        exp = box.start_experiment(name, wait=False)
        exp.wait_ready()
        registered = time.monotonic()
        wait_until(partial(daemon.experiment, name), 3, f"the daemon to track {name}")
        delays.append(time.monotonic() - registered)
        assert exp.alive
    assert max(delays) <= 1.0, f"discovery took {delays} s"
    daemon.wait_log(r"INFO snapshotd\.daemon: second: discovered; every 1s")


def test_status_names_a_discovered_experiments_pid_before_its_first_snapshot(
    box: Sandbox,
) -> None:
    box.write_config(schedule={"every": "1h"})
    daemon = box.start_daemon()
    exp = box.start_experiment("quiet")

    wait_until(partial(daemon.experiment, "quiet"), 3, "the daemon to track quiet")

    status = daemon.experiment("quiet")
    assert status is not None
    assert status["pid"] == exp.pid
    assert status["last_version"] is None, "no snapshot was due yet"


def test_a_closed_experiment_is_dropped(box: Sandbox) -> None:
    daemon = box.start_daemon()
    exp = box.start_experiment("exp")
    wait_until(lambda: daemon.experiment("exp"), 3, "the daemon to track exp")
    assert exp.finish() == 0
    assert not box.experiment_socket("exp").exists()
    wait_until(lambda: daemon.experiment("exp") is None, 3, "the daemon to drop exp")
    daemon.wait_log(r"exp: no longer tracked")
    assert daemon.alive


def test_stale_sockets_are_dropped_and_never_crash_the_daemon(box: Sandbox) -> None:
    folder = rendezvous.experiments_dir(box.runtime)
    folder.mkdir(mode=0o700, parents=True)
    box.runtime.chmod(0o700)
    make_stale_registration(box.runtime, "ghost")  # left by a crash before the daemon started
    make_stale_socket(folder / "orphan.sock")  # a socket without its lock file
    (folder / "plainfile.lock").write_text("1\n")
    (folder / "plainfile.sock").write_text("not a socket")
    (folder / "bad name.lock").write_text("1\n")
    make_stale_socket(folder / "bad name.sock")  # not a valid experiment name
    daemon = box.start_daemon()
    exp = box.start_experiment("victim", "--print-every", "10")
    wait_until(lambda: daemon.experiment("victim"), 3, "the daemon to track victim")
    wait_until(lambda: box.versions("victim"), 5, "a first snapshot of victim")
    make_stale_registration(box.runtime, "late-ghost")  # appears while the daemon runs

    exp.kill()  # SIGKILL: its socket file stays behind
    assert box.experiment_socket("victim").exists()
    wait_until(lambda: daemon.experiment("victim") is None, 5, "the daemon to drop victim")
    time.sleep(1.2)  # at least one more rescan over the stale sockets
    assert daemon.alive, daemon.report()
    names = [e["name"] for e in daemon.status()["experiments"]]
    assert names == []
    assert not [line for line in daemon.log if " discovered" in line and "victim" not in line]
    assert box.cli("snapshot", "victim").returncode == 6

    # The name is free again: a new run reclaims the stale socket and is snapshotted.
    before = max(box.versions("victim"))
    again = box.start_experiment("victim")
    wait_until(lambda: daemon.experiment("victim"), 3, "the daemon to track the new victim")
    wait_until(lambda: max(box.versions("victim")) > before, 5, "a newer version of victim")
    entry = daemon.experiment("victim")
    assert entry is not None
    assert entry["pid"] == again.pid
    assert daemon.stop() == 0
    assert_log_is_one_line_per_event(daemon)


def test_a_killed_experiment_is_dropped_even_after_it_was_snapshotted(box: Sandbox) -> None:
    # With a long schedule nothing but the rescan can notice the death: the experiment's
    # socket file stays, and the daemon still holds the connection of its last snapshot.
    box.write_config(schedule={"every": "1h"}, daemon={"timeout": "2s", "rescan": "1s"})
    daemon = box.start_daemon()
    exp = box.start_experiment("exp")
    wait_until(lambda: daemon.experiment("exp"), 3, "the daemon to track exp")
    assert box.cli("snapshot", "exp").returncode == 0
    exp.kill()
    wait_until(lambda: daemon.experiment("exp") is None, 4, "the daemon to drop the dead exp")
    # status still shows it, as a run that ended without closing, and how to resume it.
    (left,) = daemon.status()["left"]
    assert (left["name"], left["pid"], left["last_version"]) == ("exp", exp.pid, 1)
    assert (left["why"], left["crashed"]) == ("its process is gone", True)
    text = box.cli("status").stdout
    assert f"left: exp (pid {exp.pid}) at " in text
    assert (
        f"its process is gone; last version 1; to resume it: snapshotd restore exp --store "
        f"{box.store_dir} -- COMMAND"
    ) in text
    again = box.start_experiment("exp")
    wait_until(lambda: daemon.experiment("exp"), 3, "the daemon to track exp again")
    assert daemon.status()["left"] == []
    again.kill()


def test_a_stopped_experiment_stays_tracked_and_is_served_again_when_it_continues(
    box: Sandbox,
) -> None:
    # A stopped (or hung) process takes no connections: the rescan's probes fill its
    # queue, after which connecting fails at once with EAGAIN. That is not "gone".
    box.write_config(schedule={"every": "1h"}, daemon={"timeout": "1s", "rescan": "200ms"})
    daemon = box.start_daemon()
    exp = box.start_experiment("exp")
    wait_until(lambda: daemon.experiment("exp"), 3, "the daemon to track exp")
    exp.send(signal.SIGSTOP)
    try:
        mark = len(daemon.log)
        time.sleep(5.0)  # 25 rescans: more probes than the socket's queue holds (16)
        assert daemon.experiment("exp") is not None, "a stopped experiment was dropped"
        assert box.cli("snapshot", "exp").returncode != 0  # no safe point while stopped
        time.sleep(1.0)
        assert daemon.experiment("exp") is not None
        assert not [line for line in daemon.log[mark:] if "no longer tracked" in line]
    finally:
        exp.send(signal.SIGCONT)
    done = box.cli("snapshot", "exp")
    assert done.returncode == 0, done.stderr
    assert daemon.stop() == 0


def test_an_experiment_listening_a_moment_after_binding_is_discovered(box: Sandbox) -> None:
    # register() binds its socket (the file appears: an inotify event), then listens. A
    # scan in between finds the socket refusing connections. With the rescan far away,
    # discovery must not depend on winning that race.
    box.write_config(daemon={"timeout": "2s", "rescan": "30s"})
    daemon = box.start_daemon()
    folder = rendezvous.experiments_dir(box.runtime)
    rendezvous.ensure_private_dir(folder)
    claim = os.open(rendezvous.experiment_lock(box.runtime, "slow"), os.O_RDWR | os.O_CREAT)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
        listener.bind(os.fspath(rendezvous.experiment_socket(box.runtime, "slow")))
        time.sleep(0.5)  # descheduled between bind() and listen()
        listener.listen(4)
        wait_until(lambda: daemon.experiment("slow"), 1.5, "the daemon to track slow")
    finally:
        listener.close()
        os.close(claim)


def test_a_connection_probe_does_not_break_the_daemons_session(box: Sandbox) -> None:
    # The daemon checks that an experiment is alive by connecting and hanging up
    # (daemon._listening, on each rescan of an experiment it is not connected to, which
    # includes the moment its first snapshot is connecting). Such a probe must not cost
    # the daemon its session: here the next scheduled snapshot fails.
    daemon = box.start_daemon()
    box.start_experiment("exp")

    def snapshots() -> int:
        entry = daemon.experiment("exp")
        return 0 if entry is None else int(entry["snapshots"]) + int(entry["failures"])

    wait_until(lambda: snapshots() >= 1, 4, "a first snapshot (the daemon is connected)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(os.fspath(box.experiment_socket("exp")))
    probe.close()
    before = snapshots()
    wait_until(lambda: snapshots() >= before + 2, 5, "two more scheduled snapshots")
    entry = daemon.experiment("exp")
    assert entry is not None
    failed = [line for line in daemon.log if "snapshot not taken" in line]
    assert entry["failures"] == 0, failed


def test_status_shows_the_stored_last_version_of_an_experiment_found_after_a_restart(
    box: Sandbox,
) -> None:
    box.write_config(schedule={"every": "1h"})
    first = box.start_daemon()
    box.start_experiment("exp")
    wait_until(lambda: first.experiment("exp"), 3, "the daemon to track exp")
    for _ in range(2):
        assert box.cli("snapshot", "exp").returncode == 0
    assert first.stop() == 0
    second = box.start_daemon()
    entry = wait_until(lambda: second.experiment("exp"), 3, "the new daemon to find exp")
    assert (entry["last_version"], entry["snapshots"]) == (2, 0)
    table = box.cli("status").stdout
    assert re.search(r"^exp\s+\d+\s+every 1h\s+2\s", table, re.M), table
    assert second.stop() == 0


def test_a_restarted_daemon_rediscovers_the_live_experiment_undisturbed(box: Sandbox) -> None:
    first = box.start_daemon()
    exp = box.start_experiment("exp", "--print-every", "5")
    wait_until(lambda: len(box.versions("exp")) >= 2, 6, "two snapshots from the first daemon")
    assert first.stop(signal.SIGTERM) == 0
    last_version = max(box.versions("exp"))
    stepped = exp.last_step() or 0
    wait_until(lambda: (exp.last_step() or 0) > stepped + 10, 5, "steps without a daemon")

    second = box.start_daemon()
    wait_until(lambda: second.experiment("exp"), 3, "the new daemon to find exp")
    wait_until(
        lambda: len([v for v in box.versions("exp") if v > last_version]) >= 2,
        6,
        "two snapshots from the second daemon",
    )
    assert exp.alive
    assert [w[0] for w in exp.all("ready")] == [str(exp.pid)], "the experiment restarted"
    entry = second.experiment("exp")
    assert entry is not None
    assert entry["pid"] == exp.pid
    listed = box.store.versions("exp")
    numbers = [v.version for v in listed]
    steps = [v.step if v.step is not None else -1 for v in listed]
    assert numbers == sorted(set(numbers))
    assert min(steps) >= 0
    assert steps == sorted(steps), f"steps do not increase with versions: {steps}"
    assert len(set(steps)) == len(steps)
    assert second.stop() == 0
    assert exp.finish() == 0


# -- schedule and retention ----------------------------------------------------------------


def test_snapshots_follow_the_schedule_and_retention_keeps_what_the_policy_says(
    box: Sandbox,
) -> None:
    box.write_config(
        schedule={"every": "1s"},
        keep={"last": 3},
        experiments={"pin-*": {"keep": {"last": 2, "pinned": [1]}}},
    )
    daemon = box.start_daemon()
    plain = box.start_experiment("plain")
    pinned = box.start_experiment("pin-a")
    wait_until(lambda: daemon.experiment("plain"), 3, "the daemon to track plain")
    wait_until(lambda: daemon.experiment("pin-a"), 3, "the daemon to track pin-a")
    started = datetime.now(UTC)
    newest_seen = 0
    deadline = time.monotonic() + 5.6
    while time.monotonic() < deadline:
        listed = box.versions("plain")
        # keep last 3, plus at most the one just committed and not yet pruned
        assert len(listed) <= 4, listed
        if listed:
            assert max(listed) >= newest_seen, "the newest snapshot was deleted"
            newest_seen = max(listed)
        kept = box.versions("pin-a")
        assert len(kept) <= 4, kept
        if kept:
            assert kept[0] == 1, f"pinned version 1 was deleted: {kept}"
        time.sleep(0.1)

    entry = daemon.experiment("plain")
    assert entry is not None
    assert entry["schedule"] == "every 1s"
    assert 4 <= entry["last_version"] <= 7, entry
    assert entry["failures"] == entry["skips"] == 0
    assert entry["next_snapshot"] is not None
    assert entry["next_snapshot"] >= entry["last_snapshot"]
    listed_versions = box.store.versions("plain")
    assert [v.version for v in listed_versions][-3:] == list(
        range(entry["last_version"] - 2, entry["last_version"] + 1)
    )
    created = [v.created for v in listed_versions]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(created)]
    assert all(0.5 <= gap <= 2.0 for gap in gaps), f"not every 1s: {gaps}"
    assert all(v.created >= started.replace(microsecond=0) for v in listed_versions[1:])
    kept = box.versions("pin-a")
    assert kept[0] == 1
    assert len(kept) in (3, 4)
    assert daemon.stop() == 0
    assert plain.finish() == 0
    assert pinned.finish() == 0
    assert_log_is_one_line_per_event(daemon)


# -- signals -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_snapshots_exits_0_promptly(box: Sandbox, sig: int) -> None:
    box.write_config(schedule={"every": "500ms"})
    daemon = box.start_daemon()
    runs = [box.start_experiment(f"exp{i}") for i in range(3)]
    index, _ = daemon.wait_log(r"exp\d: version 2 ", timeout=6)
    daemon.wait_log(r"exp\d: version \d+ ", timeout=3, start=index + 1)  # busy now
    began = time.monotonic()
    code = daemon.stop(sig, timeout=10)
    elapsed = time.monotonic() - began
    assert code == 0, daemon.report()
    assert elapsed < 5, f"stopping took {elapsed:.1f}s"
    daemon.wait_log(rf"INFO snapshotd\.daemon: stopping \({signal.Signals(sig).name}\)", 1)
    assert not box.control_socket().exists()
    assert box.temporaries() == []
    assert daemon.out.snapshot() == [], "the daemon wrote to stdout; logs go to stderr"
    for run in runs:  # the experiments do not notice
        assert run.alive
        assert run.finish() == 0
    assert_log_is_one_line_per_event(daemon)


def test_stopping_while_an_experiment_hangs_is_bounded_by_the_timeout(box: Sandbox) -> None:
    box.write_config(daemon={"timeout": "2s", "rescan": "1s"})
    daemon = box.start_daemon()
    box.start_experiment("hung", "--stall-after", "3")

    def in_flight() -> bool:
        entry = daemon.experiment("hung")
        return bool(entry and entry["in_flight"])

    wait_until(in_flight, 4, "a snapshot request waiting for hung's safe point")
    began = time.monotonic()
    assert daemon.stop(timeout=15) == 0
    elapsed = time.monotonic() - began
    assert elapsed < 2 + 3, f"stopping took {elapsed:.1f}s with a 2s snapshot timeout"


def test_a_snapshot_with_no_safe_point_in_time_says_what_to_change(box: Sandbox) -> None:
    box.write_config(schedule={"every": "1h"}, daemon={"timeout": "1s", "rescan": "1s"})
    daemon = box.start_daemon()
    hung = box.start_experiment("hung", "--stall-after", "1")
    hung.wait_for("stalled", 10)
    wait_until(lambda: daemon.experiment("hung"), 4, "the daemon to track hung")
    result = box.cli("snapshot", "hung")
    assert result.returncode == 6, result.stderr
    assert "no safe point (run.step) came in time" in result.stderr
    assert "call run.step more often, or raise the daemon's timeout (daemon.timeout)" in (
        result.stderr
    )
    assert daemon.stop() == 0


def test_repeated_store_failures_make_the_daemon_exit_5(box: Sandbox) -> None:
    # cli.py: `start` exits 5 after max_io_failures consecutive failed commits, so that
    # its supervisor restarts it. The run's directory is a plain file: every commit fails.
    box.write_config(
        schedule={"every": "500ms"}, daemon={"timeout": "2s", "rescan": "1s", "max_io_failures": 2}
    )
    systemd = box.fake_systemd()
    daemon = box.start_daemon(env=systemd.env)
    (box.store_dir / "exp").write_text("not a directory")
    box.start_experiment("exp")
    assert daemon.wait(10) == 5, daemon.report()
    _, match = daemon.wait_log(r"CRITICAL snapshotd\.daemon: (.*)", 1)
    assert "2 consecutive I/O failures" in match.group(1)
    assert len([line for line in daemon.log if "ERROR snapshotd.daemon: exp:" in line]) == 2
    systemd.wait("STOPPING", timeout=1)
    assert not box.control_socket().exists()


def test_only_consecutive_store_failures_count_toward_the_exit(box: Sandbox) -> None:
    # One failed commit now and then (a full disk that was cleared) must not add up over
    # the daemon's life: a good commit resets the count.
    box.write_config(schedule={"every": "1h"}, daemon={"timeout": "2s", "max_io_failures": 2})
    daemon = box.start_daemon()
    box.start_experiment("exp")
    wait_until(lambda: daemon.experiment("exp"), 3, "the daemon to track exp")
    run = box.store_dir / "exp"

    def break_run() -> None:
        shutil.rmtree(run, ignore_errors=True)
        run.write_text("not a directory")

    break_run()
    assert box.cli("snapshot", "exp").returncode == exitcode.EXPERIMENT
    run.unlink()
    assert box.cli("snapshot", "exp").returncode == 0  # a good one in between
    break_run()
    assert box.cli("snapshot", "exp").returncode == exitcode.EXPERIMENT
    time.sleep(0.5)
    assert daemon.alive, "two failures with a success between them stopped the daemon"
    assert daemon.status()["io_failures"] == 1
    box.cli("snapshot", "exp")  # the second in a row
    assert daemon.wait(10) == exitcode.NO_DAEMON, daemon.report()


def test_a_store_the_daemon_makes_is_private(box: Sandbox) -> None:
    box.write_config(store=str(box.root / "new" / "store"))
    daemon = box.start_daemon()
    root = box.root / "new" / "store"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / ".daemon.lock").stat().st_mode) == 0o600
    assert daemon.stop() == 0


# -- reload ---------------------------------------------------------------------------------


@pytest.fixture
def linked(box: Sandbox) -> tuple[Sandbox, Path, Path]:
    """The daemon's config is a symlink to a file in a directory it does not watch.

    So editing the file does not trigger the watcher: only SIGHUP reloads it.
    """
    real_dir = box.root / "real"
    real_dir.mkdir()
    real = box.write_config(real_dir / "snapshotd.yaml")
    link = box.root / "etc" / "snapshotd.yaml"
    link.parent.mkdir()
    link.symlink_to(real)
    return box, link, real


def test_sighup_reloads_a_changed_config(linked: tuple[Sandbox, Path, Path]) -> None:
    box, link, real = linked
    daemon = box.start_daemon(config=link)
    exp = box.start_experiment("exp")
    wait_until(lambda: schedule_of(daemon, "exp") == "every 1s", 3, "exp on every 1s")
    box.write_config(real, schedule={"every": "3s"})
    time.sleep(1.0)
    assert schedule_of(daemon, "exp") == "every 1s", "reloaded without SIGHUP"
    mark = len(daemon.log)
    reloaded_at = datetime.now(UTC)
    daemon.send(signal.SIGHUP)
    daemon.wait_log(r"INFO snapshotd\.daemon: config reloaded from ", 3, start=mark)
    wait_until(lambda: schedule_of(daemon, "exp") == "every 3s", 3, "exp on every 3s")

    def two_after_reload() -> list[datetime] | None:
        created = [v.created for v in box.store.versions("exp") if v.created > reloaded_at]
        return created[:2] if len(created) >= 2 else None

    created = wait_until(two_after_reload, 9, "two snapshots after the reload")
    gap = (created[1] - created[0]).total_seconds()
    assert 2.5 <= gap <= 4.0, f"snapshots {gap:.2f}s apart after switching to every 3s"
    assert daemon.alive
    assert daemon.stop() == 0
    assert exp.finish() == 0


def test_an_invalid_config_on_sighup_keeps_the_old_one(linked: tuple[Sandbox, Path, Path]) -> None:
    box, link, real = linked
    daemon = box.start_daemon(config=link)
    box.start_experiment("exp")
    wait_until(lambda: schedule_of(daemon, "exp") == "every 1s", 3, "exp on every 1s")
    real.write_text(real.read_text().replace("every: 1s", "every: soon"))
    mark = len(daemon.log)
    daemon.send(signal.SIGHUP)
    _, match = daemon.wait_log(r"ERROR snapshotd\.daemon: (.*)", 3, start=mark)
    assert "keeping the old config" in match.group(1)
    assert "schedule.every" in match.group(1)
    assert "'soon'" in match.group(1)
    assert schedule_of(daemon, "exp") == "every 1s"
    before = max(box.versions("exp"), default=0)
    wait_until(lambda: max(box.versions("exp"), default=0) >= before + 2, 5, "snapshots to go on")
    assert daemon.alive
    assert daemon.stop() == 0
    assert_log_is_one_line_per_event(daemon)


def test_an_atomic_config_save_is_picked_up_without_sighup(box: Sandbox) -> None:
    daemon = box.start_daemon()
    exp = box.start_experiment("exp")
    wait_until(lambda: schedule_of(daemon, "exp") == "every 1s", 3, "exp on every 1s")
    mark = len(daemon.log)
    box.write_config(schedule={"every": "3s"}, atomic=True)  # temp file + rename
    daemon.wait_log(r"INFO snapshotd\.daemon: config reloaded from ", 3, start=mark)
    wait_until(lambda: schedule_of(daemon, "exp") == "every 3s", 3, "exp on every 3s")

    # An invalid atomic save is refused the same way as on SIGHUP.
    mark = len(daemon.log)
    box.config.with_name("next.yaml").write_text("store: ./store\nkeep: {last: -1}\n")
    os.rename(box.config.with_name("next.yaml"), box.config)
    _, match = daemon.wait_log(r"ERROR snapshotd\.daemon: reload failed.*", 3, start=mark)
    assert "keep.last" in match.group(0)
    assert schedule_of(daemon, "exp") == "every 3s"
    assert daemon.stop() == 0
    assert exp.finish() == 0


def test_reloading_the_daemon_section_takes_effect(box: Sandbox) -> None:
    # A reload applies the new config; the only keys documented to need a restart are
    # store and runtime_dir. Here daemon.rescan goes from 30s to 1s.
    box.write_config(schedule={"every": "1h"}, daemon={"timeout": "2s", "rescan": "30s"})
    daemon = box.start_daemon()
    exp = box.start_experiment("exp")
    wait_until(lambda: daemon.experiment("exp"), 3, "the daemon to track exp")
    mark = len(daemon.log)
    box.write_config(schedule={"every": "1h"}, daemon={"timeout": "2s", "rescan": "1s"})
    daemon.send(signal.SIGHUP)
    daemon.wait_log(r"config reloaded", 3, start=mark)
    exp.kill()  # never snapshotted: only a rescan notices that its socket went stale
    wait_until(lambda: daemon.experiment("exp") is None, 4, "a rescan at the new interval")


def test_a_reload_that_changes_no_schedule_keeps_every_timer(box: Sandbox) -> None:
    # Edits of the keep policy every few seconds must not put off snapshots for ever.
    box.write_config(schedule={"every": "1h"}, daemon={"jitter": "0s"})
    daemon = box.start_daemon()
    box.start_experiment("exp")
    entry = wait_until(lambda: daemon.experiment("exp"), 3, "the daemon to track exp")
    before = entry["next_snapshot"]
    time.sleep(1.1)  # a timer started again now would be due a second later
    mark = len(daemon.log)
    box.write_config(schedule={"every": "1h"}, keep={"last": 9}, daemon={"jitter": "0s"})
    _, line = daemon.wait_log(r"INFO snapshotd\.daemon: config reloaded from (.*)", 5, start=mark)
    assert daemon.experiment("exp")["next_snapshot"] == before  # type: ignore[index]
    assert line.group(1).endswith(": keep changed"), line.group(0)

    mark = len(daemon.log)
    box.write_config(schedule={"every": "2h"}, keep={"last": 9}, daemon={"jitter": "0s"})
    daemon.wait_log(r"config reloaded from .*: schedule changed$", 5, start=mark)
    assert daemon.experiment("exp")["next_snapshot"] != before  # type: ignore[index]
    assert daemon.stop() == 0


def test_one_save_is_one_reload_and_a_file_written_in_parts_is_read_whole(box: Sandbox) -> None:
    daemon = box.start_daemon()
    box.start_experiment("exp")
    wait_until(lambda: schedule_of(daemon, "exp") == "every 1s", 3, "exp on every 1s")
    mark = len(daemon.log)
    whole = box.config_text(schedule={"every": "3s"}, keep={"last": 7})
    half = len(whole) // 2
    with open(box.config, "w") as stream:  # two writes, 0.4 s apart, as a slow writer does
        stream.write(whole[:half])
        stream.flush()
        time.sleep(0.4)
        stream.write(whole[half:])
    daemon.wait_log(r"config reloaded from ", 5, start=mark)
    time.sleep(1.5)  # time for any further reload to show
    reloads = [line for line in daemon.log[mark:] if "reload" in line]
    assert len(reloads) == 1, reloads
    assert reloads[0].endswith("schedule, keep changed"), reloads
    assert schedule_of(daemon, "exp") == "every 3s"

    mark = len(daemon.log)
    daemon.send(signal.SIGHUP)  # nothing changed: it says so
    daemon.wait_log(r"INFO snapshotd\.daemon: config reloaded from .*: unchanged$", 3, start=mark)
    assert daemon.stop() == 0


def test_a_deleted_config_keeps_the_old_one_and_says_how_to_bring_the_file_back(
    box: Sandbox,
) -> None:
    daemon = box.start_daemon()
    mark = len(daemon.log)
    text = box.config.read_text()
    box.config.unlink()
    _, line = daemon.wait_log(r"ERROR snapshotd\.daemon: reload failed.*", 5, start=mark)
    assert line.group(0).endswith(f"{box.config} is gone; put it back, then send SIGHUP")
    assert "--config" not in line.group(0)  # the advice for a command line, not a daemon
    mark = len(daemon.log)
    box.config.write_text(text.replace("last: 3", "last: 2"))
    daemon.wait_log(r"config reloaded from .*: keep changed$", 5, start=mark)
    assert daemon.stop() == 0


def test_a_config_saved_more_often_than_it_settles_is_still_read(box: Sandbox) -> None:
    daemon = box.start_daemon()
    mark = len(daemon.log)
    first = time.monotonic()
    for last in itertools.cycle((4, 5)):  # an editor that autosaves every 0.4 s
        box.write_config(keep={"last": last})
        time.sleep(0.4)
        if any("config reloaded" in line for line in daemon.log[mark:]):
            break
        assert time.monotonic() - first < 15, "no reload while the file kept changing"
    assert time.monotonic() - first < 12
    assert daemon.stop() == 0


def test_a_store_given_on_the_command_line_is_not_reported_changed_on_reload(
    box: Sandbox,
) -> None:
    other = box.root / "other-store"
    daemon = box.start_daemon(extra=["--store", str(other)])
    mark = len(daemon.log)
    box.write_config(keep={"last": 4})
    daemon.wait_log(r"config reloaded from .*: keep changed$", 15, start=mark)
    assert not [line for line in daemon.log[mark:] if "after a restart" in line]

    box.write_config(keep={"last": 4}, store="elsewhere")  # this one does need a restart
    _, line = daemon.wait_log(r"WARNING .*take effect after a restart.*", 15, start=mark)
    assert str(other) in line.group(0)  # and says what it still serves

    # So do the uids the sockets check: a reload does not claim to have applied them.
    mark = len(daemon.log)
    box.write_config(keep={"last": 4}, store="elsewhere", daemon={"allowed_uids": [4242]})
    daemon.wait_log(
        r"WARNING .*daemon\.allowed_uids changes take effect after a restart", 15, start=mark
    )
    _, line = daemon.wait_log(r"config reloaded from .*", 15, start=mark)
    assert "allowed_uids" not in line.group(0)
    assert daemon.status()["pid"] == daemon.pid  # this uid is still served
    assert daemon.stop() == 0


def test_debug_logging_does_not_feed_on_its_own_log_file(box: Sandbox) -> None:
    # watchdog logs every file event at DEBUG: with the log file beside the watched
    # config, each line would be one more event to log.
    box.write_config(daemon={"log_level": "debug"})
    log_file = box.config.with_name("daemon.log")
    with open(log_file, "wb") as stream:
        daemon = subprocess.Popen(
            [*snapshotd_command(), "start", "--config", str(box.config)],
            cwd=box.root,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )
    try:
        wait_until(lambda: "serving store" in log_file.read_text(), 20, "the daemon to start")
        time.sleep(3.0)
        lines = log_file.read_text().splitlines()
        assert len(lines) < 50, lines[-5:]
        assert not [line for line in lines if " watchdog" in line], lines[:5]
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0


# -- one daemon per store and runtime directory -----------------------------------------


def test_a_second_daemon_on_the_same_store_refuses_to_start(box: Sandbox) -> None:
    first = box.start_daemon()
    second = box.start_daemon(wait=False)
    assert second.wait(15) == 4, second.report()
    lines = second.err.snapshot()
    assert any("another snapshotd daemon is using the store" in line for line in lines), lines
    assert not [line for line in lines if line.startswith("Traceback")]
    # The first one is untouched: its control socket still answers.
    assert first.status()["pid"] == first.pid

    other = box.root / "other.yaml"
    other.write_text(box.config_text().replace(str(box.store_dir), str(box.root / "store2")))
    third = box.start_daemon(config=other, wait=False)
    assert third.wait(15) == 4, third.report()
    said = [line for line in third.err.snapshot() if "another snapshotd daemon" in line]
    assert said, third.report()
    # Which one, and what to do about it.
    assert f"(pid {first.pid}) serves the runtime directory {box.runtime}" in said[0]
    assert f"kill -TERM {first.pid}" in said[0]
    assert "its own runtime_dir" in said[0]
    assert first.status()["pid"] == first.pid
    assert first.stop() == 0


def test_a_store_that_cannot_be_made_says_which_key_and_what_to_do(box: Sandbox) -> None:
    blocker = box.root / "a-file"
    blocker.write_text("not a directory")
    other = box.root / "other.yaml"
    other.write_text(box.config_text().replace(str(box.store_dir), str(blocker / "store")))
    daemon = box.start_daemon(config=other, wait=False)
    assert daemon.wait(15) == 4, daemon.report()
    lines = daemon.err.snapshot()
    assert not [line for line in lines if line.startswith("Traceback")]
    said = [line for line in lines if "as the store" in line]
    assert said, lines
    assert f"cannot use {blocker / 'store'} as the store (the config's 'store'" in said[0]
    assert "Not a directory" in said[0]


def test_a_daemon_that_takes_a_command_but_does_not_answer_is_not_called_absent(
    box: Sandbox,
) -> None:
    daemon = box.start_daemon()
    daemon.send(signal.SIGSTOP)  # the kernel still queues the connection and the command
    try:
        with pytest.raises(DaemonError) as caught:
            control.call(box.runtime, "status", timeout=1.0)
    finally:
        daemon.send(signal.SIGCONT)
    assert caught.value.code == exitcode.EXPERIMENT
    assert "gave no answer to the status command in 1 s" in str(caught.value)
    assert "no daemon" not in str(caught.value)
    assert daemon.stop() == 0


def test_an_experiment_that_closed_between_listing_and_probing_did_not_crash(
    tmp_path: Path,
) -> None:
    # In process, on the daemon's own bookkeeping: the scan listed exp's socket, then exp
    # ended cleanly (socket removed, session closed) before the probe. That is no crash.
    config = configuration.Config(store=tmp_path / "store", runtime_dir=tmp_path / "run")
    daemon = Daemon(config, {})
    for name in ("closed", "crashed"):
        path = tmp_path / f"{name}.sock"
        daemon._tracked[name] = _Tracked(name, Experiment(name, path, io_timeout=1.0))
    make_stale_socket(tmp_path / "crashed.sock")  # a dead process leaves its socket
    for name in ("closed", "crashed"):
        daemon._untrack_if_gone(name)
    left = {entry["name"]: entry for entry in daemon.status()["left"]}
    assert (left["closed"]["crashed"], left["closed"]["why"]) == (False, "its socket is gone")
    assert (left["crashed"]["crashed"], left["crashed"]["why"]) == (True, "its process is gone")

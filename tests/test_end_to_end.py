"""End to end: real daemon, real experiments, SIGKILL at the worst moments.

- A run killed with ``kill -9`` and resumed ends bit-identical to one never interrupted.
- The daemon killed with SIGKILL again and again mid-snapshot: the experiment never
  notices, every listed version loads, and no temporary file survives the next start.
- Twenty experiments on one daemon, one hung, one crashing, one sending garbage: the
  healthy ones keep their schedule.
- ``snapshotd restore NAME`` pushes a snapshot into a running experiment at its next
  safe point.
"""

from __future__ import annotations

import itertools
import random
import re
import signal
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np
import pytest

import snapshotd
from tests.daemon_harness import ExperimentProcess, Sandbox, wait_until
from tests.e2e_experiment import CRASH_EXIT, Model, reference, state_digest, train_step

STEPS = 1000


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        sandbox.write_config()
        yield sandbox


def assert_same_state(got: Sequence[Any], expected: Model) -> None:
    W, b, t = got
    assert int(t) == expected.t
    assert np.asarray(W).dtype == expected.W.dtype
    assert np.asarray(W).tobytes() == expected.W.tobytes(), "W differs"
    assert np.asarray(b).tobytes() == expected.b.tobytes(), "b differs"


def assert_every_version_loads(box: Sandbox, name: str) -> list[int]:
    """Each listed version reads, verifies, and holds the state of its recorded step."""
    listed = box.store.versions(name)
    for version in listed:
        assert version.problem is None, (version.version, version.problem)
        tree = box.store.load(name, version=version.version)
        assert int(tree[2]) == version.step, f"v{version.version} mixes steps"
    assert box.store.quarantined(name) == []
    return [v.version for v in listed]


# -- kill -9 and resume -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["resume=True", "restore -- CMD"])
def test_a_killed_run_resumes_and_ends_bit_identical(box: Sandbox, how: str) -> None:
    daemon = box.start_daemon()
    out = box.root / "final.safetensors"
    first = box.start_experiment("run", "--steps", str(STEPS), "--sleep", "0.005")
    assert first.start_step == 0
    # Two versions, so that resuming from anything but the newest would show.
    wait_until(lambda: len(box.versions("run")) >= 2, 8, "two snapshots")
    assert first.alive, "the run finished before it could be killed; make it longer"
    first.kill()
    newest = box.store.versions("run")[-1]
    assert newest.step is not None
    assert 0 < newest.step < STEPS - 1

    options = ("--steps", str(STEPS), "--sleep", "0", "--out", str(out))
    if how == "resume=True":
        second = box.start_experiment("run", "--resume", *options)
    else:
        second = box.restore_and_run("run", *options)
    assert second.all("resumed") == [[str(newest.version), str(newest.step)]]
    assert second.start_step == newest.step + 1
    assert second.wait_for("done", 30) == [str(STEPS)]
    assert second.finish() == 0

    final = snapshotd.load(out)
    assert_same_state(final, reference(STEPS))
    assert daemon.alive
    assert daemon.stop() == 0


def test_a_resumed_run_differs_from_a_fresh_one_when_the_snapshot_is_wrong() -> None:
    # The control for the test above: resuming from the wrong step would be noticed.
    model = reference(100)
    for step in range(102, STEPS):  # skips step 101, as an off-by-one resume would
        train_step(model, step)
    with pytest.raises(AssertionError, match="differs"):
        assert_same_state((model.W, model.b, STEPS - 1), reference(STEPS))


# -- SIGKILL the daemon, again and again ---------------------------------------------------

#: Where a commit is cut short (the store's crash points), then three at random times.
MID_COMMIT = ("commit.after_create", "commit.before_fsync", "commit.after_fsync")
CRASHES: tuple[str | None, ...] = (
    *MID_COMMIT,
    "commit.before_rename",
    "commit.after_rename",
    "commit.after_fsync_dir",
    "prune.before_unlink",
    None,
    None,
    None,
)


def stepped_past(exp: ExperimentProcess, step: int) -> bool:
    return (exp.last_step() or 0) > step


def kill_daemon_repeatedly(box: Sandbox, crashes: Sequence[str | None], seed: int) -> None:
    rng = random.Random(seed)
    box.write_config(schedule={"every": "500ms"}, keep={"last": 3})
    exp = box.start_experiment("steady", "--print-every", "5", "--sleep", "0.005")
    seen: dict[int, int | None] = {}  # version -> step: a version is never reused
    for round_, crash in enumerate(crashes):
        env = {"SNAPSHOTD_CRASHPOINT": crash} if crash else None
        daemon = box.start_daemon(env=env)
        assert box.temporaries() == [], f"round {round_}: temporaries survived a start"
        stepped = exp.last_step() or 0
        if crash is None:
            daemon.wait_log(r"steady: version \d+", 8)
            time.sleep(rng.uniform(0.0, 0.6))
            daemon.kill()
        else:
            code = daemon.wait(10)  # it kills itself at the crash point
            assert code == -signal.SIGKILL, f"round {round_} ({crash}): exit {code}"
        assert daemon.returncode == -signal.SIGKILL
        if crash in MID_COMMIT:
            assert box.temporaries(), f"{crash}: the kill did not cut a commit short"
        assert exp.alive, f"round {round_}: the experiment died; {exp.report()}"
        wait_until(partial(stepped_past, exp, stepped), 3, f"round {round_}: more steps")
        for version in box.store.versions("steady"):
            assert seen.setdefault(version.version, version.step) == version.step, (
                f"version {version.version} was reused"
            )
        assert_every_version_loads(box, "steady")

    daemon = box.start_daemon()
    assert box.temporaries() == []
    newest = max(seen)
    wait_until(lambda: max(box.versions("steady")) > newest, 5, "snapshots to go on")
    assert daemon.stop() == 0
    assert box.cli("verify").returncode == 0
    assert_every_version_loads(box, "steady")
    assert [w[0] for w in exp.all("ready")] == [str(exp.pid)], "the experiment restarted"
    assert exp.finish() == 0


def test_sigkill_the_daemon_ten_times_during_snapshots(box: Sandbox) -> None:
    kill_daemon_repeatedly(box, CRASHES, seed=7)


@pytest.mark.soak
def test_sigkill_the_daemon_sixty_times_at_random(box: Sandbox) -> None:
    kill_daemon_repeatedly(box, [*CRASHES, *([None] * 50)], seed=int(time.time()))


# -- many experiments, some misbehaving -----------------------------------------------------


def many_experiments(box: Sandbox, healthy: int, observe: float) -> None:
    box.write_config(
        schedule={"every": "1s"}, keep={"last": 50}, daemon={"timeout": "2s", "rescan": "1s"}
    )
    systemd = box.fake_systemd()  # the heartbeat must not wait behind the hung experiment
    daemon = box.start_daemon(env={**systemd.env, "WATCHDOG_USEC": "1500000"})
    names = [f"ok{i:02d}" for i in range(healthy)]
    runs = [box.start_experiment(n, "--sleep", "0.05", wait=False) for n in names]
    hung = box.start_experiment("hung", "--stall-after", "2", "--sleep", "0.05", wait=False)
    crash = box.start_experiment("crash", "--crash-after", "40", "--sleep", "0.05", wait=False)
    junk = box.start_garbage("junk")
    for run in [*runs, hung, crash]:
        run.wait_ready(30)

    def tracked() -> set[str]:
        return {e["name"] for e in daemon.status()["experiments"]}

    wanted = {*names, "hung", "junk"}
    try:
        wait_until(lambda: wanted <= tracked(), 10, "the daemon to track every experiment")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: missing {wanted - tracked()}{daemon.report()}") from None
    began = datetime.now(UTC)
    watched_from = time.monotonic()
    time.sleep(observe)
    pings = [watched_from]
    pings += [m.at for m in systemd.received() if "WATCHDOG" in m.fields and m.at > watched_from]
    pings.append(time.monotonic())
    silence = max(b - a for a, b in itertools.pairwise(pings))
    assert silence < 1.5, f"no WATCHDOG=1 for {silence:.2f}s: systemd would have killed us"

    status = {e["name"]: e for e in daemon.status()["experiments"]}
    counts = {
        name: len([v for v in box.store.versions(name) if v.created >= began]) for name in names
    }
    least = int(observe) - 2
    slow = {name: count for name, count in counts.items() if count < least}
    assert not slow, f"fewer than {least} snapshots in {observe}s: {slow} (all: {counts})"
    # (Healthy experiments may show a failure when the daemon's liveness probe races with
    # their first connection: test_daemon's test_a_connection_probe_... pins that bug.)
    assert status["hung"]["skips"] >= 1, status["hung"]
    assert "safe point" in (status["hung"]["last_error"] or ""), status["hung"]
    assert box.versions("hung") == []
    assert status["junk"]["failures"] >= 2, status["junk"]
    assert box.versions("junk") == []
    assert junk.all("served"), "the daemon never talked to the garbage sender"
    assert crash.wait(1) == CRASH_EXIT
    assert "crash" not in status, "the crashed experiment is still tracked"
    assert all(run.alive for run in runs)
    assert daemon.alive
    assert daemon.stop(timeout=10) == 0
    for run in [*runs, hung, junk]:
        assert run.finish() == 0


def test_twenty_experiments_one_hung_one_crashing_one_garbage(box: Sandbox) -> None:
    many_experiments(box, healthy=17, observe=6.0)


@pytest.mark.soak
def test_fifty_experiments_one_hung_one_crashing_one_garbage(box: Sandbox) -> None:
    many_experiments(box, healthy=47, observe=20.0)


# -- push a snapshot into a running experiment --------------------------------------------


def take(box: Sandbox) -> int:
    result = box.cli("snapshot", "exp")
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def test_restore_pushes_a_snapshot_into_the_running_experiment(box: Sandbox) -> None:
    box.write_config(schedule={"every": "1h"}, keep={"last": 10})
    daemon = box.start_daemon()
    exp: ExperimentProcess = box.start_experiment("exp", "--sleep", "0.01", "--print-every", "5")
    wait_until(lambda: daemon.experiment("exp"), 3, "the daemon to track exp")
    pushed = take(box)
    wait_until(lambda: (exp.last_step() or 0) > 30, 5, "more training")
    later = take(box)
    old = box.store.read("exp", pushed).header.meta
    assert later > pushed
    assert old.step is not None

    result = box.cli("restore", "--version", str(pushed), "exp")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"restored exp v{pushed} (step {old.step})"
    t, applied, safe, loop_step = exp.wait_for("applied", 5)
    assert int(t) == old.step
    assert applied == state_digest(box.store.load("exp", version=pushed))
    assert safe == "1", "the push was not applied at a safe point"
    # ... and the loop was told, by run.step(), which snapshot its state now is.
    told = exp.wait_for("pushed", 5)
    assert (int(told[0]), int(told[1]), told[2], told[3]) == (pushed, old.step, "1", loop_step)

    # Training went on from the pushed state: replaying the steps since gives what the
    # next snapshot holds, bit for bit.
    after = take(box)
    meta = box.store.read("exp", after).header.meta
    assert meta.step is not None
    model = Model()
    model.__setstate__(box.store.load("exp", version=pushed))
    for step in range(int(loop_step) + 1, meta.step + 1):
        train_step(model, step)
    assert_same_state(box.store.load("exp", version=after), model)
    assert re.search(
        r"exp: restored version \d+ .* into the running experiment", "\n".join(daemon.log)
    )
    assert daemon.stop() == 0
    assert exp.finish() == 0


def test_a_live_restore_past_a_damaged_snapshot_says_so_and_a_damaged_one_asked_for_is_refused(
    box: Sandbox,
) -> None:
    box.write_config(schedule={"every": "1h"}, keep={"last": 10})
    daemon = box.start_daemon()
    exp: ExperimentProcess = box.start_experiment("exp", "--sleep", "0.01")
    wait_until(lambda: daemon.experiment("exp"), 3, "the daemon to track exp")
    good, damaged = take(box), take(box)
    path = box.store_dir / "exp" / f"v{damaged:06d}.safetensors"
    with path.open("r+b") as f:  # one flipped bit in the last tensor's data
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    damage = path.read_bytes()

    asked = box.cli("restore", "exp", "--version", str(damaged))
    assert asked.returncode == 3, asked.stderr  # README: the version asked for is bad
    assert "digest mismatch" in asked.stderr
    assert "moved to" in asked.stderr
    assert "quarantine" in asked.stderr

    path.write_bytes(damage)  # the same damage, now found by a newest-first restore
    newest = box.cli("restore", "exp")
    assert newest.returncode == 0, newest.stderr
    assert newest.stdout.strip().startswith(f"restored exp v{good} ")
    assert f"exp v{damaged} failed verification and was moved to quarantine" in newest.stderr
    exp.wait_for("applied", 5)
    # In the daemon's log as a warning, with its level (journald's priority), not bare.
    warned = [line for line in daemon.log if "WARNING" in line and f"version {damaged}" in line]
    assert warned, "\n".join(daemon.log)
    assert daemon.stop() == 0
    assert exp.finish() == 0

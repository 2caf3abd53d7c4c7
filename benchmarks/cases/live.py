"""Live cases: a real experiment process, the daemon's code and real daemons (issue "Speed").

Each case times what its target is about *where the cost is paid*, and says so through
:meth:`~benchmarks.harness.Bench.measured` when that is not the wall time of ``run``:

- **P1 stall** (states b, c; and d for P4), ``live.stall``: a child process
  (:mod:`benchmarks.experiment_child`) holds the state, is registered with
  ``consistency="step"`` and trains; this process is the daemon side
  (:class:`snapshotd.transport.Experiment` + :func:`snapshotd.capture.persist` into a real
  :class:`~snapshotd.Store`). The time recorded is the duration of the ``run.step(n)``
  that served the request, measured in the child. Its references are measured in the
  same child, in the same rounds: ``live.memcpy`` (``np.copyto`` of every array into a
  prefaulted buffer) and ``live.pickle`` (``pickle.dump(HIGHEST_PROTOCOL)`` + fsync; for
  state d also ``live.dumps``, ``pickle.dumps``).
- **P2 persist**, ``live.persist``: the same set-up; the time of
  :func:`snapshotd.capture.persist` (request, wait for the safe point, commit from the
  shared memory, done) while the child keeps training. The prune that the daemon runs
  next (:func:`~snapshotd.capture.capture` = persist, then prune) is timed too, outside
  the persist time; its seconds are in the notes (``prune_s``).
- **Memory**, ``live.daemon_snapshot`` (b, c): a second child and a real ``snapshotd start``
  (scheduled hourly, so only our requests run); each round asks for one snapshot over the
  control socket (``snapshotd snapshot``), timed from the command line's side, while a
  thread samples the daemon's ``Private_Dirty``. The notes keep the experiment's memory
  before registering and after the snapshots, and the daemon's.
- **P5** (state a, with its own 256 MiB state), ``live.train_baseline`` and
  ``live.train_snapshotd``: the same training child, unregistered, and registered with a
  real daemon scheduled ``every: 1s``; each round both train for the same fixed wall
  time after a warm-up; the time recorded is seconds per step.
- **P6** (state d), ``live.fleet``: one real daemon, 50 children with small states
  registered anew each round (so nothing runs between rounds) and stepping every 20 ms;
  after a window, the versions' ``created`` times give each snapshot's delay past its
  due time (:mod:`benchmarks.schedule`). The time recorded is the round's worst delay,
  compared with ``live.interval`` (the configured interval, not a measurement). The
  daemon's CPU time over the window is in the notes.

The children sleep between their measurements, so no other case shares the machine with
them. ``--quick`` keeps every piece and shrinks sizes, windows and the fleet.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.harness import Bench, Context, case
from benchmarks.processes import Child, Daemon, short_dir
from benchmarks.schedule import Punctuality, combine, punctuality
from benchmarks.states import KIB, MIB
from snapshotd import Store, rendezvous
from snapshotd.capture import persist
from snapshotd.retention import Policy
from snapshotd.transport import Experiment

RUN = "live"
#: States of the P1/P2/memory cases (the issue's 64 MiB/200 and 1 GiB/50 arrays), and P4's.
LARGE = ("b", "c")
SMALL = ("d",)
TRAIN_STATE = "a"
FLEET_STATE = "d"
#: How long a request may wait for the child's next safe point.
_SAFE_POINT_TIMEOUT = 60.0
_KEEP = Policy(last=2)


@dataclass(frozen=True)
class Scenario:
    """Sizes and durations of P5 and P6 (full or quick)."""

    train_nbytes: int
    train_count: int
    train_interval: str
    train_warmup: float
    train_window: float
    fleet_size: int
    fleet_interval: float
    fleet_window: float
    fleet_nbytes: int = 64 * KIB
    fleet_count: int = 16
    fleet_sleep: float = 0.02

    @classmethod
    def of(cls, quick: bool) -> Scenario:
        if quick:
            return cls(4 * MIB, 100, "200ms", 0.25, 0.3, 3, 0.2, 0.75)
        return cls(256 * MIB, 100, "1s", 1.0, 3.0, 50, 1.0, 5.0)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.1f} MiB"


def _stop(*processes: Child | Daemon | None) -> None:
    for process in processes:
        if process is not None:
            process.stop()


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


# -- the shared rig: one registered child per state, driven from this process ----------


class Rig:
    """A registered, training child of the state and the daemon side in this process."""

    def __init__(self, ctx: Context) -> None:
        self.folder = ctx.workdir.parent / "live-rig"
        self.folder.mkdir(exist_ok=True)
        self.runtime = short_dir("sdb-")
        spec = ctx.state.spec
        self.child = Child(
            self.folder / "child.log",
            nbytes=spec.nbytes,
            count=spec.count,
            uniform=spec.uniform,
            name=RUN,
            runtime=self.runtime,
            references=True,
        )
        try:
            self.child.wait_ready()
            self.experiment = Experiment(
                RUN, rendezvous.experiment_socket(self.runtime, RUN), io_timeout=30.0
            )
            self.store = Store(self.folder / "store")
            self.prunes: list[float] = []
        except BaseException:
            self.close()
            raise

    def snapshot(self) -> tuple[float, float]:
        """One snapshot while the child trains: (seconds of ``persist()``, stall in the
        child); then the prune the daemon would run, timed into :attr:`prunes`."""
        self.child.send("train")
        begin = time.perf_counter()
        outcome = persist(
            self.experiment, self.store, timeout=_SAFE_POINT_TIMEOUT, now=datetime.now(UTC)
        )
        elapsed = time.perf_counter() - begin
        self.store.prune(RUN, _KEEP)
        self.prunes.append(time.perf_counter() - begin - elapsed)
        assert outcome.step is not None
        answer = self.child.request("pause", steps=[outcome.step])
        return elapsed, float(answer["durations"][str(outcome.step)])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.experiment.close()
        self.child.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)


_RIGS: dict[Path, tuple[Rig, int]] = {}


def _acquire(ctx: Context) -> Rig:
    key = ctx.workdir.parent
    rig, users = _RIGS.get(key) or (Rig(ctx), 0)
    _RIGS[key] = (rig, users + 1)
    return rig


def _release(ctx: Context) -> None:
    key = ctx.workdir.parent
    rig, users = _RIGS.pop(key)
    if users > 1:
        _RIGS[key] = (rig, users - 1)
    else:
        rig.close()


class _OnRig(Bench):
    """A case run on the state's shared rig; ``value`` is what :meth:`measured` records."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.rig: Rig | None = None
        self.value = 0.0

    def setup(self) -> None:
        self.rig = _acquire(self.ctx)

    def measured(self, elapsed: float) -> float:
        return self.value

    def teardown(self) -> None:
        if self.rig is not None:
            self.rig = None
            _release(self.ctx)

    def _rig(self) -> Rig:
        assert self.rig is not None
        return self.rig


class Stall(_OnRig):
    def run(self) -> None:
        _, self.value = self._rig().snapshot()


class Persist(_OnRig):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.prunes: list[float] = []

    def setup(self) -> None:
        super().setup()
        self.prunes = self._rig().prunes  # kept for notes(), which comes after teardown

    def run(self) -> None:
        self.value, _ = self._rig().snapshot()

    def notes(self) -> dict[str, Any]:
        return {"prune_s": statistics.median(self.prunes)} if self.prunes else {}


class InChild(_OnRig):
    """A reference timed inside the rig's child (``memcpy``, ``pickle``, ``dumps``)."""

    def __init__(self, ctx: Context, op: str) -> None:
        super().__init__(ctx)
        self.op = op

    def run(self) -> None:
        fields: dict[str, Any] = {}
        if self.op == "pickle":
            fields["path"] = str(self.ctx.workdir / "state.pkl")
        self.value = float(self._rig().child.request(self.op, **fields)["seconds"])


# -- memory, with a real daemon ----------------------------------------------------------


class DaemonSnapshot(Bench):
    """``snapshotd snapshot NAME`` against a real daemon; memory of both sides in the notes."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.runtime: Path | None = None
        self.child: Child | None = None
        self.daemon: Daemon | None = None
        self.value = 0.0
        self.peaks: list[int] = []
        self.idle = 0
        self.memory: dict[str, Any] = {}

    def setup(self) -> None:
        try:
            self._start()
        except BaseException:
            self.teardown()
            raise

    def _start(self) -> None:
        spec = self.ctx.state.spec
        self.runtime = short_dir("sdm-")
        self.daemon = Daemon(
            self.ctx.workdir,
            self.runtime,
            {"schedule": {"every": "1h"}, "keep": {"last": 2}},
        )
        self.child = Child(
            self.ctx.workdir / "child.log",
            nbytes=spec.nbytes,
            count=spec.count,
            uniform=spec.uniform,
            name=RUN,
            runtime=self.runtime,
        )
        self.daemon.wait_ready()
        self.child.wait_ready()
        self.daemon.wait_tracked({RUN})
        self.idle = procstat.private_dirty(self.daemon.pid)

    def run(self) -> None:
        assert self.child is not None
        assert self.daemon is not None
        self.child.send("train")
        with procstat.PeakSampler(self.daemon.pid) as sampler:
            begin = time.perf_counter()
            self.daemon.call("snapshot", name=RUN)
            self.value = time.perf_counter() - begin
        self.child.request("pause")
        self.peaks.append(sampler.peak)

    def measured(self, elapsed: float) -> float:
        return self.value

    def teardown(self) -> None:
        try:
            if self.child is not None and self.daemon is not None and self.daemon.alive:
                self.memory = self._memory(self.child, self.daemon)
                _log(self._summary())
        finally:
            _stop(self.child, self.daemon)
            self.child = self.daemon = None
            _remove(self.runtime)

    def _memory(self, child: Child, daemon: Daemon) -> dict[str, Any]:
        seen = child.request("memory")
        state = int(seen["state_bytes"])
        extra_rss = int(seen["now"]["rss"]) - int(seen["before"]["rss"])
        memfd = int(seen["memfd_bytes"])
        peak = max(self.peaks, default=0)
        return {
            "state_bytes": state,
            "experiment": {
                "rss_before_register": seen["before"]["rss"],
                "rss_after_snapshots": seen["now"]["rss"],
                "extra_rss": extra_rss,
                "memfd_bytes": memfd,
                "extra_rss_per_state": extra_rss / state,
                "memfd_per_state": memfd / state,
                "within_one_copy": max(extra_rss, memfd) <= state,
            },
            "daemon": {
                "private_dirty_idle": self.idle,
                "private_dirty_peak": peak,
                "private_dirty_after": procstat.private_dirty(daemon.pid),
                "private_dirty_growth": peak - self.idle,
                "growth_per_state": (peak - self.idle) / state,
                "samples": len(self.peaks),
            },
        }

    def _summary(self) -> str:
        exp, dmn = self.memory["experiment"], self.memory["daemon"]
        return (
            f"  memory ({self.ctx.state.spec.key}): experiment +{_mib(exp['extra_rss'])} RSS, "
            f"{_mib(exp['memfd_bytes'])} memfd for a {_mib(self.memory['state_bytes'])} state; "
            f"daemon Private_Dirty {_mib(dmn['private_dirty_idle'])} idle, "
            f"{_mib(dmn['private_dirty_peak'])} peak"
        )

    def notes(self) -> dict[str, Any]:
        return {"memory": self.memory}


# -- P5: a training loop with and without a real daemon ----------------------------------


class Training(Bench):
    """A training child trains a fixed wall time per round; records seconds per step."""

    def __init__(self, ctx: Context, *, snapshots: bool) -> None:
        self.ctx = ctx
        self.snapshots = snapshots
        self.scenario = Scenario.of(ctx.quick)
        self.runtime: Path | None = None
        self.child: Child | None = None
        self.daemon: Daemon | None = None
        self.value = 0.0
        self.rates: list[float] = []
        self.taken: list[int] = []
        self.slowest: list[float] = []

    def setup(self) -> None:
        try:
            self._start()
        except BaseException:
            self.teardown()
            raise

    def _start(self) -> None:
        s = self.scenario
        if self.snapshots:
            self.runtime = short_dir("sdt-")
            self.daemon = Daemon(
                self.ctx.workdir,
                self.runtime,
                {"schedule": {"every": s.train_interval}, "keep": {"last": 2}},
            )
        self.child = Child(
            self.ctx.workdir / "child.log",
            nbytes=s.train_nbytes,
            count=s.train_count,
            name=RUN if self.runtime is not None else "",
            runtime=self.runtime,
        )
        if self.daemon is not None:
            self.daemon.wait_ready()
        self.child.wait_ready()
        if self.daemon is not None:
            self.daemon.wait_tracked({RUN})

    def run(self) -> None:
        assert self.child is not None
        s = self.scenario
        answer = self.child.request(
            "train_for", warmup=s.train_warmup, seconds=s.train_window, timeout=60.0
        )
        steps, seconds = int(answer["steps"]), float(answer["seconds"])
        self.value = seconds / max(steps, 1)
        self.rates.append(steps / seconds)
        before, after = answer["versions"]
        self.taken.append(0 if before is None or after is None else after - before)
        self.slowest.append(float(answer["slowest_step"]))

    def measured(self, elapsed: float) -> float:
        return self.value

    def teardown(self) -> None:
        _stop(self.child, self.daemon)
        self.child = self.daemon = None
        _remove(self.runtime)

    def notes(self) -> dict[str, Any]:
        s = self.scenario
        return {
            "state_bytes": s.train_nbytes,
            "interval": s.train_interval if self.snapshots else None,
            "window_s": s.train_window,
            "warmup_s": s.train_warmup,
            "steps_per_second": self.rates,
            "snapshots_in_window": self.taken if self.snapshots else [],
            "slowest_safe_point_s": self.slowest,
        }


# -- P6: a fleet of experiments on one real daemon ----------------------------------------


class Fleet(Bench):
    """50 experiments on one daemon for a window per round; records the worst delay."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.scenario = Scenario.of(ctx.quick)
        self.runtime: Path | None = None
        self.daemon: Daemon | None = None
        self.children: list[Child] = []
        self.round = 0
        self.size = 0
        self.value = 0.0
        self.rounds: list[dict[str, Any]] = []
        self.parts: list[Punctuality] = []

    def setup(self) -> None:
        try:
            self._start()
        except BaseException:
            self.teardown()
            raise

    def _start(self) -> None:
        s = self.scenario
        self.runtime = short_dir("sdf-")
        self.daemon = Daemon(
            self.ctx.workdir,
            self.runtime,
            {"schedule": {"every": f"{round(s.fleet_interval * 1000)}ms"}, "keep": {"last": 1000}},
        )
        for index in range(s.fleet_size):
            self.children.append(
                Child(
                    self.ctx.workdir / f"child{index:02d}.log",
                    nbytes=s.fleet_nbytes,
                    count=s.fleet_count,
                    runtime=self.runtime,
                )
            )
        self.daemon.wait_ready()
        for child in self.children:
            child.wait_ready()
        self.size = len(self.children)

    def run(self) -> None:
        assert self.daemon is not None
        s = self.scenario
        self.round += 1
        names = [f"fleet-r{self.round:02d}-e{i:02d}" for i in range(len(self.children))]
        registered = []
        for child, name in zip(self.children, names, strict=True):
            registered.append(float(child.request("register", name=name)["registered"]))
            child.send("train", sleep=s.fleet_sleep)
        cpu = procstat.cpu_seconds(self.daemon.pid)
        begin = time.time()
        time.sleep(s.fleet_window)
        end = time.time()
        cpu = procstat.cpu_seconds(self.daemon.pid) - cpu
        for child in self.children:
            child.request("unregister")
        store = Store(self.daemon.store)
        parts = [
            punctuality(
                [v.created.timestamp() for v in store.versions(name)],
                registered=start,
                end=end,
                interval=s.fleet_interval,
            )
            for name, start in zip(names, registered, strict=True)
        ]
        fleet = combine(parts)
        self.parts.append(fleet)
        self.value = max(fleet.worst_delay, 1e-6)
        self.rounds.append(
            {
                "window_s": end - begin,
                "due": fleet.due,
                "taken": fleet.taken,
                "missed": fleet.missed,
                "worst_delay_s": fleet.worst_delay,
                "median_delay_s": statistics.median(fleet.delays) if fleet.delays else None,
                "daemon_cpu_s": cpu,
                "daemon_cpu_per_s": cpu / (end - begin),
            }
        )

    def measured(self, elapsed: float) -> float:
        return self.value

    def teardown(self) -> None:
        try:
            if self.parts:
                _log(self._summary())
        finally:
            _stop(*self.children, self.daemon)
            self.children, self.daemon = [], None
            _remove(self.runtime)

    def _summary(self) -> str:
        total = combine(self.parts)
        cpu = sum(r["daemon_cpu_s"] for r in self.rounds)
        window = sum(r["window_s"] for r in self.rounds)
        return (
            f"  fleet: {self.size} experiments every {self.scenario.fleet_interval:g} s, "
            f"{window:.0f} s in {len(self.rounds)} windows: {total.taken} snapshots, "
            f"{total.missed} missed, worst delay {total.worst_delay:.3f} s; "
            f"daemon CPU {cpu / window:.1%} of one CPU"
        )

    def notes(self) -> dict[str, Any]:
        s = self.scenario
        total = combine(self.parts)
        window = sum(r["window_s"] for r in self.rounds) or 1.0
        cpu = sum(r["daemon_cpu_s"] for r in self.rounds)
        return {
            "experiments": self.size,
            "interval_s": s.fleet_interval,
            "state_bytes": s.fleet_nbytes,
            "rounds": self.rounds,
            "total": {
                "window_s": window,
                "due": total.due,
                "taken": total.taken,
                "missed": total.missed,
                "worst_delay_s": total.worst_delay,
                "median_delay_s": statistics.median(total.delays) if total.delays else None,
                "daemon_cpu_s": cpu,
                "daemon_cpu_per_s": cpu / window,
                "daemon_cpu_per_snapshot_s": cpu / total.taken if total.taken else None,
            },
        }


class Constant(Bench):
    """A configured quantity recorded as a time: the allowance a target compares with."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self) -> None:
        pass

    def measured(self, elapsed: float) -> float:
        return self.seconds


# -- registration --------------------------------------------------------------------------


@case(
    "live.memcpy",
    "memcpy of the state inside the experiment process",
    group="limit",
    states=LARGE + SMALL,
    short="memcpy(child)",
)
def _memcpy(ctx: Context) -> Bench:
    return InChild(ctx, "memcpy")


@case(
    "live.pickle",
    "pickle.dump(HIGHEST) + fsync inside the experiment process",
    group="peer",
    limit="limit.write_fsync",
    states=LARGE + SMALL,
    short="pickle(child)",
)
def _pickle(ctx: Context) -> Bench:
    return InChild(ctx, "pickle")


@case(
    "live.dumps",
    "pickle.dumps(HIGHEST) inside the experiment process",
    group="peer",
    states=SMALL,
    short="dumps(child)",
)
def _dumps(ctx: Context) -> Bench:
    return InChild(ctx, "dumps")


@case(
    "live.stall",
    "stall: the run.step() that serves a snapshot (in the child)",
    group="snapshotd",
    limit="live.memcpy",
    peers=("live.pickle", "live.dumps"),
    states=LARGE + SMALL,
)
def _stall(ctx: Context) -> Bench:
    return Stall(ctx)


@case(
    "live.persist",
    "persist: request -> durable commit (daemon side)",
    group="snapshotd",
    limit="limit.write_fsync",
    states=LARGE + SMALL,
)
def _persist(ctx: Context) -> Bench:
    return Persist(ctx)


@case(
    "live.daemon_snapshot",
    "real daemon: `snapshotd snapshot` round trip (memory in notes)",
    group="snapshotd",
    limit="limit.write_fsync",
    states=LARGE,
)
def _daemon_snapshot(ctx: Context) -> Bench:
    return DaemonSnapshot(ctx)


@case(
    "live.train_baseline",
    "training loop without snapshotd, own state: s/step",
    group="limit",
    states=(TRAIN_STATE,),
    short="train w/o snapshotd",
)
def _train_baseline(ctx: Context) -> Bench:
    return Training(ctx, snapshots=False)


@case(
    "live.train_snapshotd",
    "training loop, real daemon snapshots every interval: s/step",
    group="snapshotd",
    limit="live.train_baseline",
    states=(TRAIN_STATE,),
)
def _train_snapshotd(ctx: Context) -> Bench:
    return Training(ctx, snapshots=True)


@case(
    "live.interval",
    "one schedule interval (configured, not measured)",
    group="limit",
    states=(FLEET_STATE,),
    short="interval",
)
def _interval(ctx: Context) -> Bench:
    return Constant(Scenario.of(ctx.quick).fleet_interval)


@case(
    "live.fleet",
    "fleet on one real daemon: worst snapshot delay (s)",
    group="snapshotd",
    limit="live.interval",
    states=(FLEET_STATE,),
)
def _fleet(ctx: Context) -> Bench:
    return Fleet(ctx)

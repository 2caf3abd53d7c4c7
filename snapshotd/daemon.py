"""The daemon: wires config, store, discovery, schedule, control socket and signals.

Lifecycle (each step must succeed before the next; any failure exits non-zero)::

    lock the store  ->  remove crashed writers' temporary files  ->  bind the control
    socket  ->  start the scheduler  ->  watch the runtime directory  ->  first scan
    ->  READY=1  ->  main loop  ->  STOPPING=1  ->  bounded drain  ->  exit

Threads and who owns what:

- The **main thread** owns signals and every change to the set of experiments. Signal
  handlers only put the signal on a queue (nothing else is safe in a handler: no
  logging, no locks); the main loop takes it from there. Discovery events and the
  periodic rescan are put on the same queue, so scans never run concurrently.
- **APScheduler** (3.x, UTC) runs one job per experiment on a thread pool with
  ``misfire_grace_time=None`` (3.x drops a run that is more than 1 s late by default),
  ``coalesce=True`` and ``max_instances=1``, plus jitter. Each job holds its experiment's
  in-flight lock, so at most one snapshot per experiment is ever in flight, and a hung
  experiment only ties up its own job (every wait has a deadline).
- The **heartbeat** job sends ``WATCHDOG=1``: if the scheduler stops running jobs,
  systemd notices and restarts the daemon.
- The **control server** answers the command line on its own threads.

Stopping (SIGTERM/SIGINT): ``STOPPING=1``, no new snapshots start, the ones in flight
get ``stop_timeout`` seconds to finish; one that does not is abandoned (its temporary
file is removed by the next start). SIGHUP or an edit of the config file reloads it (an
edit once the file has been left alone for ``CONFIG_SETTLE`` seconds); an invalid new
config is logged and the old one keeps running. Only the experiments whose schedule
changed get a new timer.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from snapshotd import config as configuration
from snapshotd import exitcode, rendezvous
from snapshotd.capture import Budget, capture
from snapshotd.control import ControlServer
from snapshotd.discovery import Watcher
from snapshotd.errors import (
    ConfigError,
    DaemonError,
    PeerError,
    PeerUnreachable,
    ProtocolError,
    SnapshotSkipped,
    StoreError,
    StoreLocked,
)
from snapshotd.sdnotify import Notifier
from snapshotd.store import Store
from snapshotd.transport import Experiment, StagingBudgetExceeded

__all__ = ["EXIT_IO_FAILURES", "Daemon"]

log = logging.getLogger("snapshotd.daemon")

#: Exit code after ``max_io_failures`` consecutive failed commits (systemd restarts us).
EXIT_IO_FAILURES = exitcode.NO_DAEMON
IO_TIMEOUT = 5.0
STOP_TIMEOUT = 30.0
_STORE_LOCK = ".daemon.lock"
#: Snapshots that may run at once (each experiment has at most one in flight).
_SNAPSHOT_WORKERS = 32
_NEW_SOCKET_GRACE = 2.0
#: How long a scheduled snapshot waits for its experiment's in-flight lock (a liveness
#: check holds it briefly) before it is counted as skipped.
_BUSY_WAIT = 0.25
#: How many experiments that are no longer tracked ``status`` lists.
LEFT_SHOWN = 20
#: Seconds a config file must be left alone after an edit before it is read, but no
#: more than CONFIG_SETTLE_MAX after the first edit not read yet.
CONFIG_SETTLE = 1.0
CONFIG_SETTLE_MAX = 10.0


@dataclass
class _Tracked:
    """What the daemon knows about one experiment."""

    name: str
    experiment: Experiment
    in_flight: threading.Lock = field(default_factory=threading.Lock)
    snapshots: int = 0
    failures: int = 0
    skips: int = 0
    last_version: int | None = None
    last_step: int | None = None
    last_time: datetime | None = None
    last_error: str | None = None

    def status(self, next_run: datetime | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.experiment.pid,
            "connected": self.experiment.connected,
            "snapshots": self.snapshots,
            "failures": self.failures,
            "skips": self.skips,
            "last_version": self.last_version,
            "last_step": self.last_step,
            "last_snapshot": _iso(self.last_time),
            "next_snapshot": _iso(next_run),
            "last_error": self.last_error,
            "in_flight": self.in_flight.locked(),
        }


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat(timespec="seconds")


class Daemon:
    """One daemon process serving one config. Call :meth:`run` from the main thread."""

    def __init__(
        self, config: configuration.Config, environ: dict[str, str], *, store: Path | None = None
    ) -> None:
        """``store``, when given, is used instead of the config's (``start --store``)."""
        #: What the config file said of the store, runtime directory and allowed uids,
        #: last time it was read: a reload warns when they change, since they only take
        #: effect on a restart (:func:`_places`).
        self._file_places = _places(config)
        if store is not None:
            config = dataclasses.replace(config, store=store)
        self.config = config
        self.store = Store(config.store)
        self.runtime = rendezvous.runtime_dir(config.runtime_dir, environ)
        self.started = datetime.now(UTC)
        self._notifier = Notifier(environ)
        self._events: queue.SimpleQueue[str | int] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        #: Experiments no longer tracked, newest first, for ``status``: a run that
        #: crashed must not just vanish from it.
        self._left: collections.deque[dict[str, Any]] = collections.deque(maxlen=LEFT_SHOWN)
        self._refused: dict[str, float] = {}  # name -> when its socket first refused us
        self._guard = threading.Lock()
        self._budget = Budget(config.daemon.staging_budget)
        self._io_failures = 0
        self._exit_code = 0
        #: Why the last reload failed, shown in the status line until one succeeds.
        self._reload_problem: str | None = None
        # Snapshots run on their own pool, so experiments that hang until their timeout
        # can delay neither the heartbeat nor the rescan on the default pool.
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={
                "default": ThreadPoolExecutor(4),
                "snapshots": ThreadPoolExecutor(_SNAPSHOT_WORKERS),
            },
        )
        self._lock_fd = -1
        #: True when stopping left a snapshot unfinished (the caller must not wait for it).
        self.abandoned = False
        self._control: ControlServer | None = None
        self._watcher: Watcher | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a stop signal or a fatal error, stop. Returns the exit code."""
        self._install_signals()
        try:
            self._start()
            self._loop()
        finally:
            self._stop()
        return self._exit_code

    def _start(self) -> None:
        self._lock_store()
        removed = self.store.recover()
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted commit", removed)
        rendezvous.ensure_private_dir(self.runtime)
        rendezvous.ensure_private_dir(rendezvous.experiments_dir(self.runtime))
        self._control = ControlServer(
            rendezvous.control_socket(self.runtime),
            self.handle,
            allowed_uids=self._allowed_uids(),
            io_timeout=IO_TIMEOUT,
        )
        self._control.start()
        self._start_scheduler()
        self._watcher = Watcher(
            rendezvous.experiments_dir(self.runtime),
            self.config.source,
            on_sockets=lambda: self._events.put("rescan"),
            on_config=lambda: self._events.put("edited"),
        )
        self._watcher.start()
        self._scan()
        self._notifier.notify(READY=1, STATUS=self._status_line())
        log.info(
            "serving store %s, runtime directory %s (pid %d)",
            self.store.root,
            self.runtime,
            os.getpid(),
        )

    def _lock_store(self) -> None:
        path = self.store.root / _STORE_LOCK
        try:
            self.store.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(
                f"cannot use {self.store.root} as the store (the config's 'store', or "
                f"--store): {exc.strerror or exc}; point it at a directory this user may "
                "create and write",
                str(self.store.root),
            ) from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLocked(
                f"another snapshotd daemon is using the store {self.store.root}", str(path)
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _start_scheduler(self) -> None:
        interval = self._notifier.watchdog_interval
        beat = interval / 3 if interval else 10.0
        self._scheduler.add_job(
            self._heartbeat,
            IntervalTrigger(seconds=beat, timezone=UTC),
            id="heartbeat",
            misfire_grace_time=None,
            coalesce=True,
            max_instances=1,
        )
        self._scheduler.add_job(
            lambda: self._events.put("rescan"),
            IntervalTrigger(seconds=self.config.daemon.rescan.total_seconds(), timezone=UTC),
            id="rescan",
            misfire_grace_time=None,
            coalesce=True,
            max_instances=1,
        )
        self._scheduler.start()

    def _loop(self) -> None:
        handlers: dict[str | int, Callable[[], None]] = {
            "rescan": self._scan,
            "edited": self._reload,
            signal.SIGHUP: self._reload,
        }
        # An edit of the config file is acted on once the file has been left alone for
        # CONFIG_SETTLE seconds: one save raises two or three events, and a file written
        # in parts must not be applied half-written (a prune under a half-written keep
        # policy could delete what the whole one keeps). SIGHUP is acted on at once.
        due: float | None = None  # when to read the edited file
        first: float | None = None  # the first edit not read yet
        while True:
            wait = 1.0 if due is None else due - time.monotonic()
            try:
                event = self._events.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if due is None or time.monotonic() < due:
                    continue
                event, due, first = "edited", None, None
            else:
                if event == "edited":
                    # An editor that saves more often than CONFIG_SETTLE still gets its
                    # edits read, CONFIG_SETTLE_MAX after the first one.
                    now = time.monotonic()
                    first = now if first is None else first
                    due = min(now + CONFIG_SETTLE, first + CONFIG_SETTLE_MAX)
                    continue
            if event in (signal.SIGTERM, signal.SIGINT, "fatal"):
                name = event if isinstance(event, str) else signal.Signals(event).name
                log.info("stopping (%s)", name)
                return
            if event == signal.SIGHUP:
                due, first = None, None  # this reload reads the edit too
            try:
                handlers[event]()
            except Exception:  # one failed scan or reload must not stop the daemon
                log.exception("handling %s failed", event)

    def _stop(self) -> None:
        self._notifier.notify(STOPPING=1)
        if self._scheduler.running:
            self._scheduler.pause()
        self._drain(STOP_TIMEOUT)
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        for closer in (self._watcher, self._control):
            if closer is not None:
                _quietly(closer.stop if isinstance(closer, Watcher) else closer.close)
        with self._guard:
            for tracked in self._tracked.values():
                tracked.experiment.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _drain(self, timeout: float) -> None:
        """Wait for snapshots in flight; abandon what is still running at the deadline."""
        deadline = time.monotonic() + timeout
        with self._guard:
            tracked = list(self._tracked.values())
        for item in tracked:
            if not item.in_flight.acquire(timeout=max(0.0, deadline - time.monotonic())):
                log.warning("%s: abandoning the snapshot in flight", item.name)
                self.abandoned = True

    def _install_signals(self) -> None:
        # Handlers only enqueue: logging or taking locks inside a signal handler can
        # deadlock with the interrupted code. The main loop does the work.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: self._events.put(signum))

    def _allowed_uids(self) -> frozenset[int]:
        uids = self.config.daemon.allowed_uids
        return rendezvous.default_allowed_uids() if uids is None else uids

    # -- discovery -----------------------------------------------------------------------

    def _scan(self) -> None:
        """Reconcile tracked experiments with the sockets in the runtime directory."""
        present = self._socket_names()
        with self._guard:
            known = set(self._tracked)
        for name in sorted(present - known):
            self._track(name)
        for name in sorted(known - present):
            self._untrack(name, "its socket is gone")
        for name in sorted(known & present):
            self._untrack_if_gone(name)
        for name in set(self._refused) - present:
            del self._refused[name]

    def _socket_names(self) -> set[str]:
        return rendezvous.registered_names(self.runtime)

    def _track(self, name: str) -> None:
        experiment = Experiment(
            name,
            rendezvous.experiment_socket(self.runtime, name),
            allowed_uids=self._allowed_uids(),
            io_timeout=IO_TIMEOUT,
        )
        try:
            peer = _probe(experiment.path)
        except BlockingIOError:
            peer = None  # listening, but too busy to answer now
        if peer is None:
            self._retry_soon(name)
            return  # stale (its process is gone), or bound but not listening yet
        # Shown by status until the first snapshot connects for real (and checks the uid).
        experiment.pid = peer.pid
        self._refused.pop(name, None)
        tracked = _Tracked(name, experiment, last_version=self._newest_stored(name))
        with self._guard:
            self._tracked[name] = tracked
            for entry in [e for e in self._left if e["name"] == name]:
                self._left.remove(entry)
        self._schedule(name)
        log.info("%s: discovered; %s", name, self._describe_schedule(name))

    def _newest_stored(self, name: str) -> int | None:
        """The newest version of ``name`` in the store (not read, so not known good):
        what ``status`` shows as its last version until this daemon takes one."""
        try:
            numbers = self.store.numbers(name)
        except (StoreError, OSError):
            return None
        return numbers[-1] if numbers else None

    def _retry_soon(self, name: str) -> None:
        """Look again shortly at a socket that refused us when it was new.

        A peer may create its socket file a moment before it listens. Such a socket is
        retried every 0.2 s for two seconds; after that it is taken to be stale and is
        only looked at by the regular rescan.
        """
        first = self._refused.setdefault(name, time.monotonic())
        if time.monotonic() - first < _NEW_SOCKET_GRACE:
            when = datetime.now(UTC) + timedelta(seconds=0.2)
            self._scheduler.add_job(
                lambda: self._events.put("rescan"), DateTrigger(run_date=when, timezone=UTC)
            )

    def _untrack_if_gone(self, name: str) -> None:
        """Drop an experiment whose process has died (its socket file stays behind)."""
        with self._guard:
            tracked = self._tracked.get(name)
        if tracked is None:
            return
        experiment = tracked.experiment
        if not experiment.connected:
            # A connect probe may take up to a second: it must not hold the in-flight
            # lock, or a scheduled snapshot firing meanwhile would find it taken.
            gone = not _listening(experiment.path)
        elif tracked.in_flight.acquire(blocking=False):
            try:
                gone = experiment.peer_closed()  # non-blocking
            finally:
                tracked.in_flight.release()
        else:
            return  # a snapshot in flight will find out for itself
        if gone and not experiment.path.exists():
            # It closed between the scan's listing and this probe: a clean end.
            self._untrack(name, "its socket is gone")
        elif gone:
            self._untrack(name, "its process is gone", crashed=True)

    def _untrack(self, name: str, why: str, *, crashed: bool = False) -> None:
        """Stop serving ``name``; ``crashed``: it ended without closing its registration."""
        with self._guard:
            tracked = self._tracked.pop(name, None)
            if tracked is not None:
                self._left.appendleft(
                    {
                        "name": name,
                        "pid": tracked.experiment.pid,
                        "left": _iso(datetime.now(UTC)),
                        "why": why,
                        "crashed": crashed,
                        "last_version": tracked.last_version,
                    }
                )
        if tracked is None:
            return
        if self._scheduler.get_job(name) is not None:
            self._scheduler.remove_job(name)
        tracked.experiment.close()
        log.info("%s: no longer tracked (%s)", name, why)

    # -- scheduling ----------------------------------------------------------------------

    def _trigger(self, name: str) -> tuple[BaseTrigger, str]:
        schedule, _policy = self.config.for_experiment(name)
        jitter = self.config.daemon.jitter_for(schedule)
        if schedule.cron is not None:
            trigger: BaseTrigger = CronTrigger.from_crontab(schedule.cron, timezone=UTC)
            trigger.jitter = int(jitter) or None
            return trigger, f"cron {schedule.cron!r}"
        assert schedule.every is not None
        seconds = schedule.every.total_seconds()
        every = IntervalTrigger(seconds=seconds, jitter=jitter or None, timezone=UTC)
        return every, f"every {configuration.format_duration(schedule.every)}"

    def _schedule(self, name: str) -> None:
        trigger, _text = self._trigger(name)
        self._scheduler.add_job(
            self._job,
            trigger,
            args=[name],
            id=name,
            executor="snapshots",
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
            max_instances=1,
        )

    def _describe_schedule(self, name: str) -> str:
        return self._trigger(name)[1]

    def _job(self, name: str) -> None:
        with contextlib.suppress(DaemonError):  # already logged and counted
            self.snapshot(name, wait=False)

    def snapshot(self, name: str, *, wait: bool) -> dict[str, Any]:
        """Take one snapshot of ``name`` now (the scheduled job and ``snapshotd snapshot``).

        Raises:
            DaemonError: unknown experiment, one already in flight, or the snapshot failed.
        """
        tracked = self._get(name)
        timeout = self.config.daemon.timeout.total_seconds()
        if not tracked.in_flight.acquire(timeout=timeout + IO_TIMEOUT if wait else _BUSY_WAIT):
            tracked.skips += 1
            log.warning("%s: snapshot skipped: the previous one is still in flight", name)
            raise DaemonError(f"{name}: a snapshot is already in flight", code=exitcode.EXPERIMENT)
        try:
            return self._snapshot_locked(tracked, timeout)
        finally:
            tracked.in_flight.release()

    def _snapshot_locked(self, tracked: _Tracked, timeout: float) -> dict[str, Any]:
        _schedule, policy = self.config.for_experiment(tracked.name)
        try:
            outcome = capture(
                tracked.experiment,
                self.store,
                policy,
                timeout=timeout,
                now=datetime.now(UTC),
                budget=self._budget,
            )
        except (SnapshotSkipped, StagingBudgetExceeded) as exc:
            tracked.skips += 1
            return self._failed(tracked, exc, logging.WARNING)
        except (StoreError, OSError) as exc:
            self._count_io_failure()
            return self._failed(tracked, exc, logging.ERROR)
        except (PeerError, ProtocolError) as exc:
            return self._failed(tracked, exc, logging.WARNING)
        self._io_failures = 0
        tracked.snapshots += 1
        tracked.last_version, tracked.last_step = outcome.version, outcome.step
        tracked.last_time, tracked.last_error = datetime.now(UTC), None
        pruned = f", pruned {list(outcome.pruned)}" if outcome.pruned else ""
        log.info(
            "%s: version %d (step %s, %d bytes%s)%s",
            tracked.name,
            outcome.version,
            outcome.step,
            outcome.nbytes,
            "" if outcome.safe_point else ", no safe point",
            pruned,
        )
        return {"version": outcome.version, "step": outcome.step, "pruned": list(outcome.pruned)}

    def _failed(self, tracked: _Tracked, exc: Exception, level: int) -> dict[str, Any]:
        if level > logging.WARNING or not isinstance(exc, SnapshotSkipped | StagingBudgetExceeded):
            tracked.failures += 1
        tracked.last_error = str(exc)
        log.log(level, "%s: snapshot not taken: %s", tracked.name, exc)
        if isinstance(exc, PeerUnreachable) and not _listening(tracked.experiment.path):
            self._events.put("rescan")
        raise DaemonError(f"snapshot of {tracked.name} not taken: {exc}", code=exitcode.EXPERIMENT)

    def _count_io_failure(self) -> None:
        self._io_failures += 1
        limit = self.config.daemon.max_io_failures
        if self._io_failures >= limit:
            log.critical("%d consecutive I/O failures: exiting so that we are restarted", limit)
            self._exit_code = EXIT_IO_FAILURES
            self._events.put("fatal")

    def _heartbeat(self) -> None:
        self._notifier.notify(WATCHDOG=1, STATUS=self._status_line())

    def _status_line(self) -> str:
        with self._guard:
            count = len(self._tracked)
            taken = sum(t.snapshots for t in self._tracked.values())
        line = f"{count} experiment(s), {taken} snapshot(s) taken"
        if self._reload_problem is not None:
            line += f"; config reload failed, the old config runs: {self._reload_problem}"
        return line

    # -- reload --------------------------------------------------------------------------

    def _reload(self) -> None:
        source = self.config.source
        if source is None:
            return
        self._notifier.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
        try:
            if not source.exists():
                # Not load()'s advice to pass --config: this process already has one.
                raise ConfigError("", f"{source} is gone; put it back, then send SIGHUP")
            new = configuration.load(source)
        except ConfigError as exc:
            self._reload_problem = str(exc)
            log.error("reload failed, keeping the old config: %s", exc)
            self._notifier.notify(READY=1, STATUS=self._status_line())
            return
        self._reload_problem = None
        self._apply(self._keep_places(new))
        self._notifier.notify(READY=1, STATUS=self._status_line())

    def _keep_places(self, new: configuration.Config) -> configuration.Config:
        """``new`` with the store, runtime directory and allowed uids in use: the sockets
        and the sessions already checked against the uids stay as they are until a
        restart."""
        places = _places(new)
        if places != self._file_places:
            self._file_places = places
            log.warning(
                "store, runtime_dir and daemon.allowed_uids changes take effect after a "
                "restart (still serving store %s, runtime directory %s)",
                self.store.root,
                self.runtime,
            )
        daemon = dataclasses.replace(new.daemon, allowed_uids=self.config.daemon.allowed_uids)
        return dataclasses.replace(
            new, store=self.config.store, runtime_dir=self.config.runtime_dir, daemon=daemon
        )

    def _apply(self, new: configuration.Config) -> None:
        old, changed = self.config, configuration.differences(self.config, new)
        if not changed:
            log.info("config reloaded from %s: unchanged", new.source)
            return
        self.config = new
        self._budget.limit = new.daemon.staging_budget
        logging.getLogger().setLevel(new.daemon.log_level.upper())
        if "daemon.rescan" in changed:
            self._scheduler.reschedule_job(
                "rescan",
                trigger=IntervalTrigger(seconds=new.daemon.rescan.total_seconds(), timezone=UTC),
            )
        with self._guard:
            names = list(self._tracked)
        # Only a changed schedule restarts its timer: an edit of anything else (a keep
        # policy) must not put off every experiment's next snapshot by a whole interval.
        for name in names:
            if _timing(old, name) != _timing(new, name):
                self._schedule(name)
        log.info("config reloaded from %s: %s changed", new.source, ", ".join(changed))

    # -- control commands ----------------------------------------------------------------

    def handle(self, verb: str, args: dict[str, Any]) -> Any:
        """Answer one control command (see docs/PROTOCOL.md for the verbs)."""
        if verb == "status":
            return self.status()
        if verb == "store":
            return str(self.store.root)
        if verb == "snapshot":
            return self.snapshot(_name_arg(args), wait=True)
        if verb == "restore":
            return self.restore(_name_arg(args), args.get("version"))
        raise DaemonError(f"unknown command {verb!r}", code=exitcode.USAGE)

    def status(self) -> dict[str, Any]:
        with self._guard:
            tracked = list(self._tracked.values())
            left = [dict(entry) for entry in self._left]
        experiments = []
        for item in tracked:
            job = self._scheduler.get_job(item.name)
            entry = item.status(job.next_run_time if job is not None else None)
            entry["schedule"] = self._describe_schedule(item.name)
            experiments.append(entry)
        return {
            "pid": os.getpid(),
            "started": _iso(self.started),
            "config": str(self.config.source) if self.config.source else None,
            "store": str(self.store.root),
            "runtime_dir": str(self.runtime),
            "io_failures": self._io_failures,
            "staging_in_use": self._budget.in_use,
            "experiments": experiments,
            "left": left,
        }

    def restore(self, name: str, version: Any) -> dict[str, Any]:
        """Push the newest good (or the given) version into the running experiment."""
        tracked = self._get(name)
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise DaemonError("version must be a whole number", code=exitcode.USAGE)
        # Newer versions than the one read were skipped: they failed verification.
        listed = self.store.numbers(name) if version is None else []
        loaded = self.store.read(name, version)
        skipped = [v for v in listed if v > loaded.header.meta.version]
        timeout = self.config.daemon.timeout.total_seconds()
        if not tracked.in_flight.acquire(timeout=timeout):
            raise DaemonError(f"{name}: busy with a snapshot", code=exitcode.EXPERIMENT)
        try:
            tracked.experiment.push(loaded, timeout)
        except (PeerError, ProtocolError) as exc:
            raise DaemonError(
                f"{name}: restore not applied: {exc}", code=exitcode.EXPERIMENT
            ) from exc
        finally:
            tracked.in_flight.release()
        meta = loaded.header.meta
        log.info(
            "%s: restored version %d (step %s) into the running experiment",
            name,
            meta.version,
            meta.step,
        )
        return {"version": meta.version, "step": meta.step, "skipped": skipped}

    def _get(self, name: str) -> _Tracked:
        with self._guard:
            tracked = self._tracked.get(name)
        if tracked is None:
            raise DaemonError(
                f"no experiment named {name!r} is registered", code=exitcode.EXPERIMENT
            )
        return tracked


def _places(config: configuration.Config) -> tuple[object, ...]:
    """What of ``config`` a reload cannot change: the store, the runtime directory, and
    the uids the sockets already check."""
    return (config.store, config.runtime_dir, config.daemon.allowed_uids)


def _timing(config: configuration.Config, name: str) -> tuple[configuration.Schedule, float]:
    """What ``name``'s scheduled job is made from under ``config``: schedule and jitter."""
    schedule, _policy = config.for_experiment(name)
    return schedule, config.daemon.jitter_for(schedule)


def _name_arg(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str):
        raise DaemonError("the command needs an experiment name", code=exitcode.USAGE)
    return name


def _listening(path: Path) -> bool:
    """False for a stale socket at ``path`` (nobody listens) or none; True while a
    process listens there, also one that takes no connections now: a stopped or hung
    experiment's queue fills up with probes and then refuses with EAGAIN at once, and
    such a process is not gone (``kill -CONT`` brings it back)."""
    try:
        return _probe(path) is not None
    except BlockingIOError:
        return True


def _probe(path: Path) -> rendezvous.Peer | None:
    """Who listens at ``path`` (as the kernel saw them at ``listen``), or None if nobody.

    Raises:
        BlockingIOError: someone listens, but their queue of connections is full.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
        return rendezvous.peer_of(probe)
    except BlockingIOError:
        raise
    except OSError:
        return None
    finally:
        probe.close()


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:
        log.exception("while stopping")

"""Run the real daemon, the real command line and real experiments from the tests.

A :class:`Sandbox` is one short temporary directory (AF_UNIX paths must stay under
108 bytes) holding a config, a store and a runtime directory, and every process a test
starts in it. Closing the sandbox SIGKILLs whatever is still running and removes the
directory, so a failing test never leaves a daemon or an experiment behind::

    with Sandbox() as box:
        box.write_config(schedule={"every": "1s"})
        daemon = box.start_daemon()                   # waits until the control socket answers
        run = box.start_experiment("exp", "--print-every", "10")
        wait_until(lambda: box.versions("exp"), 10, "a first snapshot")
        assert daemon.stop() == 0

Every wait here has a deadline and says what it waited for when it runs out.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import yaml

from snapshotd import Store, control, rendezvous
from snapshotd.errors import SnapshotdError
from snapshotd.snapshot import TMP_PREFIX

__all__ = [
    "DEFAULT_DAEMON",
    "LOG_LINE",
    "ROOT",
    "DaemonProcess",
    "ExperimentProcess",
    "FakeSystemd",
    "Notification",
    "Proc",
    "Sandbox",
    "clean_env",
    "short_dir",
    "snapshotd_command",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent
#: The daemon's log format on a terminal: time, level, logger, message; one line each.
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"[A-Za-z_][\w.]*: \S.*$"
)
#: Fast settings for tests: a snapshot request waits 2 s for a safe point, rescan every 1 s.
DEFAULT_DAEMON: dict[str, Any] = {"timeout": "2s", "rescan": "1s"}
#: Variables of the test runner that must not leak into the processes we start.
_STRIPPED = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "XDG_RUNTIME_DIR",
    "LISTEN_FDS",
    "LISTEN_PID",
)

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Call ``check`` until it returns something truthy; return that. Bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def short_dir() -> Path:
    """A fresh private directory with a short path under /tmp."""
    return Path(tempfile.mkdtemp(prefix="sd", dir="/tmp"))


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without snapshotd's or systemd's variables, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SNAPSHOTD_") and key not in _STRIPPED
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def snapshotd_command() -> list[str]:
    """The installed ``snapshotd`` console script, else ``python -m snapshotd``."""
    script = Path(sys.executable).with_name("snapshotd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "snapshotd"]


class _Lines:
    """Collects the lines of a child's stream on a thread; waits for them with deadlines."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in stream:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def snapshot(self) -> list[str]:
        with self._cond:
            return list(self.lines)

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float, start: int = 0
    ) -> tuple[int, re.Match[str]]:
        """The first line at index >= ``start`` that ``pattern`` searches; its index."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    if match:
                        return index, match
                    index += 1
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    why = "the stream closed" if self.closed else f"{timeout:g}s passed"
                    raise AssertionError(f"no line matching {regex.pattern!r} ({why})")
                self._cond.wait(remaining)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Proc:
    """A child process whose stdout and stderr are read line by line on threads."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        stdin: bool = False,
    ) -> None:
        self.command = list(command)
        self.popen = subprocess.Popen(
            self.command,
            cwd=cwd,
            env=clean_env(env),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.popen.stdout is not None
        assert self.popen.stderr is not None
        self.out = _Lines(self.popen.stdout)
        self.err = _Lines(self.popen.stderr)
        self.pid = self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def send(self, sig: int) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """The exit code; AssertionError (after a SIGKILL) if it takes longer than ``timeout``."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"pid {self.pid} did not exit within {timeout:g}s; {self.report()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def close(self) -> None:
        """Make sure it is gone and its pipes are drained (idempotent; for finalizers)."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        self.kill()
        self.out.join(5)
        self.err.join(5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def report(self) -> str:
        """What it said, for assertion messages."""
        out = "\n".join(self.out.snapshot()[-15:])
        err = "\n".join(self.err.snapshot()[-25:])
        return (
            f"\n--- {' '.join(self.command[-4:])} (pid {self.pid}, exit {self.returncode})"
            f"\n--- stdout tail:\n{out}\n--- stderr tail:\n{err}"
        )


class DaemonProcess(Proc):
    """``snapshotd start --config FILE`` running in the foreground."""

    def __init__(
        self,
        config: Path,
        runtime: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path,
        extra: Sequence[str] = (),
    ) -> None:
        """``extra``: more arguments for ``start`` (``--store DIR``)."""
        command = [*snapshotd_command(), "start", "--config", str(config), *extra]
        super().__init__(command, env=env, cwd=cwd)
        self.config = config
        self.runtime = runtime

    @property
    def log(self) -> list[str]:
        return self.err.snapshot()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the daemon answers ``status`` on its control socket."""

        def answers() -> bool:
            if not self.alive:
                raise AssertionError(f"the daemon exited before it was ready; {self.report()}")
            try:
                status = control.call(self.runtime, "status", timeout=2.0)
            except (SnapshotdError, OSError):
                return False
            return isinstance(status, dict) and status.get("pid") == self.pid

        wait_until(answers, timeout, f"the daemon (pid {self.pid}) to answer status")

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        result = control.call(self.runtime, "status", timeout=timeout)
        assert isinstance(result, dict)
        return result

    def experiment(self, name: str) -> dict[str, Any] | None:
        """The status entry of ``name``, or None when the daemon does not track it."""
        for entry in self.status()["experiments"]:
            if entry["name"] == name:
                assert isinstance(entry, dict)
                return entry
        return None

    def wait_log(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, start: int = 0
    ) -> tuple[int, re.Match[str]]:
        try:
            return self.err.wait_for(pattern, timeout, start)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self.report()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the exit code (SIGKILL and fail after ``timeout``)."""
        self.send(sig)
        return self.wait(timeout)


class ExperimentProcess(Proc):
    """``python -m tests.e2e_experiment ...``: reads its one-event-per-line output."""

    def __init__(
        self, command: Sequence[str], name: str, *, env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(command, env=env, cwd=ROOT, stdin=True)
        self.name = name
        self._cursor = 0
        self.start_step: int | None = None

    def wait_for(self, word: str, timeout: float = 20.0) -> list[str]:
        """Wait for the next line (after the last one waited for) starting with ``word``."""
        try:
            index, match = self.out.wait_for(rf"^{re.escape(word)}(?: |$)", timeout, self._cursor)
        except AssertionError as exc:
            raise AssertionError(f"{self.name}: {exc}; {self.report()}") from None
        self._cursor = index + 1
        return match.string.split()[1:]

    def wait_ready(self, timeout: float = 20.0) -> None:
        words = self.wait_for("ready", timeout)
        self.start_step = int(words[1])

    def all(self, word: str) -> list[list[str]]:
        """Every line so far starting with ``word`` (its other words)."""
        return [line.split()[1:] for line in self.out.snapshot() if line.split()[:1] == [word]]

    def last_step(self) -> int | None:
        steps = self.all("step")
        return int(steps[-1][0]) if steps else None

    def finish(self, timeout: float = 15.0) -> int:
        """Close its stdin (it closes its run and exits) and return its exit code."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        return self.wait(timeout)


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram: when it arrived, its fields, and whether the daemon's
    control socket existed at that moment."""

    at: float
    fields: dict[str, str]
    control_existed: bool


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: a datagram socket read on a thread."""

    def __init__(self, path: Path, control: Path) -> None:
        self.path = path
        self._control = control
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(os.fspath(path))
        self._sock.settimeout(0.2)
        self.messages: list[Notification] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": os.fspath(self.path)}

    def _receive(self) -> None:
        while not self._stop:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = [line.split("=", 1) for line in data.decode().split("\n") if "=" in line]
            received = Notification(
                time.monotonic(), {k: v for k, v in lines}, self._control.exists()
            )
            with self._cond:
                self.messages.append(received)
                self._cond.notify_all()

    def wait(
        self, key: str, value: str = "1", *, timeout: float, after: int = 0
    ) -> tuple[int, Notification]:
        """The first notification at index >= ``after`` with ``key=value``; its index."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for index in range(after, len(self.messages)):
                    if self.messages[index].fields.get(key) == value:
                        return index, self.messages[index]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [m.fields for m in self.messages[after:]]
                    raise AssertionError(f"no {key}={value} within {timeout:g}s; got {seen}")
                self._cond.wait(remaining)

    def received(self) -> list[Notification]:
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self._sock.close()


class Sandbox:
    """One test's directory, config, store, runtime directory and child processes."""

    def __init__(self) -> None:
        self.root = short_dir()
        self.config = self.root / "snapshotd.yaml"
        self.store_dir = self.root / "store"
        self.runtime = self.root / "run"
        self._procs: list[Proc] = []
        self._systemd: list[FakeSystemd] = []

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """SIGKILL every process still running, then remove the directory."""
        for proc in reversed(self._procs):
            proc.close()
        self._procs.clear()
        for systemd in self._systemd:
            systemd.close()
        self._systemd.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- config ------------------------------------------------------------------------

    def config_text(
        self,
        *,
        schedule: Any = None,
        keep: Any = None,
        daemon: Any = None,
        experiments: Any = None,
        store: str | None = None,
    ) -> str:
        document: dict[str, Any] = {
            "store": store or str(self.store_dir),
            "runtime_dir": str(self.runtime),
            "schedule": schedule if schedule is not None else {"every": "1s"},
            "keep": keep if keep is not None else {"last": 3},
            "daemon": daemon if daemon is not None else dict(DEFAULT_DAEMON),
        }
        if experiments is not None:
            document["experiments"] = experiments
        return yaml.safe_dump(document, sort_keys=False)

    def write_config(
        self,
        path: Path | None = None,
        *,
        schedule: Any = None,
        keep: Any = None,
        daemon: Any = None,
        experiments: Any = None,
        store: str | None = None,
        atomic: bool = False,
    ) -> Path:
        """Write a config (``runtime_dir`` always explicit); ``atomic``: temp file + rename."""
        target = path or self.config
        text = self.config_text(
            schedule=schedule, keep=keep, daemon=daemon, experiments=experiments, store=store
        )
        if atomic:
            temporary = target.with_name(f".{target.name}.new")
            temporary.write_text(text)
            os.rename(temporary, target)
        else:
            target.write_text(text)
        return target

    # -- processes ---------------------------------------------------------------------

    def fake_systemd(self) -> FakeSystemd:
        """A notification socket in the sandbox (pass its ``env`` to the daemon)."""
        systemd = FakeSystemd(self.root / f"notify{len(self._systemd)}", self.control_socket())
        self._systemd.append(systemd)
        return systemd

    def start_daemon(
        self,
        *,
        config: Path | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 20.0,
        extra: Sequence[str] = (),
    ) -> DaemonProcess:
        daemon = DaemonProcess(
            config or self.config, self.runtime, env=env, cwd=self.root, extra=extra
        )
        self._procs.append(daemon)
        if wait:
            daemon.wait_ready(timeout)
        return daemon

    def experiment_command(self, mode: str, name: str, *options: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tests.e2e_experiment",
            mode,
            str(self.runtime),
            name,
            *options,
        ]

    def start_experiment(
        self,
        name: str,
        *options: str,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 20.0,
    ) -> ExperimentProcess:
        """``tests.e2e_experiment train`` as ``name``; waits for its ``ready`` line."""
        return self._experiment(
            self.experiment_command("train", name, *options), name, env, wait, timeout
        )

    def start_garbage(self, name: str, timeout: float = 20.0) -> ExperimentProcess:
        """A fake experiment that answers the daemon with bytes that are not the protocol."""
        return self._experiment(self.experiment_command("garbage", name), name, None, True, timeout)

    def restore_and_run(
        self, name: str, *options: str, version: int | None = None, timeout: float = 20.0
    ) -> ExperimentProcess:
        """``snapshotd restore NAME [--version V] -- python -m tests.e2e_experiment ...``."""
        chosen = ["--version", str(version)] if version is not None else []
        command = [
            *snapshotd_command(),
            "restore",
            "--config",
            str(self.config),
            *chosen,
            name,
            "--",
            *self.experiment_command("train", name, *options),
        ]
        return self._experiment(command, name, None, True, timeout)

    def _experiment(
        self,
        command: list[str],
        name: str,
        env: Mapping[str, str] | None,
        wait: bool,
        timeout: float,
    ) -> ExperimentProcess:
        proc = ExperimentProcess(command, name, env=env)
        self._procs.append(proc)
        if wait:
            proc.wait_ready(timeout)
        return proc

    def cli(
        self, *args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``snapshotd COMMAND --config <ours> ARGS...``, captured."""
        command, *rest = args
        return subprocess.run(
            [*snapshotd_command(), command, "--config", str(self.config), *rest],
            cwd=self.root,
            env=clean_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # -- looking at the results --------------------------------------------------------

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        result = control.call(self.runtime, "status", timeout=timeout)
        assert isinstance(result, dict)
        return result

    @property
    def store(self) -> Store:
        return Store(self.store_dir)

    def versions(self, name: str) -> list[int]:
        return [v.version for v in self.store.versions(name)]

    def temporaries(self) -> list[Path]:
        """Temporary files of interrupted commits anywhere in the store."""
        if not self.store_dir.is_dir():
            return []
        return sorted(self.store_dir.glob(f"*/{TMP_PREFIX}*"))

    def experiment_socket(self, name: str) -> Path:
        return rendezvous.experiment_socket(self.runtime, name)

    def control_socket(self) -> Path:
        return rendezvous.control_socket(self.runtime)

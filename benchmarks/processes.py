"""The real processes of the live cases: experiment children and ``snapshotd start``.

- :class:`Child` runs :mod:`benchmarks.experiment_child` and talks to it with one JSON
  line per command and per answer (every wait has a deadline; a dead child's log tail
  goes into the error);
- :class:`Daemon` runs the ``snapshotd start`` console script on a config written here
  (JSON is YAML), and waits until it answers ``status`` on its control socket;
- :func:`short_dir`: a private directory with a short path, for runtime directories
  (a Unix socket's path must fit in 108 bytes, the benchmark's directory may not).

Children and daemons get a clean environment: no ``SNAPSHOTD_*`` variables (a stray
``SNAPSHOTD_RESUME`` would change what they do), no systemd variables, and one BLAS
thread, so one training process uses one CPU. Every process started here is recorded
and killed at exit if a case did not stop it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from snapshotd import control
from snapshotd.errors import SnapshotdError

__all__ = ["Child", "Daemon", "child_env", "short_dir"]

ROOT = Path(__file__).resolve().parent.parent
_STRIPPED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
_ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _kill_leftovers() -> None:
    for pid, popen in list(_LIVE.items()):
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)
        _LIVE.pop(pid, None)


atexit.register(_kill_leftovers)


def child_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SNAPSHOTD_") and key not in _STRIPPED
    }
    env.update(dict.fromkeys(_ONE_THREAD, "1"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def short_dir(prefix: str) -> Path:
    """A fresh 0700 directory whose path leaves room for socket names."""
    base = tempfile.gettempdir()
    if len(base) > 40:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Process:
    """A started process with its log file; stopped (and reaped) exactly once."""

    def __init__(self, command: list[str], log: Path, *, stdin: bool) -> None:
        self.log = log
        with open(log, "wb") as stream:
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                command,
                cwd=ROOT,
                env=child_env(),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stderr=stream,
            )
        self.pid = self.popen.pid
        _LIVE[self.pid] = self.popen

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        _LIVE.pop(self.pid, None)

    def died(self, doing: str) -> RuntimeError:
        return RuntimeError(
            f"pid {self.pid} {doing}: exit status {self.popen.poll()}; log tail:\n{_tail(self.log)}"
        )


class Child(_Process):
    """One :mod:`benchmarks.experiment_child` process."""

    def __init__(
        self,
        log: Path,
        *,
        nbytes: int,
        count: int,
        uniform: bool = False,
        name: str = "",
        runtime: Path | None = None,
        references: bool = False,
    ) -> None:
        command = [
            sys.executable,
            "-m",
            "benchmarks.experiment_child",
            "--nbytes",
            str(nbytes),
            "--count",
            str(count),
        ]
        if uniform:
            command.append("--uniform")
        if name:
            command += ["--name", name]
        if runtime is not None:
            command += ["--runtime-dir", str(runtime)]
        if references:
            command.append("--references")
        super().__init__(command, log, stdin=True)
        self._buffer = b""
        self.hello: dict[str, Any] | None = None

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        if self.hello is None:
            self.hello = self.read(timeout)
        return self.hello

    def send(self, op: str, **fields: Any) -> None:
        stdin: IO[bytes] | None = self.popen.stdin
        assert stdin is not None
        try:
            stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
            stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self.died(f"could not take {op!r}") from None

    def request(self, op: str, timeout: float = 120.0, **fields: Any) -> dict[str, Any]:
        self.send(op, **fields)
        return self.read(timeout)

    def read(self, timeout: float) -> dict[str, Any]:
        stdout: IO[bytes] | None = self.popen.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.died(f"did not answer within {timeout:g} s")
            ready, _, _ = select.select([stdout], [], [], remaining)
            if ready:
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    raise self.died("exited")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive:
            with contextlib.suppress(RuntimeError):
                self.send("stop")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill()


def _command() -> list[str]:
    script = Path(sys.executable).with_name("snapshotd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "snapshotd"]


class Daemon(_Process):
    """``snapshotd start`` on a config written into ``folder``."""

    def __init__(self, folder: Path, runtime: Path, settings: Mapping[str, Any]) -> None:
        self.runtime = runtime
        self.store = folder / "store"
        config = {
            "store": str(self.store),
            "runtime_dir": str(runtime),
            "daemon": {"log_level": "warning", "rescan": "2s", "timeout": "60s"},
            **settings,
        }
        self.config = folder / "snapshotd.yaml"
        self.config.write_text(json.dumps(config, indent=1) + "\n")
        super().__init__(
            [*_command(), "start", "--config", str(self.config)], folder / "daemon.log", stdin=False
        )

    def call(self, verb: str, timeout: float = 120.0, **args: Any) -> Any:
        return control.call(self.runtime, verb, args, timeout=timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise self.died("exited before it was ready")
            with contextlib.suppress(SnapshotdError, OSError):
                status = self.call("status", timeout=2.0)
                if isinstance(status, dict) and status.get("pid") == self.pid:
                    return
            if time.monotonic() > deadline:
                raise self.died(f"did not answer status within {timeout:g} s")
            time.sleep(0.02)

    def tracked(self) -> set[str]:
        status = self.call("status", timeout=10.0)
        return {entry["name"] for entry in status["experiments"]}

    def wait_tracked(self, names: set[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not names <= self.tracked():
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(names - self.tracked()))
                raise self.died(f"did not discover {missing} within {timeout:g} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill()

"""A real experiment for the client and transport tests, and the parent's side of it.

Run as ``python -m tests.experiment RUNTIME_DIR NAME [options]`` from the project root.
The child registers ``NAME`` with :func:`snapshotd.register` and runs a deterministic
"training" loop whose state the parent can compute at any point:

- ``K`` arrays (``--arrays``) of ``--size`` elements, with dtypes cycled from
  ``--dtypes``; array ``i`` holds :func:`value` ``(i, t)`` in every element;
- a plain ``int`` counter ``t`` in the same state tree.

A training step adds 1 to every array, one array after the other, in place, and then
sets ``t``. So a copy that mixes two steps (or catches an array half updated) has
arrays that disagree with each other or with ``t``, and :func:`mismatch` says where.
In step mode the loop calls ``run.step(n)`` after the training of step ``n`` and
``t == n`` there; in lock mode the training runs inside ``with run.lock():``; in none
mode there is neither.

Target kinds (``--target``), with the state tree each one gives (:func:`tree_for`):

- ``object``: a class with ``__getstate__``/``__setstate__``: ``([arrays...], t)``;
- ``dict``: a dict of named arrays restored in place: ``{"w00000": array, ..., "t": t}``;
- ``callables``: ``get=``/``set=``: ``{"arrays": [arrays...], "t": t}``.

The child prints one line per event on stdout, flushed at once::

    rss KIB                    resident memory just before register (arrays touched)
    resumed VERSION STEP       register resumed (STEP may be "None"), or "resumed none"
    ready PID                  register returned; the loop starts
    step N                     with --print-steps: run.step(N) returned (or step N done)
    applied N T                the target was set (a push) during step N; its t is T
    grew N                     with --grow-at: array 0 doubled in length before step N
    bad N                      with --bad-at: an unstorable value joined the state
    stalled N                  with --stall-after: no more steps after step N
    error CLASS MESSAGE        register failed (exit 3)
    closed                     run.close() returned (stdin closed, or --steps reached)

Misbehaviours: ``--sleep`` between steps (no safe point for a while), ``--hold-lock``
(lock mode: keep the lock held), ``--stall-after`` (stop stepping, stay alive),
``--bad-at`` (the state becomes unstorable), ``--grow-at`` (a shape change).

The child stops when its stdin closes: it calls ``run.close()``, prints ``closed`` and
exits 0. The parent's side is :class:`Child`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

import snapshotd
from snapshotd import SnapshotdError
from snapshotd.protocol import NEED_DATA, Decoder, Message, encode

KINDS = ("object", "dict", "callables")
MODES = ("step", "lock", "none", "auto")
EXIT_REGISTER_FAILED = 3
ROOT = Path(__file__).resolve().parent.parent

Array = np.ndarray[Any, Any]


def value(i: int, t: int) -> int:
    """What every element of array ``i`` holds when the counter is ``t``."""
    return 1000 * i + t


def dtype_of(i: int, dtypes: Sequence[str]) -> np.dtype[Any]:
    return np.dtype(dtypes[i % len(dtypes)])


def make_arrays(count: int, size: int, t: int, dtypes: Sequence[str]) -> list[Array]:
    """The arrays of a state whose counter is ``t``."""
    return [np.full(size, value(i, t), dtype=dtype_of(i, dtypes)) for i in range(count)]


def array_name(i: int) -> str:
    return f"w{i:05d}"


def tree_for(kind: str, arrays: Sequence[Array], t: int) -> Any:
    """The state tree a target of ``kind`` gives for these arrays and counter."""
    if kind == "object":
        return (list(arrays), t)
    if kind == "dict":
        return {**{array_name(i): a for i, a in enumerate(arrays)}, "t": t}
    if kind == "callables":
        return {"arrays": list(arrays), "t": t}
    raise ValueError(f"unknown target kind {kind!r}")


def unpack(kind: str, tree: Any) -> tuple[list[Array], int]:
    """The arrays and the counter of a state tree of ``kind`` (inverse of :func:`tree_for`)."""
    if kind == "object":
        arrays, t = tree
        return list(arrays), int(t)
    if kind == "dict":
        names = sorted(k for k in tree if k != "t")
        return [tree[k] for k in names], int(tree["t"])
    if kind == "callables":
        return list(tree["arrays"]), int(tree["t"])
    raise ValueError(f"unknown target kind {kind!r}")


def mismatch(arrays: Sequence[Array], t: int) -> str | None:
    """Why ``arrays`` are not the state at counter ``t`` (``None`` when they are)."""
    for i, array in enumerate(arrays):
        expected = value(i, t)
        if array.size and not (array == expected).all():
            found = np.unique(array)[:4].tolist()
            return f"array {i} holds {found}, expected {expected} (t={t})"
    return None


# -- the child ------------------------------------------------------------------------


class Model:
    """The training state, and the object target (pickle hooks) for ``--target object``."""

    def __init__(self, arrays: list[Array], t: int) -> None:
        self.arrays = arrays
        self.t = t
        self.bad = False
        self.current_step = -1

    def __getstate__(self) -> Any:
        if self.bad:
            return (self.arrays, self.t, {"opt": {1, 2}})
        return (self.arrays, self.t)

    def __setstate__(self, state: Any) -> None:
        arrays, t = state
        self.arrays = list(arrays)
        self.t = int(t)
        emit("applied", self.current_step, self.t)


class DictModel:
    """The state as a dict of named arrays (``--target dict``), restored in place."""

    def __init__(self, arrays: list[Array], t: int) -> None:
        self.mapping: dict[str, Any] = {array_name(i): a for i, a in enumerate(arrays)}
        self.mapping["t"] = t
        self.names = [array_name(i) for i in range(len(arrays))]
        self.current_step = -1

    @property
    def arrays(self) -> list[Array]:
        mapping = self.mapping
        return [mapping[name] for name in self.names]

    @property
    def t(self) -> int:
        return int(self.mapping["t"])

    @t.setter
    def t(self, t: int) -> None:
        self.mapping["t"] = t

    def replace(self, i: int, array: Array) -> None:
        self.mapping[self.names[i]] = array


def emit(*words: object) -> None:
    print(*words, flush=True)


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.experiment")
    parser.add_argument("runtime_dir")
    parser.add_argument("name")
    parser.add_argument("--target", choices=KINDS, default="object")
    parser.add_argument("--mode", choices=MODES, default="step")
    parser.add_argument("--arrays", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dtypes", default="float64,int32")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds between steps")
    parser.add_argument("--hold-lock", type=float, default=0.0, help="seconds in the lock")
    parser.add_argument("--steps", type=int, default=0, help="stop after this many (0: never)")
    parser.add_argument("--print-steps", action="store_true")
    parser.add_argument("--stall-after", type=int, default=None)
    parser.add_argument("--grow-at", type=int, default=None)
    parser.add_argument("--bad-at", type=int, default=None)
    parser.add_argument("--store", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--allowed-uid", type=int, action="append", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="child %(message)s")
    dtypes = args.dtypes.split(",")
    arrays = make_arrays(args.arrays, args.size, -1, dtypes)
    model = Model(arrays, -1)
    dict_model = DictModel(arrays, -1) if args.target == "dict" else None
    state: Model | DictModel = dict_model if dict_model is not None else model
    stop = threading.Event()
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    emit("rss", rss_kib())
    try:
        run = _register(args, model, dict_model)
    except SnapshotdError as exc:
        emit("error", type(exc).__name__, str(exc).replace("\n", " "))
        return EXIT_REGISTER_FAILED
    if run.resumed is None:
        emit("resumed", "none")
    else:
        emit("resumed", run.resumed.version, run.resumed.step)
    start = state.t + 1
    emit("ready", os.getpid())
    try:
        _loop(args, run, state, model, dtypes, start, stop)
    finally:
        run.close()
        emit("closed")
    return 0


def _register(
    args: argparse.Namespace, model: Model, dict_model: DictModel | None
) -> snapshotd.Run:
    common: dict[str, Any] = {
        "runtime_dir": args.runtime_dir,
        "consistency": args.mode,
        "resume": args.resume,
        "store": args.store,
        "allowed_uids": frozenset(args.allowed_uid) if args.allowed_uid else None,
    }
    if dict_model is not None:
        return snapshotd.register(args.name, dict_model.mapping, **common)
    if args.target == "callables":

        def get() -> Any:
            state: dict[str, Any] = {"arrays": model.arrays, "t": model.t}
            if model.bad:
                state["bad"] = {1, 2}
            return state

        def set_(state: Any) -> None:
            model.arrays = list(state["arrays"])
            model.t = int(state["t"])
            emit("applied", model.current_step, model.t)

        return snapshotd.register(args.name, get=get, set=set_, **common)
    return snapshotd.register(args.name, model, **common)


def _loop(
    args: argparse.Namespace,
    run: snapshotd.Run,
    state: Model | DictModel,
    model: Model,
    dtypes: Sequence[str],
    start: int,
    stop: threading.Event,
) -> None:
    n = start
    while not stop.is_set():
        state.current_step = n
        if args.grow_at is not None and n == args.grow_at:
            _grow(state, dtypes)
            emit("grew", n)
        if args.bad_at is not None and n == args.bad_at:
            model.bad = True
            if isinstance(state, DictModel):
                state.mapping["bad"] = {1, 2}
            emit("bad", n)
        if args.mode == "lock":
            with run.lock():
                _train(state)
                if args.hold_lock:
                    time.sleep(args.hold_lock)
        else:
            _train(state)
            if args.mode in ("step", "auto"):
                run.step(n)
        if args.print_steps:
            emit("step", n)
        if args.steps and n + 1 - start >= args.steps:
            return
        if args.stall_after is not None and n >= args.stall_after:
            emit("stalled", n)
            stop.wait()
            return
        if args.sleep:
            stop.wait(args.sleep)
        n += 1


def _train(state: Model | DictModel) -> None:
    """One training step: every array moves to the next counter value, in place."""
    t = state.t + 1
    for array in state.arrays:
        array += 1
    state.t = t


def _grow(state: Model | DictModel, dtypes: Sequence[str]) -> None:
    old = state.arrays[0]
    grown = np.full(2 * old.size, old.flat[0] if old.size else value(0, state.t), old.dtype)
    if isinstance(state, DictModel):
        state.replace(0, grown)
    else:
        state.arrays[0] = grown


def _watch_stdin(stop: threading.Event) -> None:
    with contextlib.suppress(OSError, ValueError):
        for _line in sys.stdin:
            pass
    stop.set()


# -- the parent's side ----------------------------------------------------------------


@contextlib.contextmanager
def runtime_dir() -> Iterator[Path]:
    """A fresh, short runtime directory (0700; AF_UNIX paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sd", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours without any SNAPSHOTD_* or XDG_RUNTIME_DIR."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SNAPSHOTD_") and k != "XDG_RUNTIME_DIR"
    }
    env.update(extra or {})
    return env


class ChildFailed(AssertionError):
    """The child did not do what the test waited for."""


class Child:
    """A running ``python -m tests.experiment`` and the lines it printed."""

    def __init__(
        self,
        runtime: Path,
        name: str,
        *options: str,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        timeout: float = 20.0,
    ) -> None:
        self.name = name
        self.runtime = runtime
        command = [sys.executable, "-m", "tests.experiment", str(runtime), name, *options]
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=child_env(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.stderr: list[str] = []
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.pid = self.proc.pid
        self.rss_before: int | None = None
        if wait_ready:
            self.rss_before = int(self.wait_for("rss", timeout)[0])
            self.wait_for("ready", timeout)

    def _pump(self, stream: IO[str], is_stdout: bool) -> None:
        for line in stream:
            if is_stdout:
                self._lines.put(line.rstrip("\n"))
            else:
                self.stderr.append(line.rstrip("\n"))
        if is_stdout:
            self._lines.put(None)

    def wait_for(self, word: str, timeout: float = 20.0) -> list[str]:
        """Wait for the next line starting with ``word``; return its other words."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildFailed(f"no {word!r} line from the child in {timeout}s; {self.report()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)
                raise ChildFailed(f"the child exited before printing {word!r}; {self.report()}")
            self.seen.append(line)
            words = line.split()
            if words and words[0] == word:
                return words[1:]

    def drain(self) -> list[str]:
        """Every line printed so far and not yet consumed."""
        lines: list[str] = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return lines
            if line is None:
                self._lines.put(None)
                return lines
            self.seen.append(line)
            lines.append(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def report(self) -> str:
        code = self.proc.poll()
        tail = "\n".join(self.stderr[-15:])
        return f"exit code {code}; stdout seen {self.seen[-10:]}; stderr tail:\n{tail}"

    def close(self, timeout: float = 10.0) -> int:
        """Close stdin (the child closes its run and exits); kill it if it does not."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self._close_streams()
        return code

    def kill(self) -> None:
        """SIGKILL the child (no cleanup on its side) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._close_streams()

    def _close_streams(self) -> None:
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def memfds(self) -> dict[int, int]:
        """inode -> size of every memfd named by snapshotd that the child holds open.

        By inode: CPython's ``mmap`` keeps a duplicate of the descriptor it maps, so one
        arena is two descriptors.
        """
        found: dict[int, int] = {}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                link = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                if link.startswith("/memfd:snapshotd"):
                    info = os.stat(f"/proc/{self.pid}/fd/{fd}")
                    found[info.st_ino] = info.st_size
        return found

    def memfd_mappings(self) -> int:
        with open(f"/proc/{self.pid}/maps") as maps:
            return sum("memfd:snapshotd" in line for line in maps)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise ChildFailed("no VmRSS")


class RawPeer:
    """One end of a snapshotd socket driven by hand, to play a misbehaving peer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = Decoder()

    @classmethod
    def connect(cls, path: Path, timeout: float = 5.0) -> RawPeer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def send(self, message: Message, *fds: int) -> None:
        self.send_bytes(encode(message), *fds)

    def send_bytes(self, data: bytes, *fds: int) -> None:
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            data = data[sent:]
        if data:  # sending nothing to a peer that already hung up would raise EPIPE
            self.sock.sendall(data)

    def receive(self, timeout: float = 5.0) -> Message:
        """The next whole message (descriptors sent with it are closed)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.decoder.next()
            if message is not NEED_DATA:
                assert isinstance(message, Message)
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no whole message in time")
            self.sock.settimeout(remaining)
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 4)
            for fd in fds:
                os.close(fd)
            if not data:
                raise ConnectionError("the peer closed the connection")
            self.decoder.feed(data)

    def closed_by_peer(self, timeout: float) -> bool:
        """Read and discard until the peer closes (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 4)
            except TimeoutError:
                return False
            except OSError:  # ECONNRESET: closed with our data unread
                return True
            for fd in fds:
                os.close(fd)
            if not data:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def memfd(size: int, fill: int = 0) -> int:
    """A memfd of ``size`` bytes, every byte ``fill``."""
    fd = os.memfd_create("fake-peer", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill and size:
        os.pwrite(fd, bytes([fill]) * size, 0)
    return fd


def open_fds() -> int:
    """How many descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


if __name__ == "__main__":
    sys.exit(main())

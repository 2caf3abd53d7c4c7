"""The experiment side (``snapshotd.register`` and ``Run``), over real Unix sockets.

Some tests register in this process and talk to the run with the daemon's own
:class:`~snapshotd.transport.Experiment`; the rest drive real experiment processes
(tests/experiment.py). What must hold:

- ``register`` takes pickle-hook objects, dicts of arrays and ``get=``/``set=``
  callables, refuses an unstorable state at once with the path inside the state, and
  frees everything on ``close()`` (or leaving its ``with`` block);
- names: invalid ones are refused before anything is created; one live registration
  per name; a socket left by a killed process is reclaimed, a live one never is;
- security: the socket is a path socket (never abstract), 0600, in 0700 directories;
  another uid cannot reach it, and the client drops peers whose uid it does not allow;
  a runtime directory open to others is refused;
- a misbehaving "daemon" is dropped and the experiment keeps serving the real one;
- resume: the newest good snapshot (or a chosen one) is loaded before ``register``
  returns, from ``store=`` or ``SNAPSHOTD_STORE``, on ``resume=`` or ``SNAPSHOTD_RESUME``,
  falling back past a corrupt newest one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import snapshotd
from snapshotd import (
    FallbackWarning,
    InvalidName,
    NoSnapshot,
    PeerUnreachable,
    RestoreMismatch,
    Resumed,
    SnapshotSkipped,
    StateError,
    Store,
    UsageError,
    rendezvous,
)
from snapshotd.arena import Arena, table_of
from snapshotd.capture import persist
from snapshotd.client import MAX_PIECES, _Capture, _piece_size, streams
from snapshotd.format import Layout
from snapshotd.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    Done,
    Filled,
    Hello,
    Push,
    PushDone,
    SnapshotRequest,
    StateReady,
    TensorEntry,
    TensorTable,
    encode,
)
from snapshotd.snapshot import STREAM_UNIT
from snapshotd.target import adapt
from snapshotd.transport import Capture, Experiment
from snapshotd.tree import flatten, unflatten
from tests.experiment import (
    KINDS,
    Child,
    RawPeer,
    make_arrays,
    memfd,
    mismatch,
    open_fds,
    tree_for,
    unpack,
)

IO_TIMEOUT = 0.5
DTYPES = ("float64", "int32")

pytestmark = pytest.mark.usefixtures("no_ambient_configuration")


class Model:
    """Written the way the Theano tutorial recommends: the pickle hooks, arrays inside."""

    def __init__(self, n_in: int = 6, n_out: int = 3) -> None:
        self.W = np.zeros((n_in, n_out))
        self.b = np.zeros(n_out, dtype=np.float32)
        self.epoch = 0

    def __getstate__(self) -> Any:
        return (self.W, self.b, {"epoch": self.epoch})

    def __setstate__(self, state: Any) -> None:
        self.W, self.b, extra = state
        self.epoch = extra["epoch"]


class _BadModel:
    def __getstate__(self) -> Any:
        return (np.ones(3), {"opt": {1, 2}})

    def __setstate__(self, state: Any) -> None:
        raise AssertionError("never restored")


def socket_path(runtime: Path, name: str) -> Path:
    return rendezvous.experiment_socket(runtime, name)


def take(
    runtime: Path, name: str, run: snapshotd.Run | None = None, timeout: float = 5.0
) -> tuple[Any, Capture]:
    """One snapshot through the daemon's side: (the state tree, the capture, released).

    With ``run`` in step mode, this thread plays the training loop calling ``run.step``.
    """
    experiment = Experiment(name, socket_path(runtime, name), io_timeout=IO_TIMEOUT)
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result["capture"] = experiment.snapshot(timeout)
        except Exception as exc:
            result["error"] = exc

    asker = threading.Thread(target=ask)
    asker.start()
    step = 0
    while asker.is_alive():
        if run is not None:
            run.step(step)
            step += 1
        asker.join(0.005)
    try:
        if "error" in result:
            raise result["error"]
        capture: Capture = result["capture"]
        tree = unflatten(capture.structure, {k: v.copy() for k, v in capture.flat().arrays.items()})
        capture.release()
        experiment.done(capture.id)
        return tree, capture
    finally:
        experiment.close()


# -- 1. the register API -------------------------------------------------------------


def test_an_object_with_pickle_hooks_is_snapshotted_as_is(runtime: Path) -> None:
    model = Model()
    model.W[:] = np.arange(18).reshape(6, 3)
    model.b[:] = 0.5
    model.epoch = 7
    with snapshotd.register("hooks", model, runtime_dir=runtime, consistency="none") as run:
        assert run.name == "hooks"
        assert run.resumed is None
        tree, capture = take(runtime, "hooks")
    assert capture.safe_point is False
    W, b, extra = tree
    np.testing.assert_array_equal(W, model.W)
    assert W.dtype == np.float64
    np.testing.assert_array_equal(b, model.b)
    assert b.dtype == np.float32
    assert extra == {"epoch": 7}


def test_a_dict_of_arrays_is_snapshotted(runtime: Path) -> None:
    state = {"W": np.eye(4), "b": np.arange(4, dtype=np.int64), "lr": 0.1, "tag": "x"}
    with snapshotd.register("dict", state, runtime_dir=runtime, consistency="none"):
        tree, _capture = take(runtime, "dict")
    assert sorted(tree) == ["W", "b", "lr", "tag"]
    np.testing.assert_array_equal(tree["W"], np.eye(4))
    np.testing.assert_array_equal(tree["b"], np.arange(4))
    assert (tree["lr"], tree["tag"]) == (0.1, "x")


def test_get_and_set_callables_are_used(runtime: Path) -> None:
    weights = np.linspace(0, 1, 10)
    got: list[Any] = []
    run = snapshotd.register(
        "calls",
        get=lambda: {"weights": weights, "step": 3},
        set=got.append,
        runtime_dir=runtime,
        consistency="none",
    )
    try:
        tree, _capture = take(runtime, "calls")
    finally:
        run.close()
    np.testing.assert_array_equal(tree["weights"], weights)
    assert tree["step"] == 3


def test_step_mode_serves_the_request_at_run_step(runtime: Path) -> None:
    state = {"w": np.ones(5)}
    with snapshotd.register("stepped", state, runtime_dir=runtime, consistency="step") as run:
        assert run.mode() == "step"
        _tree, capture = take(runtime, "stepped", run)
    assert capture.safe_point is True
    assert capture.step is not None
    assert capture.step >= 0


def test_auto_mode_follows_what_the_program_uses(runtime: Path) -> None:
    with snapshotd.register("auto", {"w": np.ones(2)}, runtime_dir=runtime) as run:
        assert run.mode() == "none"
        with run.lock():
            pass
        assert run.mode() == "lock"
        run.step(0)
        assert run.mode() == "step"


@pytest.mark.parametrize(
    ("state", "where"),
    [
        pytest.param({"t": 3, "name": "x"}, "scalars", id="scalars-only"),
        pytest.param({"w": np.zeros(0)}, "empty", id="empty-array"),
        pytest.param({"w": np.zeros((0, 3)), "t": 1}, "empty", id="empty-2d"),
    ],
)
@pytest.mark.parametrize("mode", ["none", "step"])
def test_a_state_without_bytes_snapshots(runtime: Path, state: Any, where: str, mode: str) -> None:
    with snapshotd.register("empty", state, runtime_dir=runtime, consistency=mode) as run:
        stepper = run if mode == "step" else None
        tree, capture = take(runtime, "empty", stepper, timeout=1.0)
        assert capture.nbytes == 0
        assert sorted(tree) == sorted(state)
        # The service is still alive: a second snapshot works too.
        take(runtime, "empty", stepper, timeout=1.0)


@pytest.mark.parametrize(
    ("make", "path"),
    [
        pytest.param(lambda: _BadModel(), "state[1]['opt']", id="object"),
        pytest.param(lambda: {"w": np.ones(2), "f": object()}, "state['f']", id="dict"),
        pytest.param(
            lambda: {"w": np.array([1, "a"], dtype=object)}, "state['w']", id="object-dtype"
        ),
    ],
)
def test_an_unstorable_state_is_refused_at_register(
    runtime: Path, make: Callable[[], Any], path: str
) -> None:
    with pytest.raises(StateError) as caught:
        snapshotd.register("bad", make(), runtime_dir=runtime)
    assert caught.value.path == path
    assert path in str(caught.value)
    assert os.listdir(runtime) == [], "a refused registration left files behind"


def test_an_unstorable_get_callable_is_refused_at_register(runtime: Path) -> None:
    with pytest.raises(StateError, match=r"state\[1\]\[0\]"):
        snapshotd.register("bad", get=lambda: [np.ones(2), [{1, 2}]], runtime_dir=runtime)


def test_a_state_that_becomes_unstorable_is_skipped_with_its_path(runtime: Path) -> None:
    child = Child(runtime, "turns-bad", "--mode", "step", "--sleep", "0.01", "--bad-at", "3")
    try:
        child.wait_for("bad")
        experiment = Experiment("turns-bad", socket_path(runtime, "turns-bad"))
        try:
            with pytest.raises(SnapshotSkipped, match=r"state\[2\]\['opt'\]"):
                experiment.snapshot(2.0)
        finally:
            experiment.close()
        assert child.alive(), child.report()
    finally:
        child.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="nothing"),
        pytest.param({"set": print}, id="set-without-get"),
        pytest.param({"consistency": "sometimes"}, id="bad-mode"),
    ],
)
def test_bad_arguments_are_usage_errors(runtime: Path, kwargs: dict[str, Any]) -> None:
    target = {"w": np.ones(1)} if "consistency" in kwargs else None
    with pytest.raises(UsageError):
        snapshotd.register("args", target, runtime_dir=runtime, **kwargs)


def test_close_frees_everything_and_is_idempotent(runtime: Path) -> None:
    state = {"w": np.ones(1000)}
    with snapshotd.register("warmup", state, runtime_dir=runtime, consistency="none"):
        take(runtime, "warmup")
    before = open_fds()
    for _ in range(5):
        run = snapshotd.register("closing", state, runtime_dir=runtime, consistency="none")
        take(runtime, "closing")
        run.close()
        run.close()
        assert not socket_path(runtime, "closing").exists()
    assert open_fds() == before, "register/close leaked descriptors"
    with snapshotd.register("closing", state, runtime_dir=runtime) as run:
        assert socket_path(runtime, "closing").exists()
    assert not socket_path(runtime, "closing").exists()
    with pytest.raises(PeerUnreachable):
        Experiment("closing", socket_path(runtime, "closing"), io_timeout=IO_TIMEOUT).connect()


# -- 2. names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "-x", ".hidden", "_x", "a/b", "../up", "a b", "x\n", "naïve", "a" * 129, "a\x00b"],
)
def test_invalid_names_are_refused_before_anything_is_created(runtime: Path, name: str) -> None:
    with pytest.raises(InvalidName):
        snapshotd.register(name, {"w": np.ones(1)}, runtime_dir=runtime)
    assert os.listdir(runtime) == []


def test_the_longest_valid_name_works(runtime: Path) -> None:
    name = "a" + "b._-9" * 25 + "zz"
    assert len(name) == 128  # SPEC §2: [A-Za-z0-9][A-Za-z0-9._-]{0,127}
    try:
        run = snapshotd.register(name, {"w": np.ones(1)}, runtime_dir=runtime, consistency="none")
    except UsageError as exc:
        pytest.fail(f"a valid name cannot be registered in any runtime directory: {exc}")
    with run:
        take(runtime, name)


def test_a_name_registered_by_a_live_process_is_refused(runtime: Path) -> None:
    child = Child(runtime, "taken", "--sleep", "0.01")
    try:
        with pytest.raises(UsageError, match="already registered") as caught:
            snapshotd.register("taken", {"w": np.ones(1)}, runtime_dir=runtime)
        assert "'taken'" in str(caught.value)
        assert str(child.pid) in str(caught.value), "the error should name the holder"
        assert socket_path(runtime, "taken").exists(), "the live socket was touched"
        assert child.close() == 0
        assert not socket_path(runtime, "taken").exists()
    finally:
        child.close()
    # Free again once its holder closed the run.
    with snapshotd.register("taken", {"w": np.ones(1)}, runtime_dir=runtime, consistency="none"):
        take(runtime, "taken")


def test_a_socket_left_by_a_killed_process_is_reclaimed(runtime: Path) -> None:
    child = Child(runtime, "crashed", "--sleep", "0.01")
    child.kill()
    path = socket_path(runtime, "crashed")
    assert path.exists(), "SIGKILL cannot clean up: the stale socket should be there"
    with pytest.raises(PeerUnreachable):
        Experiment("crashed", path, io_timeout=IO_TIMEOUT).connect()
    state = {"w": np.full(3, 7.0)}
    with snapshotd.register("crashed", state, runtime_dir=runtime, consistency="none"):
        tree, _capture = take(runtime, "crashed")
    np.testing.assert_array_equal(tree["w"], state["w"])


def test_a_live_socket_is_never_reclaimed(runtime: Path) -> None:
    rendezvous.ensure_private_dir(runtime)
    rendezvous.ensure_private_dir(rendezvous.experiments_dir(runtime))
    path = socket_path(runtime, "alive")
    listener = rendezvous.bind_private(path)  # someone listens, without the name's lock
    try:
        with pytest.raises(UsageError, match="live socket"):
            snapshotd.register("alive", {"w": np.ones(1)}, runtime_dir=runtime)
        assert path.exists()
        peer = RawPeer.connect(path)
        peer.close()
        # The refused registration let go of the name.
        listener.close()
        path.unlink()
        with snapshotd.register("alive", {"w": np.ones(1)}, runtime_dir=runtime):
            pass
    finally:
        listener.close()


# -- 6. security ---------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_socket_and_directories_are_private(runtime: Path) -> None:
    fresh = runtime / "run"  # register creates it
    child = Child(fresh, "private")
    try:
        path = socket_path(fresh, "private")
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert mode_of(path) == 0o600
        assert mode_of(fresh) == 0o700
        assert mode_of(rendezvous.experiments_dir(fresh)) == 0o700
        assert mode_of(rendezvous.experiment_lock(fresh, "private")) == 0o600
    finally:
        child.close()


def test_a_registration_leaves_nothing_in_the_runtime_directory_when_it_ends(
    runtime: Path, tmp_path: Path
) -> None:
    # Runs named by the hour must not fill the runtime directory with lock files.
    with snapshotd.register("tidy", Model(), runtime_dir=runtime):
        assert rendezvous.experiment_lock(runtime, "tidy").exists()
    with pytest.raises(NoSnapshot):  # a failed registration, after the name was claimed
        snapshotd.register("tidy", Model(), runtime_dir=runtime, resume=9, store=tmp_path)
    assert list(rendezvous.experiments_dir(runtime).iterdir()) == []


def test_a_name_is_never_held_twice_while_claims_and_releases_race(runtime: Path) -> None:
    # A release removes the lock file it holds. A claimant that opened that file just
    # before must not count its lock on the removed file as the name's.
    from snapshotd.client import _claim_name, _release_name

    lock = rendezvous.experiment_lock(runtime, "raced")
    guard = threading.Lock()
    holders: list[int] = []
    most = 0
    deadline = time.monotonic() + 2.0

    def contend() -> None:
        nonlocal most
        while time.monotonic() < deadline:
            try:
                claim = _claim_name(runtime, "raced")
            except UsageError:
                continue
            with guard:
                holders.append(claim)
                most = max(most, len(holders))
            time.sleep(0.0002)  # held a moment, as a registration is
            with guard:
                holders.remove(claim)
            _release_name(lock, claim)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 1
    assert not lock.exists()


def unix_sockets() -> dict[int, tuple[int, str]]:
    """inode -> (flags, path) of every Unix socket in this network namespace."""
    sockets = {}
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            path = fields[7] if len(fields) > 7 else ""
            sockets[int(fields[6])] = (int(fields[3], 16), path)
    return sockets


def test_the_experiment_never_binds_an_abstract_socket(runtime: Path) -> None:
    child = Child(runtime, "concrete", "--sleep", "0.01")
    experiment = Experiment("concrete", socket_path(runtime, "concrete"))
    try:
        experiment.connect()  # an accepted connection too, not just the listener
        inodes = set()
        for fd in os.listdir(f"/proc/{child.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                link = os.readlink(f"/proc/{child.pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[len("socket:[") : -1]))
        table = unix_sockets()
        mine = {inode: table[inode] for inode in inodes if inode in table}
        listening = [path for flags, path in mine.values() if flags & 0x10000]  # __SO_ACCEPTCON
        # The socket is bound under a staging name and linked into place once listening,
        # so the kernel reports the staging name; both live in the experiments folder.
        public = socket_path(runtime, "concrete")
        assert len(listening) == 1
        assert os.path.dirname(listening[0]) == str(public.parent)
        assert stat.S_ISSOCK(os.stat(public).st_mode)
        bound = [path for _flags, path in mine.values() if path]
        assert bound
        assert all(path.startswith("/") for path in bound), bound
    finally:
        experiment.close()
        child.close()


PROBE = """
import socket, sys, errno
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
    sys.exit(0)
try:
    sock.sendall(bytes.fromhex(sys.argv[2]))
    print("answered" if sock.recv(4096) else "dropped")
except ConnectionError:
    print("dropped")
"""
NOBODY = 65534


def nobody_python() -> str | None:
    """A Python interpreter that uid 65534 may run (ours may live in a private home)."""
    candidates = [
        os.path.realpath(sys.executable),
        shutil.which("python3"),
        shutil.which("python3", path=os.defpath),  # the system's, outside any private home
    ]
    for candidate in candidates:
        if candidate is None:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                [candidate, "-I", "-c", "pass"],
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                timeout=20,
                check=False,
            )
            if done.returncode == 0:
                return candidate
    return None


def as_nobody(python: str, *args: str) -> str:
    """Run the probe as uid/gid 65534; its one line of output."""
    done = subprocess.run(
        [python, "-I", "-c", PROBE, *args],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as uid 65534")
def test_another_uid_cannot_reach_the_socket(runtime: Path) -> None:
    python = nobody_python()
    if python is None:
        pytest.skip(f"no Python interpreter that uid {NOBODY} may run")
    child = Child(runtime, "guarded", "--sleep", "0.01")
    path = socket_path(runtime, "guarded")
    hello = encode(Hello("daemon", "guarded", 1)).hex()
    folders = (runtime, rendezvous.experiments_dir(runtime))
    try:
        # The directories (0700) stop it first.
        assert as_nobody(python, str(path), hello) == "EACCES"
        # Were the directories opened, the socket's own mode (0600) still stops it.
        for folder in folders:
            os.chmod(folder, 0o711)
        assert as_nobody(python, str(path), hello) == "EACCES"
        # And were the socket opened too, SO_PEERCRED makes the client hang up on it.
        os.chmod(path, 0o666)
        assert as_nobody(python, str(path), hello) == "dropped"
        assert child.alive(), child.report()
    finally:
        for folder in folders:
            os.chmod(folder, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o600)
        child.close()
    assert any("refused a connection" in line for line in child.stderr), child.report()


def test_the_client_drops_peers_of_uids_it_does_not_allow(runtime: Path) -> None:
    stranger = 4242 if os.getuid() != 4242 else 4243
    child = Child(runtime, "picky", "--sleep", "0.01", "--allowed-uid", str(stranger))
    try:
        experiment = Experiment("picky", socket_path(runtime, "picky"), io_timeout=IO_TIMEOUT)
        try:
            with pytest.raises(PeerUnreachable):
                experiment.connect()
        finally:
            experiment.close()
        assert child.alive(), child.report()
    finally:
        code = child.close()
    assert code == 0, child.report()
    assert any(f"uid {os.getuid()}" in line for line in child.stderr), child.report()


@pytest.mark.parametrize(
    ("folder", "mode"),
    [("runtime", 0o755), ("runtime", 0o770), ("runtime", 0o701), ("experiments", 0o777)],
)
def test_a_runtime_dir_open_to_others_is_refused(runtime: Path, folder: str, mode: int) -> None:
    run_dir = runtime / "run"
    experiments = rendezvous.experiments_dir(run_dir)
    experiments.mkdir(parents=True, mode=0o700)
    os.chmod(run_dir, 0o700)
    os.chmod(run_dir if folder == "runtime" else experiments, mode)
    with pytest.raises(UsageError, match="chmod 700"):
        snapshotd.register("open", {"w": np.ones(1)}, runtime_dir=run_dir)
    assert os.listdir(experiments) == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory away")
def test_a_runtime_dir_of_another_user_is_refused(runtime: Path) -> None:
    run_dir = runtime / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=f"uid {NOBODY}"):
        snapshotd.register("theirs", {"w": np.ones(1)}, runtime_dir=run_dir)
    assert os.listdir(run_dir) == []


def test_a_socket_path_too_long_is_a_clear_error(runtime: Path) -> None:
    deep = runtime / ("d" * 100)
    for _ in range(2):  # the second time proves the first let go of the name
        with pytest.raises(UsageError, match="SNAPSHOTD_RUNTIME_DIR"):
            snapshotd.register("long", {"w": np.ones(1)}, runtime_dir=deep)


# -- 5. a misbehaving daemon ---------------------------------------------------------


def one_tensor(nbytes: int) -> TensorTable:
    return TensorTable((TensorEntry("x", "uint8", (nbytes,), 0, nbytes),), nbytes)


def push_with(
    structure: Any, table: TensorTable, make_fds: Callable[[], tuple[int, ...]]
) -> Callable[[RawPeer], None]:
    """A script pushing ``structure``/``table`` with the first of ``make_fds()`` attached."""

    def script(peer: RawPeer) -> None:
        fds = make_fds()
        try:
            peer.send(Push(1, 1, 5, structure, table, 5.0), fds[0])
        finally:
            for fd in fds:
                os.close(fd)

    return script


def frame(body: bytes, version: int = PROTOCOL_VERSION, length: int | None = None) -> bytes:
    """A frame around ``body`` (its header may claim another version or length)."""
    size = len(body) if length is None else length
    return struct.pack("<4sHHI", MAGIC, version, 0, size) + body


#: Broken framing or messages: the experiment must hang up.
BAD_DAEMONS: dict[str, Callable[[RawPeer], None]] = {
    "garbage": lambda peer: peer.send_bytes(b"\x00\xff garbage \r\n" * 50),
    "huge-header": lambda peer: peer.send_bytes(frame(b"", length=0x7FFF_FFFF)),
    "bad-version": lambda peer: peer.send_bytes(frame(b"{}", version=PROTOCOL_VERSION + 1)),
    "hello-with-fd": lambda peer: _hello_with_fd(peer),
    "push-without-fd": lambda peer: peer.send(Push(1, 1, 5, {"a": "x"}, one_tensor(64), 5.0)),
    "request-with-bad-timeout": lambda peer: peer.send_bytes(
        frame(b'{"type":"snapshot","id":1,"timeout":"soon"}')
    ),
}
#: Well-framed pushes of a state that cannot be read: hang up, or answer with an error.
BAD_PUSHES: dict[str, Callable[[RawPeer], None]] = {
    "larger-than-its-memory": push_with({"a": "x"}, one_tensor(1 << 20), lambda: (memfd(64),)),
    "naming-a-missing-tensor": push_with({"a": "nope"}, one_tensor(64), lambda: (memfd(64),)),
    "with-a-bad-structure": push_with({"zz": 1}, one_tensor(64), lambda: (memfd(64),)),
    "in-a-pipe": push_with({"d": []}, TensorTable((), 0), os.pipe),
    "in-unsealed-memory": lambda peer: _push_tree(peer, _fitting_tree(), sealed=False),
}
PUSHED_T = 1_000_000


def _fitting_tree() -> Any:
    """A state the experiment's target would take (its own shape, a distinctive counter)."""
    return tree_for("object", make_arrays(4, 512, PUSHED_T, DTYPES), PUSHED_T)


def _push_tree(peer: RawPeer, tree: Any, *, sealed: bool) -> None:
    """Push ``tree`` as the daemon does, in an arena or in a plain (unsealed) memfd."""
    flat = flatten(tree)
    layout = Layout.plan(flat.arrays)
    if sealed:
        arena = Arena(layout.data_size, "test-push")
        arena.fill(layout, flat.arrays)
        fd = os.dup(arena.fd)
        arena.close()
    else:
        fd = memfd(layout.data_size)
        for tensor in layout.tensors:
            os.pwrite(fd, flat.arrays[tensor.name].tobytes(), tensor.begin)
    try:
        peer.send(Push(1, 1, PUSHED_T, flat.structure, table_of(layout), 5.0), fd)
    finally:
        os.close(fd)


def _hello_with_fd(peer: RawPeer) -> None:
    fd = memfd(64)
    try:
        peer.send(Hello("daemon", "served", os.getpid()), fd)
    finally:
        os.close(fd)


def assert_serves_a_real_daemon(runtime: Path, child: Child, mode: str = "step") -> None:
    """The experiment is alive and a real daemon's snapshots work (and are consistent)."""
    time.sleep(0.05)  # a few steps, so a crash in the training loop would show
    assert child.alive(), f"the experiment died: {child.report()}"
    name = child.name
    experiment = Experiment(name, socket_path(runtime, name), io_timeout=IO_TIMEOUT)
    try:
        for _ in range(3):
            capture = experiment.snapshot(5.0)
            try:
                arrays, t = unpack("object", unflatten(capture.structure, capture.flat().arrays))
                assert t < PUSHED_T, "a refused push was applied"
                if mode == "step":
                    assert t == capture.step
                if mode != "none":  # without a safe point a copy may straddle steps
                    assert mismatch(arrays, t) is None
            finally:
                capture.release()
                experiment.done(capture.id)
    finally:
        experiment.close()


@pytest.mark.parametrize("case", sorted(BAD_DAEMONS))
def test_a_misbehaving_daemon_is_dropped_and_the_real_one_served(runtime: Path, case: str) -> None:
    child = Child(runtime, "served", "--mode", "step", "--arrays", "4", "--size", "512")
    try:
        peer = RawPeer.connect(socket_path(runtime, "served"))
        try:
            BAD_DAEMONS[case](peer)
            assert peer.closed_by_peer(2.0), "the experiment kept talking to a broken daemon"
        finally:
            peer.close()
        assert_serves_a_real_daemon(runtime, child)
    finally:
        code = child.close()
    assert code == 0, child.report()


@pytest.mark.parametrize("case", sorted(BAD_PUSHES))
def test_an_unreadable_push_is_refused_and_the_real_daemon_served(runtime: Path, case: str) -> None:
    child = Child(runtime, "served", "--mode", "step", "--arrays", "4", "--size", "512")
    try:
        peer = RawPeer.connect(socket_path(runtime, "served"))
        try:
            BAD_PUSHES[case](peer)
            try:
                answer = peer.receive(2.0)
            except ConnectionError:
                pass  # hung up: fine
            else:
                assert isinstance(answer, PushDone), answer
                assert answer.id == 1
                assert answer.error, "an unreadable push was reported as applied"
        finally:
            peer.close()
        assert_serves_a_real_daemon(runtime, child)
    finally:
        code = child.close()
    assert code == 0, child.report()
    assert not [line for line in child.seen if line.startswith("applied")]


@pytest.mark.parametrize("mode", ["step", "lock", "none"])
def test_a_push_the_target_refuses_is_reported_and_training_goes_on(
    runtime: Path, mode: str
) -> None:
    options = ("--mode", mode, "--arrays", "4", "--size", "512", "--sleep", "0.002")
    child = Child(runtime, "served", *options)
    try:
        peer = RawPeer.connect(socket_path(runtime, "served"))
        try:
            peer.send(Hello("daemon", "served", os.getpid()))
            assert isinstance(peer.receive(), Hello)
            # A well-formed snapshot of another program: its __setstate__ raises ValueError.
            _push_tree(peer, {"x": np.ones(8)}, sealed=True)
            answer = peer.receive(3.0)
            assert isinstance(answer, PushDone), answer
            assert answer.error, "a push the target refused was reported as applied"
        finally:
            peer.close()
        assert_serves_a_real_daemon(runtime, child, mode)
    finally:
        code = child.close()
    assert code == 0, child.report()


def test_a_daemon_stalling_mid_message_then_leaving_does_not_break_the_experiment(
    runtime: Path,
) -> None:
    child = Child(runtime, "stalled", "--mode", "step")
    path = socket_path(runtime, "stalled")
    try:
        peer = RawPeer.connect(path)
        frame = encode(SnapshotRequest(1, 5.0))
        peer.send_bytes(frame[:10])
        time.sleep(0.3)
        peer.close()
        experiment = Experiment("stalled", path, io_timeout=IO_TIMEOUT)
        try:
            capture = experiment.snapshot(5.0)
            capture.release()
            experiment.done(capture.id)
        finally:
            experiment.close()
    finally:
        code = child.close()
    assert code == 0, child.report()


def test_a_new_daemon_connection_replaces_the_old_one(runtime: Path) -> None:
    child = Child(runtime, "replaced", "--mode", "step")
    path = socket_path(runtime, "replaced")
    try:
        first = Experiment("replaced", path, io_timeout=IO_TIMEOUT)
        second = Experiment("replaced", path, io_timeout=IO_TIMEOUT)
        try:
            first.connect()
            capture = second.snapshot(5.0)
            capture.release()
            second.done(capture.id)
            with pytest.raises(PeerUnreachable):
                first.snapshot(1.0)
        finally:
            first.close()
            second.close()
    finally:
        child.close()


def described_state(peer: RawPeer, request: int) -> StateReady:
    """Ask ``peer``'s experiment for its state; answer done; return the state message."""
    peer.send(SnapshotRequest(request, 5.0))
    message = peer.receive()
    assert isinstance(message, StateReady), message
    peer.send(Done(request, version=request))
    return message


def test_an_unchanged_state_is_described_once_per_connection(runtime: Path) -> None:
    state: dict[str, Any] = {"w": np.arange(4.0), "flag": 1}
    with snapshotd.register("described", state, runtime_dir=runtime, consistency="none"):
        path = socket_path(runtime, "described")
        first = RawPeer.connect(path)
        try:
            first.send(Hello("daemon", "described", os.getpid()))
            assert isinstance(first.receive(), Hello)
            full = described_state(first, 1)
            state["w"][:] = 7  # new values, same description
            again = described_state(first, 2)
            state["flag"] = True  # 1 == True, yet another tree
            changed = described_state(first, 3)
            state["w"] = np.zeros(5)  # another layout
            relaid = described_state(first, 4)
        finally:
            first.sock.close()
        second = RawPeer.connect(path)
        try:
            second.send(Hello("daemon", "described", os.getpid()))
            assert isinstance(second.receive(), Hello)
            fresh = described_state(second, 1)
        finally:
            second.sock.close()

    assert full.table is not None
    assert not full.repeats
    assert again.repeats
    assert again.description == full.description
    assert changed.table is not None
    assert changed.description > full.description
    assert changed.structure == {"d": [["w", {"a": "w"}], ["flag", True]]}
    assert relaid.table is not None
    assert relaid.description > changed.description
    assert relaid.table.size == 40
    assert not fresh.repeats, "a new connection must get the description in full"


# -- 7. resume -----------------------------------------------------------------------


def model_state(value: float, epoch: int) -> tuple[Any, ...]:
    return (np.full((6, 3), value), np.full(3, value, dtype=np.float32), {"epoch": epoch})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store with versions 1 (step 10) and 2 (step 20) of ``resumed``."""
    store = Store(tmp_path / "store")
    assert store.commit("resumed", model_state(1.0, 1), step=10) == 1
    assert store.commit("resumed", model_state(2.0, 2), step=20) == 2
    return store


def test_resume_loads_the_newest_snapshot_before_register_returns(
    runtime: Path, store: Store
) -> None:
    model = Model()
    with snapshotd.register(
        "resumed", model, resume=True, store=store.root, runtime_dir=runtime
    ) as run:
        assert run.resumed == Resumed(2, 20)
    np.testing.assert_array_equal(model.W, np.full((6, 3), 2.0))
    assert model.b.dtype == np.float32
    assert model.epoch == 2
    model.W += 1  # training goes on in the restored arrays
    model.b += 1


def test_resume_fills_the_arrays_the_run_already_has(runtime: Path, store: Store) -> None:
    """No second copy of the state: the model's own arrays take the stored values."""
    model = Model()
    weights, bias = model.W, model.b
    with snapshotd.register(
        "resumed", model, resume=True, in_place=True, store=store.root, runtime_dir=runtime
    ):
        pass
    assert model.W is weights
    assert model.b is bias
    np.testing.assert_array_equal(weights, np.full((6, 3), 2.0))


def test_resume_a_chosen_version(runtime: Path, store: Store) -> None:
    model = Model()
    with snapshotd.register(
        "resumed", model, resume=1, store=str(store.root), runtime_dir=runtime
    ) as run:
        assert run.resumed == Resumed(1, 10)
    assert model.epoch == 1


def test_resume_with_nothing_stored_starts_fresh(runtime: Path, tmp_path: Path) -> None:
    model = Model()
    model.W[:] = 5
    with snapshotd.register(
        "resumed", model, resume=True, store=tmp_path / "empty", runtime_dir=runtime
    ) as run:
        assert run.resumed is None
    np.testing.assert_array_equal(model.W, np.full((6, 3), 5.0))


@pytest.mark.parametrize(("wish", "expected"), [("latest", Resumed(2, 20)), ("1", Resumed(1, 10))])
def test_resume_from_the_environment(
    runtime: Path, store: Store, monkeypatch: pytest.MonkeyPatch, wish: str, expected: Resumed
) -> None:
    monkeypatch.setenv("SNAPSHOTD_RESUME", wish)
    monkeypatch.setenv("SNAPSHOTD_STORE", str(store.root))
    model = Model()
    with snapshotd.register("resumed", model, runtime_dir=runtime) as run:
        assert run.resumed == expected
    assert model.epoch == expected.version


@pytest.mark.parametrize("resume", [True, 2, False])
def test_the_resume_variable_overrides_resume_in_the_code(
    runtime: Path,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    resume: bool | int,
) -> None:
    # `snapshotd restore NAME --version 1 -- CMD` sets it for a script with resume=True.
    monkeypatch.setenv("SNAPSHOTD_RESUME", "1")
    model = Model()
    with snapshotd.register(
        "resumed", model, resume=resume, store=store.root, runtime_dir=runtime
    ) as run:
        assert run.resumed == Resumed(1, 10)
    assert model.epoch == 1


def test_a_bad_resume_variable_is_a_usage_error(
    runtime: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAPSHOTD_RESUME", "newest")
    with pytest.raises(UsageError, match="SNAPSHOTD_RESUME"):
        snapshotd.register("resumed", Model(), store=store.root, runtime_dir=runtime)
    with pytest.raises(UsageError, match="SNAPSHOTD_RESUME"):  # what this launch asked for
        snapshotd.register("resumed", Model(), runtime_dir=runtime, resume=2, store=store.root)


def test_resume_without_a_store_says_where_to_find_one(runtime: Path) -> None:
    with pytest.raises(UsageError, match="SNAPSHOTD_STORE"):
        snapshotd.register("resumed", Model(), resume=True, runtime_dir=runtime)


def test_resume_falls_back_past_a_corrupt_newest_snapshot(runtime: Path, store: Store) -> None:
    newest = store.versions("resumed")[-1].path
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last array
    newest.write_bytes(bytes(data))
    model = Model()
    with (
        pytest.warns(FallbackWarning),
        snapshotd.register(
            "resumed", model, resume=True, store=store.root, runtime_dir=runtime
        ) as run,
    ):
        assert run.resumed == Resumed(1, 10)
    assert model.epoch == 1
    assert [p.name for p in store.quarantined("resumed")] == [newest.name]


def test_resume_ignores_a_stale_control_socket(runtime: Path, store: Store) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(rendezvous.control_socket(runtime)))  # a daemon that died
    dead.close()
    with snapshotd.register(
        "resumed", Model(), resume=True, store=store.root, runtime_dir=runtime
    ) as run:
        assert run.resumed == Resumed(2, 20)


def test_resume_ignores_a_control_socket_that_speaks_garbage(runtime: Path, store: Store) -> None:
    listener = rendezvous.bind_private(rendezvous.control_socket(runtime))
    listener.settimeout(10)

    def answer_garbage() -> None:
        with contextlib.suppress(OSError):
            sock, _addr = listener.accept()
            with sock:
                sock.recv(4096)
                sock.sendall(b"\x00garbage\xff" * 10)

    server = threading.Thread(target=answer_garbage)
    server.start()
    try:
        started = time.monotonic()
        with snapshotd.register(
            "resumed", Model(), resume=True, store=store.root, runtime_dir=runtime
        ) as run:
            assert run.resumed == Resumed(2, 20)
        assert time.monotonic() - started < 2.0
    finally:
        server.join(10)
        listener.close()


def test_resume_of_a_missing_version_fails_and_frees_the_name(runtime: Path, store: Store) -> None:
    with pytest.raises(NoSnapshot):
        snapshotd.register("resumed", Model(), resume=9, store=store.root, runtime_dir=runtime)
    with snapshotd.register("resumed", Model(), runtime_dir=runtime):
        pass


def test_resume_into_a_dict_in_place_with_a_rename(runtime: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.commit("renamed", {"W": np.full(4, 3.0), "b": np.ones(2)}, step=7)
    weights, bias = np.zeros(4), np.zeros(2)
    state = {"weights": weights, "b": bias}
    with snapshotd.register(
        "renamed",
        state,
        resume=True,
        rename={"W": "weights"},
        store=store.root,
        runtime_dir=runtime,
    ) as run:
        assert run.resumed == Resumed(1, 7)
    assert state["weights"] is weights, "a dict target is restored in place"
    np.testing.assert_array_equal(weights, np.full(4, 3.0))
    np.testing.assert_array_equal(bias, np.ones(2))


def test_resume_into_a_dict_that_does_not_fit_changes_nothing(
    runtime: Path, tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    store.commit("renamed", {"W": np.full(4, 3.0), "b": np.ones(2)}, step=7)
    state = {"weights": np.zeros(4), "b": np.zeros(2)}
    with pytest.raises(RestoreMismatch, match="W") as caught:
        snapshotd.register("renamed", state, resume=True, store=store.root, runtime_dir=runtime)
    assert caught.value.missing == ["'weights'"]
    assert caught.value.unexpected == ["'W'"]
    np.testing.assert_array_equal(state["b"], np.zeros(2))
    with snapshotd.register("renamed", state, runtime_dir=runtime):
        pass


@pytest.mark.parametrize(
    ("kind", "how"),
    [(kind, "argument") for kind in KINDS] + [("object", "latest"), ("dict", "version")],
)
def test_a_resumed_experiment_trains_on_from_its_snapshot(
    runtime: Path, tmp_path: Path, kind: str, how: str
) -> None:
    store = Store(tmp_path / "store")
    for t in (40, 50):
        store.commit("trained", tree_for(kind, make_arrays(4, 256, t, DTYPES), t), step=t)
    options = ["--target", kind, "--mode", "step", "--sleep", "0.002"]
    env: dict[str, str] = {}
    if how == "argument":
        options += ["--resume", "--store", str(store.root)]
    else:
        env = {"SNAPSHOTD_RESUME": "latest" if how == "latest" else "1"}
        env["SNAPSHOTD_STORE"] = str(store.root)
    child = Child(runtime, "trained", *options, env=env, wait_ready=False)
    try:
        version, step = (int(word) for word in child.wait_for("resumed"))
        assert (version, step) == ((1, 40) if how == "version" else (2, 50))
        child.wait_for("ready")
        experiment = Experiment("trained", socket_path(runtime, "trained"))
        try:
            capture = experiment.snapshot(5.0)
            try:
                arrays, t = unpack(kind, unflatten(capture.structure, capture.flat().arrays))
                assert capture.step is not None
                assert capture.step > step
                assert t == capture.step
                assert mismatch(arrays, t) is None
            finally:
                capture.release()
                experiment.done(capture.id)
        finally:
            experiment.close()
    finally:
        code = child.close()
    assert code == 0, child.report()


def test_an_experiment_with_nothing_to_resume_reports_none(runtime: Path, tmp_path: Path) -> None:
    options = ("--resume", "--store", str(tmp_path / "nothing"))
    child = Child(runtime, "fresh", *options, wait_ready=False)
    try:
        assert child.wait_for("resumed") == ["none"]
        child.wait_for("ready")
    finally:
        code = child.close()
    assert code == 0, child.report()


def test_a_description_is_repeated_only_to_the_session_that_received_it() -> None:
    """The training thread describes the state while the service thread may switch to a
    new daemon session: a repeat is only ever made for the session of the full one."""
    state = {"w": np.arange(3.0), "n": 1}
    capture = _Capture("unit")
    try:
        first = capture.take(adapt(state), 1, None, True, session=1).message
        again = capture.take(adapt(state), 2, None, True, session=1).message
        other = capture.take(adapt(state), 3, None, True, session=2).message
        back = capture.take(adapt(state), 4, None, True, session=1).message
    finally:
        capture.close()

    assert not first.repeats
    assert again.repeats
    assert again.description == first.description
    assert not other.repeats, "a new session must get the description in full"
    assert other.description > first.description
    assert not back.repeats, "the session of an older description is not the last one"


def test_a_state_taken_again_is_not_walked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    walks: list[object] = []

    def counting_flatten(state: object) -> Any:
        walks.append(state)
        return flatten(state)

    monkeypatch.setattr("snapshotd.client.flatten", counting_flatten)
    state: dict[str, Any] = {f"p{i}": np.full(4, i, np.float32) for i in range(50)}
    state["step"] = 1
    capture = _Capture("unit")
    try:
        for request in range(1, 4):
            state["p0"] += 1  # new values only
            capture.take(adapt(state), request, None, True, session=1)
        assert len(walks) == 1
        state["step"] = 2  # a new value of a scalar: a new structure, still no walk
        changed = capture.take(adapt(state), 4, None, True, session=1).message
        assert changed.structure == flatten(state).structure
        assert len(walks) == 1
        state["step"] = 2.5  # another type: another tree, walked again, once
        capture.take(adapt(state), 5, None, True, session=1)
        assert len(walks) == 2
        state["p1"] = np.zeros(5, np.float32)  # another shape: walked and laid out again
        capture.take(adapt(state), 6, None, True, session=1)
        capture.take(adapt(state), 7, None, True, session=1)
        assert len(walks) == 3
    finally:
        capture.close()


def _same_snapshot(expected: Any, got: Any) -> None:
    want, have = flatten(expected), flatten(got)
    assert have.structure == want.structure
    assert have.kinds == want.kinds
    assert have.arrays.keys() == want.arrays.keys()
    for name, array in want.arrays.items():
        assert have.arrays[name].dtype == array.dtype, name
        assert have.arrays[name].shape == array.shape, name
        assert have.arrays[name].tobytes() == array.tobytes(), name


def test_every_snapshot_holds_the_state_of_its_time(runtime: Path) -> None:
    """Whatever changes between two snapshots (values only, or the tree), each snapshot
    is exactly the state as it was: taken in bulk when the tree is the same, walked
    again when it is not."""
    state: dict[str, Any] = {
        "w": np.arange(12.0).reshape(3, 4),
        "b": np.ones(4, np.float32),
        "opt": [np.zeros(2), {"m": np.int8(1)}],
        "step": 0,
    }
    changes: list[Callable[[], object]] = [
        lambda: state["w"].__iadd__(1),
        lambda: state.update(w=np.asfortranarray(state["w"] * 2)),
        lambda: state.update(w=state["w"][:, ::-1]),
        lambda: state["opt"][1].update(m=np.int8(5)),
        lambda: state.update(b=state["b"].astype(">f4") + 1),
        lambda: state["b"].__iadd__(1),
        lambda: state.update(step=1),
        lambda: state["opt"].append(np.full(3, 7, np.int64)),
        lambda: state.update(w=np.zeros((2, 2))),
        lambda: state.update(w=np.zeros((4,))),
        lambda: state.pop("step"),
    ]
    with snapshotd.register("kept", state, runtime_dir=runtime, consistency="none"):
        tree, _capture = take(runtime, "kept")
        _same_snapshot(state, tree)
        for change in changes:
            change()
            tree, _capture = take(runtime, "kept")
            _same_snapshot(state, tree)


# -- 8. states sent ahead of their copy (PROTOCOL.md, "filled") -----------------------


def small_arrays(count: int, size: int = 128) -> dict[str, np.ndarray[Any, Any]]:
    """``count`` float64 arrays of ``size`` elements, each holding its own index."""
    return {f"p{i:05d}": np.full(size, i, dtype=np.float64) for i in range(count)}


@pytest.mark.parametrize(
    ("count", "size", "expected"),
    [
        pytest.param(4000, 128, True, id="4000-x-1KiB"),
        pytest.param(20_000, 128, True, id="20000-x-1KiB"),
        pytest.param(200, 40_000, False, id="200-x-320KiB"),
        pytest.param(1000, 128, False, id="1MB-in-all"),
        pytest.param(1, 1 << 20, False, id="one-8MiB-array"),
    ],
)
def test_only_states_of_many_small_arrays_stream(count: int, size: int, expected: bool) -> None:
    layout = Layout.plan({f"a{i}": np.zeros(size) for i in range(count)})
    assert streams(layout) is expected


@pytest.mark.parametrize(
    ("count", "size", "dtypes"),
    [
        pytest.param(4000, 4096, ("float64",), id="128MiB"),
        pytest.param(20_000, 256, ("float32", "int32"), id="two-dtypes-in-turn"),
        pytest.param(20_000, 128, ("float64", "int64", "float32", "bool"), id="four-in-turn"),
    ],
)
def test_a_streamed_state_sends_a_bounded_number_of_pieces(
    count: int, size: int, dtypes: tuple[str, ...]
) -> None:
    arrays = {f"a{i}": np.ones(size, dtype=dtypes[i % len(dtypes)]) for i in range(count)}
    layout = Layout.plan(arrays)
    assert streams(layout)
    unit = _piece_size(layout)
    assert unit == max(STREAM_UNIT, -(-layout.data_size // MAX_PIECES))
    arena = Arena(layout.data_size, "bounded")
    try:
        reached = list(arena.filling(layout, [arrays[n] for n in layout.names], unit))
    finally:
        arena.close()
    # Each filled waits in the socket's buffer until the daemon's commit catches up.
    assert len(reached) <= layout.data_size // unit + 1
    assert len(reached) <= MAX_PIECES + 1
    steps = [b - a for a, b in zip([0, *reached], reached, strict=False)]
    assert all(step <= 2 * unit for step in steps)


def test_an_arena_filled_in_pieces_holds_what_one_fill_does() -> None:
    arrays = {**small_arrays(3000), "flags": np.arange(5000, dtype=np.int32)}
    layout = Layout.plan(arrays)
    whole, pieces = Arena(layout.data_size, "whole"), Arena(layout.data_size, "pieces")
    try:
        whole.fill(layout, arrays)
        in_order = [arrays[name] for name in layout.names]
        reached = list(pieces.filling(layout, in_order, STREAM_UNIT))
        assert reached == sorted(set(reached)), "each piece reaches further than the last"
        assert reached[-1] == layout.data_size
        assert len(reached) >= layout.data_size // STREAM_UNIT
        cuts = {t.end for t in layout.tensors}
        assert all(upto in cuts for upto in reached), "pieces end between tensors"
        size = layout.data_size
        assert os.pread(pieces.fd, size, 0) == os.pread(whole.fd, size, 0)
    finally:
        whole.close()
        pieces.close()


def test_a_state_of_many_small_arrays_streams_and_commits_whole(
    runtime: Path, tmp_path: Path
) -> None:
    state = small_arrays(4000)
    store = Store(tmp_path / "store")
    with snapshotd.register("streamed", state, runtime_dir=runtime) as _run:
        experiment = Experiment("streamed", socket_path(runtime, "streamed"), io_timeout=5.0)
        try:
            capture = experiment.snapshot(5.0)
            stream = capture._stream
            assert stream is not None, "the state was not sent ahead of its copy"
            assert stream.filled < capture.nbytes
            with capture.payload() as payload:
                version = store.commit_payload("streamed", payload, step=capture.step)
            del payload
            capture.release()
            experiment.done(capture.id, version)
        finally:
            experiment.close()
    loaded = store.load("streamed", version)
    assert loaded.keys() == state.keys()
    for name, array in state.items():
        np.testing.assert_array_equal(loaded[name], array)


def test_a_copy_that_fails_midway_withdraws_the_state(
    runtime: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy cannot be made to fail partway on demand (the shapes are checked before it
    # starts), so the third piece's copy is made to raise.
    real_fill = Arena._fill_run
    calls = []

    def failing_fill(self: Arena, run: Any, arrays: Any) -> None:
        calls.append(run)
        if len(calls) == 3:
            raise ValueError("the copy broke")
        real_fill(self, run, arrays)

    state = small_arrays(4000)
    store = Store(tmp_path / "store")
    with snapshotd.register("withdrawn", state, runtime_dir=runtime) as _run:
        experiment = Experiment("withdrawn", socket_path(runtime, "withdrawn"), io_timeout=5.0)
        try:
            monkeypatch.setattr(Arena, "_fill_run", failing_fill)
            with pytest.raises(SnapshotSkipped, match=r"withdrew the state.*the copy broke"):
                persist(experiment, store, timeout=5.0, now=datetime.now(UTC))
            assert store.numbers("withdrawn") == []
            assert list((tmp_path / "store" / "withdrawn").glob(".tmp.*")) == []
            monkeypatch.setattr(Arena, "_fill_run", real_fill)
            outcome = persist(experiment, store, timeout=5.0, now=datetime.now(UTC))
        finally:
            experiment.close()
    assert outcome.version == 1, "a withdrawn state takes no version number"
    loaded = store.load("withdrawn", 1)
    for name, array in state.items():
        np.testing.assert_array_equal(loaded[name], array)


def test_an_experiment_stops_copying_once_the_daemon_gives_up(
    runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``done`` that comes before the copy is finished (the daemon refused the state)
    ends the copy: nobody will read the rest, and every ``filled`` sent for it would
    wait in the socket. The copy is slowed down so that the ``done`` comes early."""
    real_fill = Arena._fill_run
    copied = []

    def slow_fill(self: Arena, run: Any, arrays: Any) -> None:
        time.sleep(0.05)
        copied.append(run)
        real_fill(self, run, arrays)

    monkeypatch.setattr(Arena, "_fill_run", slow_fill)
    state = small_arrays(20_000)
    pieces = len(Layout.plan(state).runs_within(STREAM_UNIT))
    stop = threading.Event()
    with snapshotd.register("gives-up", state, runtime_dir=runtime, consistency="step") as run:

        def train() -> None:
            step = 0
            while not stop.is_set():
                run.step(step)
                step += 1
                time.sleep(0.001)

        trainer = threading.Thread(target=train)
        trainer.start()
        peer = RawPeer.connect(socket_path(runtime, "gives-up"))
        try:
            peer.send(Hello("daemon", "gives-up", os.getpid()))
            assert isinstance(peer.receive(), Hello)
            peer.send(SnapshotRequest(1, 5.0))
            state_message = peer.receive()
            assert isinstance(state_message, StateReady)
            assert state_message.filled is not None
            peer.send(Done(1, error="refused by the daemon"))
            later = []
            with contextlib.suppress(TimeoutError):
                while True:
                    later.append(peer.receive(timeout=pieces * 0.05 + 1.0))
        finally:
            stop.set()
            trainer.join(10)
            peer.close()
    assert pieces >= 15
    # A few were on their way while this side read the 3 MB description.
    assert len(later) <= pieces // 3, f"{len(later)} filled of {pieces} pieces after the done"
    assert all(isinstance(m, Filled) for m in later)
    assert len(copied) < pieces

"""The daemon's side of an experiment socket (``snapshotd.transport``), against real peers.

Real experiments are child processes (tests/experiment.py) running a deterministic
training loop over real Unix sockets; the daemon's side is :class:`Experiment` in this
process. Misbehaving experiments are socket servers written here with raw sockets.

What must hold:

- consistency: a snapshot never mixes two steps (step and lock modes, hundreds of
  snapshots of a state mutated as fast as the child can), is marked as taken without a
  safe point in none mode, and a request that meets no safe point in time is skipped
  within about its timeout and never served late;
- the data path: one arena, reused (descriptor and mapping counts constant), re-laid out
  on a shape change, about one copy of the state in the experiment's memory, and 20,000
  small arrays snapshot and commit correctly;
- misbehaving experiments are dropped with a snapshotd exception within their timeout,
  leak no descriptors, and cannot take the daemon down;
- ``SO_PEERCRED``: an experiment of a uid that is not allowed is refused;
- push: a state pushed into a running experiment is applied at its next safe point, or
  not at all when none comes in time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from snapshotd import (
    PeerRefused,
    PeerUnreachable,
    RemoteProtocolError,
    SnapshotSkipped,
    Store,
    rendezvous,
)
from snapshotd.arena import Arena, table_of
from snapshotd.capture import persist
from snapshotd.format import Layout
from snapshotd.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    Done,
    Filled,
    Hello,
    Message,
    Push,
    PushDone,
    Skipped,
    SnapshotRequest,
    StateReady,
    TensorEntry,
    TensorTable,
    encode,
)
from snapshotd.transport import Capture, Experiment, StagingBudgetExceeded
from snapshotd.tree import flatten, unflatten
from tests.experiment import (
    KINDS,
    ROOT,
    Child,
    RawPeer,
    make_arrays,
    memfd,
    mismatch,
    open_fds,
    runtime_dir,
    tree_for,
    unpack,
)

#: Snapshots per consistency run (the contract: at least 200, every one consistent).
SNAPSHOTS = 250
IO_TIMEOUT = 0.5
DTYPES = ("float64", "int32")


def experiment_for(child: Child, *, io_timeout: float = IO_TIMEOUT, **kwargs: Any) -> Experiment:
    path = rendezvous.experiment_socket(child.runtime, child.name)
    return Experiment(child.name, path, io_timeout=io_timeout, **kwargs)


def tree_of(capture: Capture) -> Any:
    return unflatten(capture.structure, capture.flat().arrays)


def finish(experiment: Experiment, capture: Capture) -> None:
    """What the daemon does after writing: release the mapping, free the arena."""
    capture.release()
    experiment.done(capture.id)


def check_consistent(capture: Capture, kind: str) -> int:
    """Assert the capture holds one step's state; return its counter ``t``."""
    arrays, t = unpack(kind, tree_of(capture))
    problem = mismatch(arrays, t)
    assert problem is None, f"snapshot {capture.id} (step {capture.step}) mixes steps: {problem}"
    return t


@contextlib.contextmanager
def child_process(name: str, *options: str) -> Iterator[Child]:
    with runtime_dir() as runtime:
        child = Child(runtime, name, *options)
        try:
            yield child
        finally:
            child.close()


# -- 3. consistency ------------------------------------------------------------------


def snapshot_many(kind: str, mode: str, count: int, arrays: int = 16, size: int = 4096) -> None:
    """``count`` snapshots of a child training as fast as it can; each must be one step."""
    options = ("--target", kind, "--mode", mode, "--arrays", str(arrays), "--size", str(size))
    with child_process("consistent", *options) as child:
        experiment = experiment_for(child)
        last_step, seen = -1, set()
        try:
            for i in range(count):
                capture = experiment.snapshot(5.0)
                try:
                    assert capture.safe_point is True
                    t = check_consistent(capture, kind)
                    seen.add(t)
                    if mode == "step":
                        assert capture.step is not None
                        assert capture.step > last_step, "a snapshot repeated or went back"
                        assert t == capture.step, f"state of step {t} recorded as {capture.step}"
                        last_step = capture.step
                    else:
                        assert capture.step is None
                    if i % 50 == 7:
                        _check_arena_held(experiment, capture, kind)
                finally:
                    finish(experiment, capture)
        finally:
            experiment.close()
        assert child.alive(), child.report()
        assert len(seen) >= count // 10, f"the child trained between only {len(seen)} snapshots"


def _check_arena_held(experiment: Experiment, capture: Capture, kind: str) -> None:
    """While the daemon holds a capture, the experiment neither reuses it nor serves more."""
    with pytest.raises(SnapshotSkipped, match="in flight"):
        experiment.snapshot(2.0)
    time.sleep(0.02)  # the child trains on meanwhile
    check_consistent(capture, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_step_mode_snapshots_never_mix_steps(kind: str) -> None:
    snapshot_many(kind, "step", SNAPSHOTS)


def test_lock_mode_snapshots_never_mix_steps() -> None:
    snapshot_many("object", "lock", SNAPSHOTS)


@pytest.mark.soak
@pytest.mark.parametrize("mode", ["step", "lock"])
@pytest.mark.parametrize("kind", KINDS)
def test_soak_thousands_of_snapshots_never_mix_steps(kind: str, mode: str) -> None:
    snapshot_many(kind, mode, 5000, arrays=64, size=16384)


def test_none_mode_marks_snapshots_as_taken_without_a_safe_point() -> None:
    options = ("--mode", "none", "--sleep", "0.002")
    with child_process("unsafe", *options) as child:
        experiment = experiment_for(child)
        try:
            for _ in range(20):
                capture = experiment.snapshot(5.0)
                try:
                    assert capture.safe_point is False
                    assert capture.step is None
                    arrays, _t = unpack("object", tree_of(capture))
                    assert len(arrays) == 4
                finally:
                    finish(experiment, capture)
        finally:
            experiment.close()


def test_no_safe_point_in_time_is_skipped_and_never_served_late() -> None:
    timeout = 0.3
    options = ("--mode", "step", "--sleep", "1.0", "--print-steps")
    with child_process("sleepy", *options) as child:
        experiment = experiment_for(child)
        try:
            experiment.connect()
            child.wait_for("step")  # the child just stepped; the next step is 1 s away
            started = time.monotonic()
            with pytest.raises(SnapshotSkipped, match="safe point"):
                experiment.snapshot(timeout)
            elapsed = time.monotonic() - started
            assert timeout - 0.05 <= elapsed <= timeout + 0.5, elapsed
            # The next step must not serve the abandoned request: it would arrive as a
            # state for request 1 while we wait for request 2, and break the protocol.
            stepped = int(child.wait_for("step")[0])
            capture = experiment.snapshot(3.0)
            try:
                assert capture.step == stepped + 1
                assert check_consistent(capture, "object") == capture.step
            finally:
                finish(experiment, capture)
        finally:
            experiment.close()


def test_lock_held_past_the_timeout_is_skipped() -> None:
    timeout = 0.3
    options = ("--mode", "lock", "--hold-lock", "1.0")
    with child_process("holder", *options) as child:
        experiment = experiment_for(child)
        try:
            experiment.connect()
            time.sleep(0.1)  # well inside a held lock
            started = time.monotonic()
            with pytest.raises(SnapshotSkipped, match="lock"):
                experiment.snapshot(timeout)
            assert time.monotonic() - started <= timeout + 0.5
        finally:
            experiment.close()


# -- 4. the data path ----------------------------------------------------------------


def test_arena_is_reused_and_relaid_out_when_a_shape_changes() -> None:
    size, count, grow_at = 8192, 8, 150
    options = ("--arrays", str(count), "--size", str(size), "--sleep", "0.003")
    with child_process("arena", *options, "--grow-at", str(grow_at)) as child:
        experiment = experiment_for(child)
        first = make_arrays(count, size, 0, DTYPES)
        nbytes = sum(a.nbytes for a in first)
        try:
            capture = experiment.snapshot(5.0)
            assert capture.step is not None
            assert capture.step < grow_at, "the child was too fast"
            finish(experiment, capture)
            fds = child.fd_count()
            arena = child.memfds()
            assert list(arena.values()) == [nbytes]
            assert child.memfd_mappings() == 1
            grown: dict[int, int] | None = None
            before = after = 0
            while after < 30:
                capture = experiment.snapshot(5.0)
                try:
                    arrays, t = unpack("object", tree_of(capture))
                    assert t == capture.step
                    assert mismatch(arrays, t) is None
                    assert capture.step is not None
                    growing = capture.step >= grow_at
                    assert arrays[0].size == (2 * size if growing else size)
                    del arrays  # views of the mapping (see below)
                finally:
                    finish(experiment, capture)
                assert child.fd_count() == fds, "the experiment's descriptors changed"
                assert child.memfd_mappings() == 1, "an old arena is still mapped"
                # The daemon's side keeps the arena mapped for the next snapshot (and
                # only the arena in use: a replaced one is unmapped).
                assert arenas_mapped_here(child.name) == 1
                if not growing:
                    before += 1
                    assert child.memfds() == arena, "the arena was not reused"
                    continue
                after += 1
                if grown is None:
                    grown = child.memfds()
                    assert list(grown.values()) == [nbytes + first[0].nbytes]
                    assert grown.keys() != arena.keys(), "a grown state needs a new arena"
                assert child.memfds() == grown, "the new arena was not reused"
            assert before >= 20, f"only {before} snapshots before the shape change"
        finally:
            experiment.close()
        assert arenas_mapped_here(child.name) == 0, "a closed connection kept its mapping"


def arenas_mapped_here(name: str) -> int:
    """How many mappings of experiment ``name``'s arenas this process has."""
    with open("/proc/self/maps") as maps:
        return sum(f"memfd:snapshotd-{name} " in line for line in maps)


def test_the_experiment_holds_about_one_copy_of_its_state() -> None:
    mib = 1 << 20
    count, size = 6, mib  # six float64 arrays of 8 MiB: 48 MiB of state
    nbytes = count * size * 8
    options = ("--arrays", str(count), "--size", str(size), "--dtypes", "float64")
    with child_process("memory", *options, "--sleep", "0.005") as child:
        experiment = experiment_for(child)
        try:
            for _ in range(10):
                capture = experiment.snapshot(5.0)
                try:
                    check_consistent(capture, "object")
                finally:
                    finish(experiment, capture)
        finally:
            experiment.close()
        assert child.rss_before is not None
        extra = (child.rss_kib() - child.rss_before) * 1024
        assert list(child.memfds().values()) == [nbytes]
        assert 0.9 * nbytes <= extra <= 1.25 * nbytes + 16 * mib, (
            f"the experiment grew by {extra / mib:.1f} MiB for {nbytes / mib:.0f} MiB of state"
        )


def test_twenty_thousand_small_arrays_snapshot_and_commit(tmp_path: Path) -> None:
    count = 20_000
    options = ("--arrays", str(count), "--size", "128", "--dtypes", "float64")
    with child_process("many", *options) as child:
        experiment = experiment_for(child, io_timeout=10.0)
        store = Store(tmp_path / "store")
        try:
            for i in range(3):
                capture = experiment.snapshot(10.0)
                try:
                    arrays, t = unpack("object", tree_of(capture))
                    assert len(arrays) == count
                    assert all(a.nbytes == 1024 for a in arrays)
                    assert t == capture.step
                    assert mismatch(arrays, t) is None
                    if i == 2:
                        version = store.commit_flat(
                            "many", capture.flat(), step=capture.step, safe_point=True
                        )
                        step = capture.step
                finally:
                    finish(experiment, capture)
        finally:
            experiment.close()
        loaded = store.read("many", version)
        assert loaded.header.meta.step == step
        arrays, t = unpack("object", loaded.tree())
        assert len(arrays) == count
        assert t == step
        assert mismatch(arrays, t) is None


# -- 5. misbehaving experiments ------------------------------------------------------

NAME = "fake"


class FakeExperiment:
    """A socket server at ``NAME``'s experiment path running ``script`` on one connection."""

    def __init__(self, runtime: Path, script: Callable[[RawPeer, FakeExperiment], None]) -> None:
        rendezvous.ensure_private_dir(runtime)
        rendezvous.ensure_private_dir(rendezvous.experiments_dir(runtime))
        self.path = rendezvous.experiment_socket(runtime, NAME)
        self.listener = rendezvous.bind_private(self.path)
        self.listener.settimeout(10.0)
        self.release = threading.Event()
        self.script = script
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            sock, _addr = self.listener.accept()
        except OSError:
            return
        peer = RawPeer(sock)
        try:
            self.script(peer, self)
        except (OSError, ConnectionError, TimeoutError):
            pass  # the daemon side hung up on us: that is the point
        finally:
            peer.close()

    def close(self) -> None:
        self.release.set()
        self.thread.join(10.0)
        assert not self.thread.is_alive()
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@contextlib.contextmanager
def fake_experiment(
    script: Callable[[RawPeer, FakeExperiment], None], **kwargs: Any
) -> Iterator[Experiment]:
    """The daemon's side of a connection to a fake experiment playing ``script``."""
    with runtime_dir() as runtime:
        fake = FakeExperiment(runtime, script)
        experiment = Experiment(NAME, fake.path, io_timeout=IO_TIMEOUT, **kwargs)
        try:
            yield experiment
        finally:
            experiment.close()
            fake.close()


def hello(peer: RawPeer, name: str = NAME, role: str = "experiment") -> None:
    peer.receive()  # the daemon's hello
    peer.send(Hello(role, name, os.getpid()))


def request(peer: RawPeer) -> SnapshotRequest:
    hello(peer)
    message = peer.receive()
    assert isinstance(message, SnapshotRequest)
    return message


def one_tensor(nbytes: int) -> TensorTable:
    return TensorTable((TensorEntry("x", "uint8", (nbytes,), 0, nbytes),), nbytes)


def state(req: SnapshotRequest, nbytes: int) -> StateReady:
    return StateReady(req.id, 1, True, {"a": "x"}, one_tensor(nbytes))


def send_garbage(peer: RawPeer, fake: FakeExperiment) -> None:
    peer.send_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" * 4)
    fake.release.wait(10)


def send_huge_header(peer: RawPeer, fake: FakeExperiment) -> None:
    peer.send_bytes(struct.pack("<4sHHI", MAGIC, PROTOCOL_VERSION, 0, 0xFFFF_FFFF))
    fake.release.wait(10)


def send_wrong_name(peer: RawPeer, fake: FakeExperiment) -> None:
    hello(peer, name="someone-else")
    fake.release.wait(10)


def send_wrong_role(peer: RawPeer, fake: FakeExperiment) -> None:
    hello(peer, role="daemon")
    fake.release.wait(10)


def send_hello_with_descriptor(peer: RawPeer, fake: FakeExperiment) -> None:
    peer.receive()
    fd = memfd(4096)
    try:
        peer.send(Hello("experiment", NAME, os.getpid()), fd)
    finally:
        os.close(fd)
    fake.release.wait(10)


def stall_mid_message(peer: RawPeer, fake: FakeExperiment) -> None:
    frame = encode(Hello("experiment", NAME, os.getpid()))
    peer.send_bytes(frame[: len(frame) // 2])
    fake.release.wait(10)


def trickle(peer: RawPeer, fake: FakeExperiment) -> None:
    frame = encode(Hello("experiment", NAME, os.getpid()))
    for i in range(len(frame)):
        peer.send_bytes(frame[i : i + 1])
        if fake.release.wait(0.05):
            return


def disconnect_mid_message(peer: RawPeer, fake: FakeExperiment) -> None:
    frame = encode(Hello("experiment", NAME, os.getpid()))
    peer.send_bytes(frame[:7])


def stay_silent(peer: RawPeer, fake: FakeExperiment) -> None:
    request(peer)
    fake.release.wait(10)


def state_without_descriptor(peer: RawPeer, fake: FakeExperiment) -> None:
    peer.send(state(request(peer), 4096))
    fake.release.wait(10)


def state_larger_than_its_memory(peer: RawPeer, fake: FakeExperiment) -> None:
    req = request(peer)
    fd = memfd(4096)
    try:
        peer.send(state(req, 1 << 20), fd)
    finally:
        os.close(fd)
    fake.release.wait(10)


def state_in_a_pipe(peer: RawPeer, fake: FakeExperiment) -> None:
    req = request(peer)
    read_end, write_end = os.pipe()
    try:
        peer.send(StateReady(req.id, 1, True, {"d": []}, TensorTable((), 0)), read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    fake.release.wait(10)


def state_for_another_request(peer: RawPeer, fake: FakeExperiment) -> None:
    req = request(peer)
    fd = memfd(4096)
    try:
        peer.send(StateReady(req.id + 41, 1, True, {"a": "x"}, one_tensor(4096)), fd)
    finally:
        os.close(fd)
    fake.release.wait(10)


def state_repeating_an_unknown_description(peer: RawPeer, fake: FakeExperiment) -> None:
    req = request(peer)
    fd = memfd(4096)
    try:
        peer.send(StateReady(req.id, 1, True, None, None, 5), fd)
    finally:
        os.close(fd)
    fake.release.wait(10)


def state_with_an_unknown_tree_node(peer: RawPeer, fake: FakeExperiment) -> None:
    req = request(peer)
    arena = Arena(4096, "fake")
    try:
        tree = {"d": [["x", {"a": "x"}], ["y", {"set": []}]]}
        peer.send(StateReady(req.id, 1, True, tree, one_tensor(4096), 1), arena.fd)
    finally:
        arena.close()
    fake.release.wait(10)


def state_with_two_descriptors(peer: RawPeer, fake: FakeExperiment) -> None:
    req = request(peer)
    fds = [memfd(4096, fill=7), memfd(4096, fill=7)]
    try:
        peer.send(state(req, 4096), *fds)
    finally:
        for fd in fds:
            os.close(fd)
    fake.release.wait(10)


@dataclass(frozen=True)
class Misbehaviour:
    script: Callable[[RawPeer, FakeExperiment], None]
    raises: tuple[type[Exception], ...]
    #: The daemon side must give up within this many seconds.
    within: float
    #: Only at snapshot time (after a good handshake)?
    at_snapshot: bool = False


SNAPSHOT_TIMEOUT = 0.3
MISBEHAVIOURS = {
    "garbage": Misbehaviour(send_garbage, (RemoteProtocolError,), 1.0),
    "huge-header": Misbehaviour(send_huge_header, (RemoteProtocolError,), 1.0),
    "wrong-name": Misbehaviour(send_wrong_name, (RemoteProtocolError,), 1.0),
    "wrong-role": Misbehaviour(send_wrong_role, (RemoteProtocolError,), 1.0),
    "hello-with-fd": Misbehaviour(send_hello_with_descriptor, (RemoteProtocolError,), 1.0),
    "stall": Misbehaviour(stall_mid_message, (PeerUnreachable,), IO_TIMEOUT + 0.5),
    "trickle": Misbehaviour(trickle, (PeerUnreachable,), IO_TIMEOUT + 0.5),
    "disconnect": Misbehaviour(disconnect_mid_message, (RemoteProtocolError, PeerUnreachable), 1.0),
    "silent": Misbehaviour(
        stay_silent, (SnapshotSkipped, PeerUnreachable), SNAPSHOT_TIMEOUT + IO_TIMEOUT + 0.5, True
    ),
    "state-without-fd": Misbehaviour(state_without_descriptor, (RemoteProtocolError,), 1.0, True),
    "arena-too-large": Misbehaviour(
        state_larger_than_its_memory, (RemoteProtocolError,), 1.0, True
    ),
    "state-in-a-pipe": Misbehaviour(state_in_a_pipe, (RemoteProtocolError,), 1.0, True),
    "wrong-request-id": Misbehaviour(state_for_another_request, (RemoteProtocolError,), 1.0, True),
    "unknown-tree-node": Misbehaviour(
        state_with_an_unknown_tree_node, (RemoteProtocolError,), 1.0, True
    ),
    "repeats-an-unknown-description": Misbehaviour(
        state_repeating_an_unknown_description, (RemoteProtocolError,), 1.0, True
    ),
}


@pytest.fixture(scope="module")
def real_child() -> Iterator[Child]:
    """A well-behaved experiment, to show the daemon side still works after each bad one."""
    with child_process("real", "--mode", "step", "--arrays", "8", "--size", "1024") as child:
        yield child


def assert_real_experiment_works(child: Child) -> None:
    experiment = experiment_for(child)
    try:
        capture = experiment.snapshot(5.0)
        try:
            assert check_consistent(capture, "object") == capture.step
        finally:
            finish(experiment, capture)
    finally:
        experiment.close()


@pytest.mark.parametrize("case", sorted(MISBEHAVIOURS))
def test_a_misbehaving_experiment_is_dropped_without_leaks(case: str, real_child: Child) -> None:
    bad = MISBEHAVIOURS[case]
    with runtime_dir() as runtime:
        before = open_fds()
        for _round in range(3):
            fake = FakeExperiment(runtime, bad.script)
            experiment = Experiment(NAME, fake.path, io_timeout=IO_TIMEOUT)
            try:
                if bad.at_snapshot:
                    experiment.connect()
                attempt = (
                    functools.partial(experiment.snapshot, SNAPSHOT_TIMEOUT)
                    if bad.at_snapshot
                    else experiment.connect
                )
                started = time.monotonic()
                with pytest.raises(bad.raises):
                    attempt()
                elapsed = time.monotonic() - started
                assert elapsed <= bad.within, f"took {elapsed:.2f}s to give up"
                assert not experiment.connected, "the misbehaving peer was not dropped"
            finally:
                experiment.close()
                fake.close()
            assert_real_experiment_works(real_child)
        assert open_fds() == before, "descriptors leaked"


def test_extra_descriptors_are_not_leaked(real_child: Child) -> None:
    with runtime_dir() as runtime:
        before = open_fds()
        for _round in range(5):
            fake = FakeExperiment(runtime, state_with_two_descriptors)
            experiment = Experiment(NAME, fake.path, io_timeout=IO_TIMEOUT)
            try:
                with contextlib.suppress(RemoteProtocolError):
                    finish(experiment, experiment.snapshot(SNAPSHOT_TIMEOUT))
            finally:
                experiment.close()
                fake.close()
        assert open_fds() == before, "descriptors leaked"
    assert_real_experiment_works(real_child)


#: The daemon's side in a process of its own: a SIGBUS there must not go unnoticed.
DAEMON_SIDE = """
import sys
from pathlib import Path
from snapshotd import SnapshotdError
from snapshotd.transport import Experiment
experiment = Experiment(sys.argv[1], Path(sys.argv[2]), io_timeout=5.0)
try:
    capture = experiment.snapshot(5.0)
except SnapshotdError as exc:
    print("refused", type(exc).__name__, flush=True)
    sys.exit(0)
print("mapped", flush=True)
sys.stdin.readline()
total = sum(int(a.sum()) for a in capture.flat().arrays.values())
print("read", total, flush=True)
"""


def test_a_peer_shrinking_its_memory_after_handing_it_over_cannot_crash_the_daemon() -> None:
    nbytes = 1 << 20
    shrink = threading.Event()

    def hand_over_then_shrink(peer: RawPeer, fake: FakeExperiment) -> None:
        req = request(peer)
        fd = memfd(nbytes, fill=1)
        try:
            peer.send(state(req, nbytes), fd)
            shrink.wait(10)
            os.ftruncate(fd, 0)
            fake.release.wait(10)
        finally:
            os.close(fd)

    with runtime_dir() as runtime:
        fake = FakeExperiment(runtime, hand_over_then_shrink)
        daemon = subprocess.Popen(
            [sys.executable, "-c", DAEMON_SIDE, NAME, str(fake.path)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert daemon.stdout is not None
            first = daemon.stdout.readline().split()
            if first[:1] == ["mapped"]:
                shrink.set()
                time.sleep(0.1)
                rest, _ = daemon.communicate("go\n", timeout=10)
            else:
                rest, _ = daemon.communicate(timeout=10)
            code = daemon.returncode
        finally:
            shrink.set()
            if daemon.poll() is None:
                daemon.kill()
                daemon.communicate()
            fake.close()
    assert code != -signal.SIGBUS, (
        "the experiment truncated its memfd after handing it over and the daemon died of "
        "SIGBUS reading it (an unsealed memfd was accepted)"
    )
    assert code == 0, (first, rest)


# -- SO_PEERCRED ---------------------------------------------------------------------


def test_an_experiment_of_a_uid_not_allowed_is_refused(real_child: Child) -> None:
    stranger = 4242 if os.getuid() != 4242 else 4243
    before = open_fds()
    experiment = experiment_for(real_child, allowed_uids={stranger})
    try:
        with pytest.raises(PeerRefused, match=f"uid {os.getuid()}"):
            experiment.connect()
        assert not experiment.connected
    finally:
        experiment.close()
    assert open_fds() == before
    assert_real_experiment_works(real_child)


# -- 8. push -------------------------------------------------------------------------

PUSHED_T = 1_000_000


def pushed_state(store: Store, name: str, kind: str, count: int, size: int) -> None:
    tree = tree_for(kind, make_arrays(count, size, PUSHED_T, DTYPES), PUSHED_T)
    store.commit(name, tree, step=PUSHED_T)


@pytest.mark.parametrize("kind", KINDS)
def test_a_push_is_applied_at_the_next_safe_point(kind: str, tmp_path: Path) -> None:
    count, size = 4, 64
    options = ("--target", kind, "--mode", "step", "--sleep", "0.005")
    with child_process("pushed", *options, "--arrays", str(count), "--size", str(size)) as child:
        store = Store(tmp_path / "store")
        pushed_state(store, "pushed", kind, count, size)
        experiment = experiment_for(child)
        try:
            capture = experiment.snapshot(5.0)
            assert capture.step is not None
            before = capture.step
            assert check_consistent(capture, kind) == before
            finish(experiment, capture)

            experiment.push(store.read("pushed"), 5.0)

            capture = experiment.snapshot(5.0)
            try:
                t = check_consistent(capture, kind)
                assert capture.step is not None
                trained = capture.step - before  # at most this many steps since the push
                assert PUSHED_T < t <= PUSHED_T + trained, (t, capture.step, before)
                if kind != "dict":  # the object and callables report when they were set
                    applied_at, applied_t = map(int, child.wait_for("applied"))
                    assert applied_t == PUSHED_T
                    assert t == PUSHED_T + capture.step - applied_at
                version = store.commit_flat("pushed", capture.flat(), step=capture.step)
            finally:
                finish(experiment, capture)
        finally:
            experiment.close()
        arrays, persisted = unpack(kind, store.read("pushed", version).tree())
        assert persisted == t
        assert mismatch(arrays, t) is None


def test_a_push_without_a_safe_point_in_time_is_skipped_and_never_applied(
    tmp_path: Path,
) -> None:
    timeout = 0.3
    options = ("--mode", "step", "--sleep", "1.0", "--print-steps")
    with child_process("refused", *options) as child:
        store = Store(tmp_path / "store")
        # A large state: the experiment copies it before its clock for the push starts.
        pushed_state(store, "refused", "object", 4, 1 << 20)
        experiment = experiment_for(child)
        try:
            experiment.connect()
            child.wait_for("step")
            started = time.monotonic()
            with pytest.raises(SnapshotSkipped):
                experiment.push(store.read("refused"), timeout)
            assert time.monotonic() - started <= timeout + 0.5
            child.wait_for("step")
            stepped = int(child.wait_for("step")[0])
            capture = experiment.snapshot(3.0)
            try:
                assert capture.step == stepped + 1
                assert check_consistent(capture, "object") == capture.step, "the push was applied"
            finally:
                finish(experiment, capture)
        finally:
            experiment.close()
        assert not [line for line in child.seen if line.startswith("applied")]


def _push_then_hang_up(child: Child, timeout: float) -> None:
    """Push a state as a daemon would, then disconnect before any answer."""
    peer = RawPeer.connect(rendezvous.experiment_socket(child.runtime, child.name))
    try:
        peer.send(Hello("daemon", child.name, os.getpid()))
        assert isinstance(peer.receive(), Hello)
        arrays = make_arrays(4, 256, PUSHED_T, DTYPES)
        tree = tree_for("object", arrays, PUSHED_T)
        flat = flatten(tree)
        layout = Layout.plan(flat.arrays)
        arena = Arena(layout.data_size, "test-push")
        try:
            arena.fill(layout, flat.arrays)
            push = Push(99, 1, PUSHED_T, flat.structure, table_of(layout), timeout)
            peer.send(push, arena.fd)
        finally:
            arena.close()
    finally:
        peer.close()


def test_an_expired_push_from_a_gone_daemon_is_not_answered_on_the_next_connection() -> None:
    options = ("--mode", "step", "--sleep", "1.5", "--print-steps")
    with child_process("hangup", *options) as child:
        child.wait_for("step")
        _push_then_hang_up(child, timeout=0.4)
        experiment = experiment_for(child)
        try:
            experiment.connect()
            # The push expires while we wait; its answer belongs to the old connection.
            capture = experiment.snapshot(3.0)
            try:
                assert check_consistent(capture, "object") == capture.step
            finally:
                finish(experiment, capture)
        finally:
            experiment.close()


def test_a_push_from_a_gone_daemon_is_not_applied() -> None:
    options = ("--mode", "step", "--sleep", "0.3", "--print-steps")
    with child_process("orphan", *options) as child:
        child.wait_for("step")
        _push_then_hang_up(child, timeout=5.0)
        time.sleep(1.0)  # three safe points pass
        child.drain()
        assert not [line for line in child.seen if line.startswith("applied")], (
            "a push whose daemon hung up was applied anyway"
        )


def test_a_repeated_description_reuses_the_one_received_and_checked() -> None:
    """The experiment describes its state once; later states repeat the number. A
    number the connection never received is a protocol error, not a guess."""

    def script(peer: RawPeer, fake: FakeExperiment) -> None:
        arena = Arena(4096, "fake")
        try:
            first = request(peer)
            peer.send(StateReady(first.id, 1, True, {"a": "x"}, one_tensor(4096), 3), arena.fd)
            assert isinstance(peer.receive(), Done)
            second = peer.receive()
            assert isinstance(second, SnapshotRequest)
            peer.send(StateReady(second.id, 2, True, None, None, 3), arena.fd)
            assert isinstance(peer.receive(), Done)
            third = peer.receive()
            assert isinstance(third, SnapshotRequest)
            peer.send(StateReady(third.id, 3, True, None, None, 4), arena.fd)
            fake.release.wait(10)
        finally:
            arena.close()

    with fake_experiment(script) as experiment:
        captures = []
        for _ in range(2):
            capture = experiment.snapshot(5.0)
            captures.append((capture.step, capture.structure, capture.layout))
            capture.release()
            experiment.done(capture.id, 1)
        with pytest.raises(RemoteProtocolError, match="repeats description 4"):
            experiment.snapshot(5.0)
        assert not experiment.connected
    (step1, tree1, layout1), (step2, tree2, layout2) = captures
    assert (step1, step2) == (1, 2)
    assert tree1 == {"a": "x"}
    assert tree2 is tree1
    assert layout2 is layout1


def test_a_table_in_any_order_is_committed_in_offset_order(tmp_path: Path) -> None:
    """PROTOCOL.md lets a table list its entries in any order; the file must still hold
    each tensor's own bytes (the daemon writes the arena in offset order)."""
    b = np.array([2.5], dtype=np.float64)
    w = np.array([1.5, -3.0], dtype=np.float32)
    structure = {"d": [["W", {"a": "W"}], ["b", {"a": "b"}]]}
    table = TensorTable(
        (TensorEntry("W", "float32", (2,), 8, 16), TensorEntry("b", "float64", (1,), 0, 8)), 16
    )

    def script(peer: RawPeer, fake: FakeExperiment) -> None:
        arena = Arena(16, "fake")
        try:
            os.pwrite(arena.fd, b.tobytes() + w.tobytes(), 0)
            req = request(peer)
            peer.send(StateReady(req.id, 7, True, structure, table, 1), arena.fd)
            assert isinstance(peer.receive(), Done)
            fake.release.wait(10)
        finally:
            arena.close()

    store = Store(tmp_path / "store")
    with fake_experiment(script) as experiment:
        outcome = persist(experiment, store, timeout=5.0, now=datetime.now(UTC))

    loaded = store.load(NAME, outcome.version)
    np.testing.assert_array_equal(loaded["W"], w)
    np.testing.assert_array_equal(loaded["b"], b)


def test_a_connection_closed_mid_snapshot_leaves_the_capture_readable(tmp_path: Path) -> None:
    # The daemon's rescan may close a connection from another thread while a scheduled
    # commit still reads the capture: the shared memory must stay mapped until it is done.
    store = Store(tmp_path)
    with child_process("midclose", "--arrays", "4", "--size", "1024") as child:
        experiment = experiment_for(child)
        try:
            capture = experiment.snapshot(5.0)
            experiment.close()
            with capture.payload() as payload:
                version = store.commit_payload("midclose", payload, step=capture.step)
            del payload  # it holds views of the shared memory
            capture.release()
        finally:
            experiment.close()
        assert arenas_mapped_here(child.name) == 0
    arrays, t = unpack("object", store.load("midclose", version))
    assert mismatch(arrays, t) is None
    assert t == capture.step


def test_an_arena_refused_by_the_staging_budget_is_not_kept_mapped() -> None:
    size, count, grow_at = 8192, 2, 20
    options = ("--arrays", str(count), "--size", str(size), "--sleep", "0.003")
    nbytes = sum(a.nbytes for a in make_arrays(count, size, 0, DTYPES))
    with child_process("budget", *options, "--grow-at", str(grow_at)) as child:
        experiment = experiment_for(child, staging_budget=nbytes)
        try:
            refused = False
            for _ in range(200):
                try:
                    finish(experiment, experiment.snapshot(5.0))
                except StagingBudgetExceeded:
                    refused = True
                    break
                assert arenas_mapped_here(child.name) == 1
            assert refused, "the state never outgrew the budget"
            assert arenas_mapped_here(child.name) == 0, "the outgrown arena stayed mapped"
        finally:
            experiment.close()


# -- 7. states sent ahead of their copy (PROTOCOL.md, "filled") -----------------------

MiB = 1 << 20
#: Four tensors of 1 MiB, the pieces a streamed commit goes in.
PIECES = 4
STREAMED_TABLE = TensorTable(
    tuple(TensorEntry(f"t{i}", "uint8", (MiB,), i * MiB, (i + 1) * MiB) for i in range(PIECES)),
    PIECES * MiB,
)
STREAMED_TREE = {"d": [[f"t{i}", {"a": f"t{i}"}] for i in range(PIECES)]}


def streamed_state(req: SnapshotRequest, filled: int, description: int = 1) -> StateReady:
    return StateReady(req.id, 5, True, STREAMED_TREE, STREAMED_TABLE, description, filled)


def fill_piece(arena: Arena, index: int) -> None:
    """Tensor ``index`` gets the byte value ``index + 1`` (an unfilled arena holds zeros)."""
    os.pwrite(arena.fd, bytes([index + 1]) * MiB, index * MiB)


def commit_from(
    script: Callable[[RawPeer, FakeExperiment], None], store: Store, **kwargs: Any
) -> tuple[Any, bool]:
    """Run ``persist`` once against a fake experiment playing ``script``: the outcome
    or the exception raised, and whether the connection was still open after it."""
    with fake_experiment(script, **kwargs) as experiment:
        try:
            result: Any = persist(experiment, store, timeout=5.0, now=datetime.now(UTC))
        except Exception as exc:
            result = exc
        return result, experiment.connected


def streaming(
    go_on: Callable[[RawPeer, Arena, SnapshotRequest], bool], answers: list[Any] | None = None
) -> Callable[[RawPeer, FakeExperiment], None]:
    """A fake experiment that answers a request with its first MiB filled, then plays
    ``go_on`` (False: hang up), then keeps the daemon's answer in ``answers``."""

    def script(peer: RawPeer, fake: FakeExperiment) -> None:
        arena = Arena(PIECES * MiB, "fake")
        try:
            req = request(peer)
            fill_piece(arena, 0)
            peer.send(streamed_state(req, MiB), arena.fd)
            if not go_on(peer, arena, req):
                return
            if answers is not None:
                answers.append(peer.receive())
            fake.release.wait(10)
        finally:
            arena.close()

    return script


def test_a_streamed_state_is_written_only_as_far_as_it_is_filled(tmp_path: Path) -> None:
    """The daemon writes each piece once the experiment says it is there: a piece read
    before its ``filled`` would be stored as zeros, and the file would still verify."""

    def fill_slowly(peer: RawPeer, arena: Arena, req: SnapshotRequest) -> bool:
        for index in range(1, PIECES):
            time.sleep(0.05)  # the daemon has the first pieces by now, not this one
            fill_piece(arena, index)
            peer.send(Filled(req.id, (index + 1) * MiB))
        return True

    answers: list[Any] = []
    store = Store(tmp_path / "store")
    outcome, connected = commit_from(streaming(fill_slowly, answers), store)
    assert not isinstance(outcome, Exception), outcome
    loaded = store.load(NAME, outcome.version)
    for index in range(PIECES):
        assert set(loaded[f"t{index}"].tobytes()) == {index + 1}, f"piece {index} not waited for"
    assert answers == [Done(1, outcome.version)]
    assert connected


def temporaries_in(store: Store) -> list[str]:
    run = store.root / NAME
    return sorted(p.name for p in run.glob(".tmp.*")) if run.exists() else []


def test_a_state_withdrawn_midway_is_abandoned_without_a_trace(tmp_path: Path) -> None:
    def withdraw(peer: RawPeer, arena: Arena, req: SnapshotRequest) -> bool:
        peer.send(Filled(req.id, 2 * MiB))
        peer.send(Skipped(req.id, "cannot copy the state: boom"))
        return True

    answers: list[Any] = []
    store = Store(tmp_path / "store")
    error, connected = commit_from(streaming(withdraw, answers), store)
    assert isinstance(error, SnapshotSkipped), error
    assert "withdrew the state: cannot copy the state: boom" in str(error)
    assert connected, "a withdrawn state is not a broken connection"
    assert store.numbers(NAME) == []
    assert temporaries_in(store) == []
    (done,) = answers
    assert isinstance(done, Done)
    assert done.version is None
    assert done.error


def breaking(kind: str) -> Callable[[RawPeer, Arena, SnapshotRequest], bool]:
    """How a fake experiment breaks its stream after the first MiB (see ``streaming``)."""

    def go_on(peer: RawPeer, arena: Arena, req: SnapshotRequest) -> bool:
        said: dict[str, Message] = {
            "no-progress": Filled(req.id, MiB),
            "past-the-end": Filled(req.id, PIECES * MiB + 1),
            "another-id": Filled(req.id + 1, 2 * MiB),
            "another-message": Hello("experiment", NAME, os.getpid()),
        }
        if kind in said:
            peer.send(said[kind])
        return kind != "hang-up"  # "silent": say nothing more

    return go_on


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("no-progress", RemoteProtocolError),
        ("past-the-end", RemoteProtocolError),
        ("another-id", RemoteProtocolError),
        ("another-message", RemoteProtocolError),
        ("silent", PeerUnreachable),
        ("hang-up", PeerUnreachable),
    ],
)
def test_a_stream_that_breaks_is_the_experiments_failure_not_the_stores(
    kind: str, error: type[Exception], tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    raised, connected = commit_from(streaming(breaking(kind)), store)
    assert type(raised) is error, raised  # not CommitFailed: the disk did nothing wrong
    assert not connected, "a peer that broke the stream is not talked to again"
    assert temporaries_in(store) == []
    assert store.numbers(NAME) == []


def test_filled_past_the_state_in_a_repeated_description_is_refused() -> None:
    def script(peer: RawPeer, fake: FakeExperiment) -> None:
        arena = Arena(PIECES * MiB, "fake")
        try:
            first = request(peer)
            peer.send(streamed_state(first, PIECES * MiB), arena.fd)
            peer.receive()  # done
            second = peer.receive()
            assert isinstance(second, SnapshotRequest)
            peer.send(StateReady(second.id, 6, True, None, None, 1, PIECES * MiB + 1), arena.fd)
            fake.release.wait(10)
        finally:
            arena.close()

    with fake_experiment(script) as experiment:
        finish(experiment, experiment.snapshot(5.0))
        with pytest.raises(RemoteProtocolError, match="past the state"):
            experiment.snapshot(5.0)
        assert not experiment.connected


def refused_stream(then: str) -> Callable[[RawPeer, FakeExperiment], None]:
    """A fake experiment whose streamed state the daemon refuses at once (over the
    staging budget); its ``filled`` and a withdrawal still follow, then ``then``:
    answer a snapshot, answer a push, or hang up."""

    def script(peer: RawPeer, fake: FakeExperiment) -> None:
        big, small = Arena(PIECES * MiB, "fake"), Arena(4096, "fake-small")
        try:
            req = request(peer)
            peer.send(streamed_state(req, MiB), big.fd)
            refused = peer.receive()
            assert isinstance(refused, Done)
            assert refused.error
            for index in range(1, PIECES):
                peer.send(Filled(req.id, (index + 1) * MiB))
            peer.send(Skipped(req.id, "late, and ignored"))
            if then == "hang-up":
                return
            asked = peer.receive()
            if isinstance(asked, SnapshotRequest):
                os.pwrite(small.fd, b"\x07" * 4096, 0)
                peer.send(StateReady(asked.id, 9, True, {"a": "x"}, one_tensor(4096), 2), small.fd)
            elif isinstance(asked, Push):
                peer.send(PushDone(asked.id))
            fake.release.wait(10)
        finally:
            big.close()
            small.close()

    return script


def test_late_words_of_a_stream_ended_early_do_not_break_the_next_snapshot() -> None:
    with fake_experiment(refused_stream("snapshot"), staging_budget=MiB) as experiment:
        with pytest.raises(StagingBudgetExceeded):
            experiment.snapshot(5.0)
        capture = experiment.snapshot(5.0)
        assert capture.step == 9
        assert set(capture.flat().arrays["x"].tobytes()) == {7}
        finish(experiment, capture)


def test_late_words_of_a_stream_ended_early_do_not_break_a_push(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    version = store.commit(NAME, {"x": np.ones(8)}, step=3)
    with fake_experiment(refused_stream("push"), staging_budget=MiB) as experiment:
        with pytest.raises(StagingBudgetExceeded):
            experiment.snapshot(5.0)
        experiment.push(store.read(NAME, version), 5.0)  # PushDone, past the late words
        assert experiment.connected


def test_late_words_of_a_stream_ended_early_do_not_hide_a_hang_up() -> None:
    """Between snapshots the daemon looks for experiments that went away by peeking at
    their connection: late words waiting there must not hide the end behind them."""
    with fake_experiment(refused_stream("hang-up"), staging_budget=MiB) as experiment:
        with pytest.raises(StagingBudgetExceeded):
            experiment.snapshot(5.0)
        deadline = time.monotonic() + 5.0
        while not experiment.peer_closed() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert experiment.peer_closed()


def test_a_stream_trickled_past_the_requests_deadline_is_abandoned(tmp_path: Path) -> None:
    """Each ``filled`` within the I/O timeout is not enough: the whole state must be
    there by the request's deadline, or one peer could hold a commit (and its run's
    lock) open for as long as it likes."""

    def trickle_on(peer: RawPeer, arena: Arena, req: SnapshotRequest) -> bool:
        # A byte a third of the I/O timeout apart, for 30 times the request's deadline.
        for upto in range(MiB + 1, MiB + 60):
            time.sleep(IO_TIMEOUT / 3)
            peer.send(Filled(req.id, upto))
        return True

    store = Store(tmp_path / "store")
    started = time.monotonic()
    with fake_experiment(streaming(trickle_on)) as experiment:
        with pytest.raises(PeerUnreachable, match="did not arrive in time"):
            persist(experiment, store, timeout=IO_TIMEOUT, now=datetime.now(UTC))
        waited = time.monotonic() - started
    assert waited < 10 * IO_TIMEOUT, "the commit waited far past the request's deadline"
    assert temporaries_in(store) == []
    assert store.numbers(NAME) == []

"""The versioned store: numbering, listing, loading, naming, permissions, locking, export,
metadata and pruning, on real files (and real processes for the locking tests)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from subprocess import Popen
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import snapshotd
from snapshotd import retention, snapshot
from snapshotd.arena import Arena, map_readonly
from snapshotd.errors import (
    CommitFailed,
    FallbackWarning,
    InvalidName,
    NoGoodSnapshot,
    NoSnapshot,
    SnapshotCorrupt,
    StateError,
    StoreError,
    UsageError,
)
from snapshotd.format import Layout
from snapshotd.retention import Decision, Policy
from snapshotd.tree import flatten

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --- helpers ------------------------------------------------------------------------


def state_of(i: int) -> dict[str, Any]:
    return {"w": np.full(3, float(i)), "i": i, "c": np.array([i + 1j], np.complex128)}


def file_of(root: Path, name: str, version: int) -> Path:
    return root / name / f"v{version:06d}.safetensors"


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def everything_under(root: Path) -> Iterator[Path]:
    yield root
    yield from root.rglob("*")


@pytest.fixture
def store(tmp_path: Path) -> snapshotd.Store:
    return snapshotd.Store(tmp_path / "store")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


# --- numbering and listing ----------------------------------------------------------


def test_versions_start_at_one_and_increase(store: snapshotd.Store) -> None:
    assert [store.commit("run", state_of(i)) for i in range(4)] == [1, 2, 3, 4]


def test_versions_lists_oldest_first_with_step_created_and_size(
    store: snapshotd.Store, root: Path
) -> None:
    offset = datetime(2026, 3, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    store.commit("run", state_of(1), step=10, created=T0)
    store.commit("run", state_of(2), step=None, created=T0 + timedelta(hours=1))
    store.commit("run", {"big": np.zeros(1000)}, step=30, created=offset)

    listed = store.versions("run")

    assert [v.version for v in listed] == [1, 2, 3]
    assert [v.step for v in listed] == [10, None, 30]
    assert [v.created for v in listed] == [T0, T0 + timedelta(hours=1), T0]
    for version in listed:
        assert version.created.tzinfo is not None
        assert version.created.utcoffset() == timedelta(0)
        assert version.nbytes == file_of(root, "run", version.version).stat().st_size
    assert listed[2].nbytes > 8000


def test_created_defaults_to_now_in_utc(store: snapshotd.Store) -> None:
    before = datetime.now(UTC)
    store.commit("run", state_of(0))
    after = datetime.now(UTC)

    (version,) = store.versions("run")

    assert version.created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= version.created <= after + timedelta(seconds=1)


def test_versions_of_an_unknown_run_is_empty_and_creates_nothing(
    store: snapshotd.Store, tmp_path: Path
) -> None:
    assert store.versions("nobody") == []
    assert list(tmp_path.iterdir()) == []


# --- loading ------------------------------------------------------------------------


def test_load_gives_the_newest_or_the_version_asked_for(store: snapshotd.Store) -> None:
    for i in range(1, 4):
        store.commit("run", state_of(i))

    assert store.load("run")["i"] == 3
    assert store.load("run", version=1)["i"] == 1
    assert store.load("run", version=2)["w"].tolist() == [2.0, 2.0, 2.0]


def test_load_of_a_missing_run_is_no_snapshot(store: snapshotd.Store, tmp_path: Path) -> None:
    with pytest.raises(NoSnapshot) as info:
        store.load("never-committed")

    assert type(info.value) is NoSnapshot
    assert list(tmp_path.iterdir()) == []


def test_load_of_a_missing_version_is_no_snapshot(store: snapshotd.Store) -> None:
    store.commit("run", state_of(1))

    with pytest.raises(NoSnapshot):
        store.load("run", version=2)


# --- names --------------------------------------------------------------------------

BAD_NAMES = [
    pytest.param("../x", id="parent"),
    pytest.param("..", id="dotdot"),
    pytest.param(".", id="dot"),
    pytest.param(".hidden", id="hidden"),
    pytest.param("a/b", id="slash"),
    pytest.param("/abs", id="absolute"),
    pytest.param("x" * 129, id="129-chars"),
    pytest.param("", id="empty"),
    pytest.param("-flag", id="leading-dash"),
    pytest.param("_x", id="leading-underscore"),
    pytest.param("a b", id="space"),
    pytest.param("a\n", id="trailing-newline"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("ünï", id="non-ascii"),
    pytest.param("a:b", id="colon"),
]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda s, n: s.commit(n, {"a": np.zeros(1)}), id="commit"),
        pytest.param(lambda s, n: s.versions(n), id="versions"),
        pytest.param(lambda s, n: s.load(n), id="load"),
        pytest.param(lambda s, n: s.prune(n, Policy(last=1)), id="prune"),
    ],
)
def test_invalid_names_are_refused_and_create_nothing(
    tmp_path: Path, name: str, operation: Any
) -> None:
    store = snapshotd.Store(tmp_path / "store")

    with pytest.raises(InvalidName):
        operation(store, name)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a", "Z", "0", "A.b_c-9", "x" * 128, "run.."])
def test_valid_edge_names_are_accepted(store: snapshotd.Store, root: Path, name: str) -> None:
    assert store.commit(name, {"a": np.zeros(1)}) == 1
    assert (root / name).is_dir()
    assert store.load(name)["a"].tolist() == [0.0]


# --- permissions --------------------------------------------------------------------


def assert_private(root: Path) -> None:
    for path in everything_under(root):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o700, f"{path.relative_to(root.parent)}: {oct(mode)}"
        else:
            assert mode == 0o600, f"{path.relative_to(root.parent)}: {oct(mode)}"


def test_commit_creates_private_directories_and_files(store: snapshotd.Store, root: Path) -> None:
    store.commit("run", state_of(1))
    store.commit("run", state_of(2))
    store.commit("other", state_of(3))

    assert {p.name for p in everything_under(root)} >= {
        "store",
        "run",
        ".lock",
        "v000002.safetensors",
    }
    assert_private(root)


def test_quarantine_keeps_directories_and_files_private(store: snapshotd.Store, root: Path) -> None:
    store.commit("run", state_of(1))
    store.commit("run", state_of(2))
    flip_last_byte(file_of(root, "run", 2))
    with pytest.warns(FallbackWarning):
        store.load("run")

    assert (root / "run" / "quarantine").is_dir()
    assert_private(root)


# --- never reused -------------------------------------------------------------------


@pytest.mark.parametrize("drop_lock_hint", [False, True], ids=["with-lock-file", "lock-file-lost"])
def test_version_numbers_are_not_reused_after_prune(
    store: snapshotd.Store, root: Path, drop_lock_hint: bool
) -> None:
    for i in range(5):
        store.commit("run", state_of(i))
    store.prune("run", Policy(last=1))
    assert [v.version for v in store.versions("run")] == [5]
    if drop_lock_hint:
        (root / "run" / ".lock").unlink()

    assert store.commit("run", state_of(9)) == 6


@pytest.mark.parametrize("drop_lock_hint", [False, True], ids=["with-lock-file", "lock-file-lost"])
def test_version_numbers_are_not_reused_after_quarantine(
    store: snapshotd.Store, root: Path, drop_lock_hint: bool
) -> None:
    store.commit("run", state_of(1))
    store.commit("run", state_of(2))
    flip_last_byte(file_of(root, "run", 2))

    with pytest.warns(FallbackWarning, match="version 2"):
        assert store.load("run")["i"] == 1

    assert not file_of(root, "run", 2).exists()
    assert [p.name for p in store.quarantined("run")] == ["v000002.safetensors"]
    if drop_lock_hint:
        (root / "run" / ".lock").unlink()
    assert store.commit("run", state_of(3)) == 3
    assert store.load("run")["i"] == 3


def test_version_numbers_are_not_reused_after_files_are_deleted_by_hand(
    store: snapshotd.Store, root: Path
) -> None:
    for i in range(3):
        store.commit("run", state_of(i))
    for path in (root / "run").glob("v*.safetensors"):
        path.unlink()

    assert store.commit("run", state_of(9)) == 4


def test_when_every_version_is_bad_load_says_so_and_numbers_still_grow(
    store: snapshotd.Store, root: Path
) -> None:
    store.commit("run", state_of(1))
    store.commit("run", state_of(2))
    flip_last_byte(file_of(root, "run", 1))
    flip_last_byte(file_of(root, "run", 2))

    with pytest.warns(FallbackWarning), pytest.raises(NoGoodSnapshot):
        store.load("run")

    assert len(store.quarantined("run")) == 2
    assert store.commit("run", state_of(3)) == 3


def test_a_refused_state_creates_no_version(store: snapshotd.Store) -> None:
    store.commit("run", state_of(1))

    with pytest.raises(StateError):
        store.commit("run", {"bad": {1, 2}})

    assert [v.version for v in store.versions("run")] == [1]
    assert store.commit("run", state_of(2)) == 2


# --- two writers in two processes ---------------------------------------------------

WRITER = """
import sys
import numpy as np
import snapshotd
store = snapshotd.Store(sys.argv[1])
for i in range(int(sys.argv[3])):
    version = store.commit(sys.argv[2], {"who": np.array([int(sys.argv[4])]), "i": i})
    print(version, flush=True)
"""


@contextlib.contextmanager
def writers(root: Path, name: str, count: int, whos: list[int]) -> Iterator[list[Popen[str]]]:
    """Writer processes committing ``count`` versions each; killed if the test fails."""
    package_parent = str(Path(snapshotd.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "SNAPSHOTD_CRASHPOINT"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    started = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), name, str(count), str(who)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for who in whos
    ]
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.communicate()


def finish(process: Popen[str]) -> list[int]:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return [int(line) for line in out.split()]


def flock_waiters(lock: Path, pids: set[int]) -> set[int]:
    """Those of ``pids`` that /proc/locks shows blocked in flock on ``lock``."""
    inode = lock.stat().st_ino
    waiting = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" not in fields:
            continue
        at = fields.index("->")
        kind, pid, where = fields[at + 1], int(fields[at + 4]), fields[at + 5]
        if kind == "FLOCK" and pid in pids and int(where.rsplit(":", 1)[1]) == inode:
            waiting.add(pid)
    return waiting


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_a_second_writer_process_waits_on_the_lock_and_both_commit(
    store: snapshotd.Store, root: Path
) -> None:
    store.commit("run", state_of(0))
    lock = root / "run" / ".lock"
    fd = os.open(lock, os.O_RDWR)
    held = True
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with writers(root, "run", 1, [1, 2]) as started:
            pids = {process.pid for process in started}
            deadline = time.monotonic() + 30
            while flock_waiters(lock, pids) != pids and time.monotonic() < deadline:
                assert all(p.poll() is None for p in started), "a writer ended while locked out"
                time.sleep(0.02)

            assert flock_waiters(lock, pids) == pids
            assert [v.version for v in store.versions("run")] == [1]
            os.close(fd)  # releases the flock
            held = False
            versions = sorted(v for process in started for v in finish(process))
    finally:
        if held:
            os.close(fd)

    assert versions == [2, 3]
    assert [v.version for v in store.versions("run")] == [1, 2, 3]
    assert sorted(int(store.load("run", version=v)["who"][0]) for v in (2, 3)) == [1, 2]


def test_racing_writer_processes_get_distinct_versions(store: snapshotd.Store, root: Path) -> None:
    count = 8
    with writers(root, "race", count, [1, 2, 3]) as started:
        handed_out = [finish(process) for process in started]

    every = sorted(v for versions in handed_out for v in versions)
    assert every == list(range(1, 3 * count + 1))
    for who, versions in enumerate(handed_out, start=1):
        assert versions == sorted(versions)
        for i, version in enumerate(versions):
            loaded = store.load("race", version=version)
            assert (int(loaded["who"][0]), loaded["i"]) == (who, i)
    assert list((root / "race").glob(".tmp.*")) == []


# --- export -------------------------------------------------------------------------


def test_export_safetensors_is_a_valid_snapshot_of_that_version(
    store: snapshotd.Store, root: Path, tmp_path: Path
) -> None:
    store.commit("run", state_of(1), step=5, metadata={"k": "v"})
    store.commit("run", state_of(2), step=6)
    out = tmp_path / "out" / "exported.safetensors"
    out.parent.mkdir()

    assert store.export("run", out, version=1) == 1

    assert out.read_bytes() == file_of(root, "run", 1).read_bytes()
    loaded = snapshotd.load(out)
    assert loaded["i"] == 1
    assert loaded["w"].tolist() == [1.0, 1.0, 1.0]
    tensors = load_file(str(out))
    assert tensors["w"].tolist() == [1.0, 1.0, 1.0]
    assert tensors["c"].tolist() == [[1.0, 1.0]]


def test_export_newest_by_default(store: snapshotd.Store, tmp_path: Path) -> None:
    store.commit("run", state_of(1))
    store.commit("run", state_of(2))

    assert store.export("run", tmp_path / "n.safetensors") == 2
    assert snapshotd.load(tmp_path / "n.safetensors")["i"] == 2


def test_export_npz_loads_without_pickle_with_equal_values(
    store: snapshotd.Store, tmp_path: Path
) -> None:
    state = {
        "w": np.arange(6.0).reshape(2, 3),
        "nested": {"a/b": np.array([1, 2], np.uint16), "": np.array(True)},
        "c": np.array([1 - 1j], np.complex128),
        "s": np.float32(2.5),
        "plain": 3,
    }
    store.commit("run", state)
    out = tmp_path / "x.npz"

    assert store.export("run", out) == 1

    with np.load(out, allow_pickle=False) as archive:
        got = {name: archive[name] for name in archive.files}
    expected = snapshotd.tree.flatten(state).arrays
    assert set(got) == set(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name


@pytest.mark.parametrize("suffix", [".txt", ".npy", ".pt", "", ".safetensors.tmp", ".NPZ"])
def test_export_refuses_other_suffixes(store: snapshotd.Store, tmp_path: Path, suffix: str) -> None:
    store.commit("run", state_of(1))
    out = tmp_path / f"exported{suffix}"

    with pytest.raises(UsageError):
        store.export("run", out)

    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


# --- metadata -----------------------------------------------------------------------


def test_metadata_is_stored_with_the_version(store: snapshotd.Store) -> None:
    store.commit("run", state_of(1), metadata={"git": "abc123", "note": "ünï", "": ""})
    store.commit("run", state_of(2))

    assert dict(store.read("run", 1).header.meta.user) == {"git": "abc123", "note": "ünï", "": ""}
    assert dict(store.read("run", 2).header.meta.user) == {}


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"k": 1}, id="int-value"),
        pytest.param({"k": None}, id="none-value"),
        pytest.param({"k": b"v"}, id="bytes-value"),
        pytest.param({1: "v"}, id="int-key"),
        pytest.param({"k": ["v"]}, id="list-value"),
    ],
)
def test_metadata_must_map_str_to_str(store: snapshotd.Store, metadata: Any) -> None:
    with pytest.raises(UsageError):
        store.commit("run", state_of(1), metadata=metadata)

    assert store.versions("run") == []


# --- pruning ------------------------------------------------------------------------


def commit_series(store: snapshotd.Store, name: str, count: int, every: timedelta) -> None:
    for i in range(count):
        store.commit(name, state_of(i), step=i, created=T0 + i * every)


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(Policy(last=3), id="last-3"),
        pytest.param(Policy(daily=2), id="daily-2"),
        pytest.param(Policy(last=1, hourly=3, daily=2), id="mixed"),
        pytest.param(Policy(within=timedelta(hours=13)), id="within"),
        pytest.param(Policy(pinned=frozenset({2, 4})), id="pinned"),
    ],
)
def test_prune_deletes_exactly_what_the_plan_says(
    store: snapshotd.Store, root: Path, policy: Policy
) -> None:
    commit_series(store, "run", 10, timedelta(hours=5))
    expected = retention.plan(store.versions("run"), policy)
    keep = {d.version for d in expected if d.keep}
    assert 0 < len(keep) < 10, "the policy should keep some and delete some"

    dry = store.prune("run", policy, dry_run=True)
    assert dry == expected
    assert [v.version for v in store.versions("run")] == list(range(1, 11))

    done = store.prune("run", policy)

    assert done == expected
    assert [v.version for v in store.versions("run")] == sorted(keep)
    assert 10 in keep
    assert {p.name for p in (root / "run").iterdir()} == {".lock"} | {
        f"v{v:06d}.safetensors" for v in keep
    }


def test_prune_keeps_the_newest_even_when_nothing_else_is_kept(store: snapshotd.Store) -> None:
    commit_series(store, "run", 4, timedelta(days=400))

    decisions = store.prune("run", Policy(pinned=frozenset({99})))

    assert [(d.version, d.keep) for d in decisions] == [
        (4, True),
        (3, False),
        (2, False),
        (1, False),
    ]
    assert "newest" in decisions[0].reasons
    assert [v.version for v in store.versions("run")] == [4]


def kept_by_policy(decisions: list[Decision]) -> set[int]:
    return {d.version for d in decisions if d.keep and not d.reasons[0].startswith("damaged")}


def damaged(decisions: list[Decision]) -> dict[int, str]:
    """The versions prune found damaged, with their one reason."""
    return {
        d.version: d.reasons[0] for d in decisions if d.reasons[:1] and "damaged" in d.reasons[0]
    }


def test_prune_never_lets_a_damaged_newest_version_anchor_the_policy(
    store: snapshotd.Store, root: Path
) -> None:
    # The newest file has a good header but damaged data: keeping it as "the newest" and
    # deleting the older ones would leave nothing that loads.
    commit_series(store, "run", 4, timedelta(hours=1))
    flip_last_byte(file_of(root, "run", 4))

    decisions = store.prune("run", Policy(last=1))

    assert kept_by_policy(decisions) == {3}
    # Reported, newest first, as moved (never deleted).
    assert [d.version for d in decisions] == [4, 3, 2, 1]
    assert damaged(decisions) == {4: "damaged (digest mismatch in tensor 'c'), moved to quarantine"}
    assert [v.version for v in store.versions("run")] == [3]
    assert [p.name for p in store.quarantined("run")] == ["v000004.safetensors"]
    assert store.load("run")["i"] == 2


def test_a_file_rewritten_with_its_mtime_set_back_is_not_trusted(
    store: snapshotd.Store, root: Path
) -> None:
    """The store remembers the files it wrote and read by inode, size, mtime and ctime:
    a rewrite that restores the mtime still changes the ctime, so it is verified again."""
    commit_series(store, "run", 4, timedelta(hours=1))
    path = file_of(root, "run", 4)
    before = path.stat()
    flip_last_byte(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )

    decisions = store.prune("run", Policy(last=1))

    assert kept_by_policy(decisions) == {3}
    assert list(damaged(decisions)) == [4]
    assert [p.name for p in store.quarantined("run")] == ["v000004.safetensors"]


def test_numbers_lists_the_files_without_reading_them(store: snapshotd.Store, root: Path) -> None:
    commit_series(store, "run", 3, timedelta(hours=1))
    (root / "run" / "v000002.safetensors").write_bytes(b"not a snapshot")
    assert store.numbers("run") == [1, 2, 3]
    assert store.numbers("nobody") == []


def test_prune_of_an_unknown_run_does_nothing(store: snapshotd.Store, tmp_path: Path) -> None:
    assert store.prune("nobody", Policy(last=1)) == []
    assert list(tmp_path.iterdir()) == []


# --- files that are not ours ----------------------------------------------------------


def plant_random_file(root: Path, name: str, version: int, size: int = 333) -> bytes:
    data = np.random.default_rng(version).integers(0, 256, size, dtype=np.uint8).tobytes()
    file_of(root, name, version).write_bytes(data)
    return data


def plant_foreign_safetensors(root: Path, name: str, version: int) -> bytes:
    path = file_of(root, name, version)
    save_file({"w": np.zeros(3)}, str(path), metadata={"snapshotd.version": str(version)})
    return path.read_bytes()


def assert_quarantined_intact(
    store: snapshotd.Store, root: Path, version: int, data: bytes
) -> None:
    moved = root / "run" / "quarantine" / f"v{version:06d}.safetensors"
    assert moved.read_bytes() == data
    reason = moved.with_name(moved.name + ".reason")
    assert reason.read_text().strip() != ""
    assert moved in store.quarantined("run")
    assert not file_of(root, "run", version).exists()


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(plant_random_file, id="random-bytes"),
        pytest.param(plant_foreign_safetensors, id="foreign-safetensors"),
    ],
)
def test_prune_quarantines_files_that_are_not_ours_and_never_deletes_them(
    store: snapshotd.Store, root: Path, plant: Any
) -> None:
    commit_series(store, "run", 5, timedelta(hours=1))
    (root / "run" / "v000003.safetensors").unlink()
    middle = plant(root, "run", 3)
    newest = plant(root, "run", 6)

    decisions = store.prune("run", Policy(last=1))

    assert kept_by_policy(decisions) == {5}
    assert sorted(damaged(decisions)) == [3, 6]
    assert all(why.endswith(", moved to quarantine") for why in damaged(decisions).values())
    assert_quarantined_intact(store, root, 3, middle)
    assert_quarantined_intact(store, root, 6, newest)
    assert [v.version for v in store.versions("run")] == [5]
    assert store.load("run")["i"] == 4
    assert store.commit("run", state_of(7)) == 7


def test_dry_run_prune_moves_and_deletes_nothing(store: snapshotd.Store, root: Path) -> None:
    commit_series(store, "run", 4, timedelta(hours=1))
    planted = plant_random_file(root, "run", 5)
    before = {p.name: p.read_bytes() for p in (root / "run").iterdir()}

    decisions = store.prune("run", Policy(last=1), dry_run=True)

    assert {p.name: p.read_bytes() for p in (root / "run").iterdir()} == before
    assert list(damaged(decisions)) == [5]  # reported all the same
    assert damaged(decisions)[5].endswith(", would be moved to quarantine")
    assert file_of(root, "run", 5).read_bytes() == planted


def test_a_file_that_is_not_ours_is_never_loaded(store: snapshotd.Store, root: Path) -> None:
    store.commit("run", state_of(1))
    store.commit("run", state_of(2))
    planted = plant_random_file(root, "run", 3)

    with pytest.warns(FallbackWarning, match="version 3"):
        assert store.load("run")["i"] == 2

    assert_quarantined_intact(store, root, 3, planted)
    assert store.commit("run", state_of(4)) == 4


def test_loading_a_foreign_file_by_version_fails_and_quarantines_it(
    store: snapshotd.Store, root: Path
) -> None:
    store.commit("run", state_of(1))
    planted = plant_foreign_safetensors(root, "run", 2)

    with pytest.raises(SnapshotCorrupt):
        store.load("run", version=2)

    assert_quarantined_intact(store, root, 2, planted)


def test_a_snapshot_under_another_versions_name_is_not_loaded_as_that_version(
    store: snapshotd.Store, root: Path
) -> None:
    # v1's bytes under v3's name: the header says version 1, the file name says 3.
    # verify() and prune() call that a bad file; load must not hand it out as version 3.
    store.commit("run", state_of(1))
    store.commit("run", state_of(2))
    file_of(root, "run", 3).write_bytes(file_of(root, "run", 1).read_bytes())

    assert [(c.version, c.ok) for c in store.verify("run")] == [(1, True), (2, True), (3, False)]
    with pytest.warns(FallbackWarning, match="version 3"):
        assert store.load("run")["i"] == 2


@pytest.mark.parametrize(
    "values",
    [
        [1, True, 1, False, 0, 1.0, True],
        [{"epoch": 3}, {"epoch": 4}, {"epoch": True}, {"epoch": "4"}, {"epoch": 4}],
        [[1, 2], (1, 2), [1, 2], [1, True]],
    ],
    ids=["int-bool-float", "changing-scalars", "list-tuple"],
)
def test_an_unchanged_layout_never_reuses_a_stale_tree(
    store: snapshotd.Store, values: list[Any]
) -> None:
    """The header template is reused while the tree is the same: ``1 == True`` in Python
    and ``[1] == [1]`` for a tuple turned list must still come back as they were."""
    weights = np.arange(6.0)
    for value in values:
        version = store.commit("run", {"w": weights, "x": value})
        loaded = store.load("run", version)
        assert loaded["x"] == value
        assert type(loaded["x"]) is type(value)
        if isinstance(value, list | tuple | dict):
            inner = value.values() if isinstance(value, dict) else value
            got = loaded["x"].values() if isinstance(value, dict) else loaded["x"]
            assert [type(v) for v in got] == [type(v) for v in inner]


def test_a_payload_short_of_its_layout_fails_the_commit_cleanly(
    store: snapshotd.Store, root: Path
) -> None:
    """Not an I/O error but a bug (shared memory smaller than its layout): the commit
    still fails with CommitFailed, and its temporary file is gone."""
    flat = flatten({"a": np.zeros(4), "b": np.ones(2)})
    layout = Layout.plan(flat.arrays)
    short = memoryview(bytearray(layout.data_size - 8))
    payload = snapshot.Payload.of_arena(layout, short, flat.structure)

    with pytest.raises(CommitFailed, match="ValueError"):
        store.commit_payload("run", payload)

    assert store.versions("run") == []
    assert [p.name for p in (root / "run").iterdir()] == [".lock"]


def test_an_arena_with_tensors_bigger_than_a_write_unit_round_trips(
    store: snapshotd.Store,
) -> None:
    """From shared memory, as the daemon writes: big tensors go out in parts, each part
    a slice of the arena, and their digests are streamed over the parts."""
    unit = snapshot.IO_UNIT
    state = {
        "big": np.arange(unit // 8 * 2 + 7, dtype=np.float64),
        "z": (np.arange(unit // 16 + 3) + 1j).astype(np.complex128),
        "small": np.ones(5, np.float16),
    }
    flat = flatten(state)
    layout = Layout.plan(flat.arrays)
    arena = Arena(layout.data_size, "test")
    try:
        arena.fill(layout, flat.arrays)
        mapped = map_readonly(arena.fd, layout.data_size)  # as the daemon maps it
        with memoryview(mapped) as data:
            version = store.commit_payload(
                "run", snapshot.Payload.of_arena(layout, data, flat.structure)
            )
        mapped.close()
    finally:
        arena.close()

    loaded = store.load("run", version)
    for name, array in state.items():
        np.testing.assert_array_equal(loaded[name], array)


def test_export_into_a_missing_directory_says_so_and_writes_nothing(
    store: snapshotd.Store, tmp_path: Path
) -> None:
    store.commit("run", state_of(1))
    with pytest.raises(UsageError, match=r"there is no directory .*nowhere$"):
        store.export("run", tmp_path / "nowhere" / "out.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize(
    ("write", "kind"),
    [
        (lambda path, a: np.savez(path, w=a), "a zip archive (.npz)"),
        (lambda path, a: np.save(path, a), "a .npy file"),
        (lambda path, a: path.write_bytes(b"\xff" * 64), "not a safetensors file, or a damaged"),
    ],
)
def test_loading_a_file_of_another_format_says_what_it_is(
    tmp_path: Path, write: Any, kind: str
) -> None:
    path = tmp_path / "weights.bin"
    write(path, np.arange(1000.0))
    written = next(tmp_path.iterdir())  # np.save adds .npy, np.savez .npz
    with pytest.raises(SnapshotCorrupt, match=re.escape(kind)):
        snapshotd.load(written)


# -- what is not ours under a snapshot's name is never followed or read ------------------


def test_a_symlink_under_a_snapshots_name_is_not_listed_or_read(
    store: snapshotd.Store, tmp_path: Path
) -> None:
    for i in range(3):
        store.commit("run", state_of(i))
    outside = tmp_path / "outside.safetensors"
    os.rename(file_of(store.root, "run", 3), outside)
    os.symlink(outside, file_of(store.root, "run", 3))

    assert store.numbers("run") == [1, 2]
    assert [v.version for v in store.versions("run")] == [1, 2]
    with pytest.raises(StoreError, match="symbolic link"):
        store.load("run", version=3)
    assert store.load("run")["i"] == 1  # the newest real file, v2
    assert outside.exists()  # what the link pointed at is never moved or deleted
    store.prune("run", Policy(last=1))
    assert outside.exists()


def test_a_fifo_under_a_snapshots_name_is_refused_at_once(store: snapshotd.Store) -> None:
    store.commit("run", state_of(1))
    fifo = file_of(store.root, "run", 2)
    os.mkfifo(fifo)
    began = time.monotonic()
    with pytest.raises(StoreError, match="not a regular file"):
        store.load("run", version=2)  # opening a FIFO to read waits for a writer
    assert time.monotonic() - began < 5
    assert store.numbers("run") == [1]
    assert store.load("run")["i"] == 1


def test_a_symlinked_run_lock_is_refused_and_its_target_left_alone(
    store: snapshotd.Store, tmp_path: Path
) -> None:
    store.commit("run", state_of(1))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = store.root / "run" / ".lock"
    lock.unlink()
    lock.symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link"):
        store.commit("run", state_of(2))
    assert victim.read_text() == "precious"
    assert store.numbers("run") == [1]


def test_a_write_does_not_go_through_a_symlink_at_its_temporary_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The temporary name is random; fixing the random part (the one fake here) is what
    # lets a link be planted where the write will create its file. (A store's commit
    # also clears leftover temporary names of its run first.)
    monkeypatch.setattr(secrets, "token_hex", lambda _n: "feedface")  # what snapshot uses
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out.safetensors"
    planted = tmp_path / f"{snapshot.TMP_PREFIX}{target.name}.{os.getpid()}.feedface"
    planted.symlink_to(victim)
    with pytest.raises(CommitFailed):
        snapshotd.save(target, state_of(1))
    assert victim.read_text() == "precious"
    assert not target.exists()


def test_a_file_under_another_versions_name_is_damaged_in_listings_and_pruned_to_quarantine(
    store: snapshotd.Store,
) -> None:
    for i in range(2):
        store.commit("run", state_of(i))
    shutil.copyfile(file_of(store.root, "run", 1), file_of(store.root, "run", 2))
    store.commit("run", state_of(3))
    listed = {v.version: v for v in store.versions("run")}
    assert [listed[v].problem for v in (1, 3)] == [None, None]
    assert "version 1" in str(listed[2].problem)
    decisions = {d.version: d for d in store.prune("run", Policy(last=1))}
    assert (decisions[2].damaged, decisions[2].keep) == (True, True)
    assert (store.root / "run" / "quarantine" / file_of(store.root, "run", 2).name).exists()
    assert store.numbers("run") == [3]

"""Damaged snapshot files are detected, never restored, and moved aside with a reason.

SPEC §5: a snapshot that fails verification is never restored; loading falls back to
the next older good one, says so (``FallbackWarning``) and moves the bad file to
``<run>/quarantine/`` with a ``.reason`` file. ``Store.verify`` reports without moving.

Kinds of damage: truncation at every offset, random byte flips, appended garbage, a
zeroed 4 KiB block, a good file under the wrong version's name, a good file from another
run. Random cases are seeded (``SNAPSHOTD_TEST_SEED`` replays a failure).
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from snapshotd import (
    FallbackWarning,
    NoGoodSnapshot,
    NoSnapshot,
    SnapshotCorrupt,
    Store,
    snapshot,
)
from snapshotd.store import file_name

NAME = "corrupt-run"
OTHER = "other-run"
SEED = int(os.environ.get("SNAPSHOTD_TEST_SEED", "20261128"))
BLOCK = 4096


def small_state(step: int) -> dict[str, Any]:
    """A few arrays of a few KiB in all: the file is mostly header, the rest data."""
    rng = np.random.default_rng([SEED, step])
    return {
        "W": rng.standard_normal((16, 32)).astype(np.float32),
        "b": rng.standard_normal(64),
        "counts": rng.integers(-1000, 1000, size=100, dtype=np.int16),
        "flags": rng.random(13) < 0.5,
        "step": step,
    }


def large_state(step: int) -> dict[str, Any]:
    """About 64 KiB of random data, so every 4 KiB block holds data worth checking."""
    rng = np.random.default_rng([SEED, step, 1])
    return {"W": rng.standard_normal((64, 128)), "b": rng.standard_normal(128)}


def same_state(expected: dict[str, Any], actual: object) -> bool:
    if not isinstance(actual, dict) or sorted(actual) != sorted(expected):
        return False
    for key, want in expected.items():
        got = actual[key]
        if isinstance(want, np.ndarray):
            same = (
                isinstance(got, np.ndarray)
                and got.dtype == want.dtype
                and got.shape == want.shape
                and got.tobytes() == want.tobytes()
            )
            if not same:
                return False
        elif got != want:
            return False
    return True


@dataclass(frozen=True)
class Golden:
    """Good snapshot files, as bytes, and the states they hold."""

    files: dict[int, bytes]  # version of NAME -> file contents
    states: dict[int, dict[str, Any]]
    other: dict[int, bytes]  # version of OTHER -> file contents
    large: bytes  # a ~64 KiB snapshot of NAME, version 1


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    store = Store(tmp_path_factory.mktemp("golden"))
    states = {v: small_state(v * 10) for v in range(1, 9)}
    for version, state in states.items():
        assert store.commit(NAME, state, step=version * 10) == version
    for step in (1, 2, 3):
        store.commit(OTHER, small_state(1000 + step), step=1000 + step)
    store.commit("large", large_state(0), step=0)
    files = {v.version: v.path.read_bytes() for v in store.versions(NAME)}
    other = {v.version: v.path.read_bytes() for v in store.versions(OTHER)}
    (large,) = (v.path.read_bytes() for v in store.versions("large"))
    return Golden(files, states, other, large)


def make_run(root: Path, files: dict[int, bytes], name: str = NAME) -> Path:
    """A run directory holding exactly ``files`` (version -> bytes) under their names."""
    run = root / name
    run.mkdir(parents=True, mode=0o700)
    for version, data in files.items():
        (run / file_name(version)).write_bytes(data)
    return run


def overwrite(path: Path, data: bytes) -> None:
    """Make ``path`` hold ``data``: pwrite and ftruncate, not O_TRUNC (ext4 flushes a
    truncated file on close, which costs a millisecond per case here)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def undetected(data: bytes, mutations: Iterator[tuple[str, bytes]], path: Path) -> list[str]:
    """Write each mutated file to ``path``; return those that ``snapshot.read`` accepted."""
    missed = []
    for label, mutated in mutations:
        assert mutated != data, f"{label}: the mutation changed nothing"
        overwrite(path, mutated)
        try:
            snapshot.read(path)
        except SnapshotCorrupt:
            continue
        missed.append(label)
    return missed


def reason_of(data: bytes, scratch: Path) -> str:
    """The reason ``snapshot.read`` gives for a damaged file's contents."""
    scratch.write_bytes(data)
    with pytest.raises(SnapshotCorrupt) as caught:
        snapshot.read(scratch)
    return caught.value.reason


def assert_falls_back(
    root: Path, golden: Golden, bad: bytes, *, good: int = 2, bad_version: int = 3
) -> None:
    """Versions 1..good are good and ``bad`` is the newest: load must use ``good``."""
    run = make_run(root, {**{v: golden.files[v] for v in range(1, good + 1)}, bad_version: bad})
    store = Store(root)
    with pytest.warns(FallbackWarning, match=f"version {bad_version}"):
        tree = store.load(NAME)
    assert same_state(golden.states[good], tree), "loaded something other than the fallback"
    assert not (run / file_name(bad_version)).exists(), "the bad file is still listed"
    moved = run / "quarantine" / file_name(bad_version)
    assert moved.read_bytes() == bad, "the quarantined file is not the bad file as it was"
    reason = moved.with_name(moved.name + ".reason").read_text().strip()
    assert reason, "the .reason file is empty"
    assert [v.version for v in store.versions(NAME)] == list(range(1, good + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bad file is gone: no second warning
        assert same_state(golden.states[good], store.load(NAME))


# -- truncation -----------------------------------------------------------------------


def truncations(data: bytes, sizes: range | list[int]) -> Iterator[tuple[str, bytes]]:
    for size in sizes:
        yield f"truncated to {size}", data[:size]


def test_every_truncation_is_detected(tmp_path: Path, golden: Golden) -> None:
    data = golden.files[3]
    assert 2048 < len(data) < 16384, "the small snapshot should be a few KiB"
    missed = undetected(data, truncations(data, range(len(data))), tmp_path / "v.safetensors")
    assert missed == [], f"{len(missed)} of {len(data)} truncations undetected: {missed[:10]}"


@pytest.mark.soak
def test_every_truncation_of_a_large_snapshot_is_detected(tmp_path: Path, golden: Golden) -> None:
    data = golden.large
    missed = undetected(data, truncations(data, range(len(data))), tmp_path / "v.safetensors")
    assert missed == [], f"{len(missed)} of {len(data)} truncations undetected: {missed[:10]}"


def test_truncated_newest_falls_back_and_is_quarantined(tmp_path: Path, golden: Golden) -> None:
    data = golden.files[3]
    overwrite(tmp_path / "header", data)
    data_start = snapshot.read_header(tmp_path / "header").data_start
    edges = {0, 1, 7, 8, 9, 63, 64, data_start - 1, data_start, data_start + 1, len(data) - 1}
    rng = random.Random(SEED)
    offsets = sorted(edges | set(rng.sample(range(len(data)), 24)))
    for offset in offsets:
        assert_falls_back(tmp_path / f"at-{offset}", golden, data[:offset])


# -- byte flips -----------------------------------------------------------------------


def flips(data: bytes, count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``count`` copies of ``data``, each with 1-8 bytes XORed with a non-zero value."""
    rng = random.Random(seed)
    for case in range(count):
        mutated = bytearray(data)
        where = rng.sample(range(len(data)), rng.randint(1, 8))
        for offset in where:
            mutated[offset] ^= rng.randint(1, 255)
        yield f"seed {seed} case {case}: flipped {sorted(where)}", bytes(mutated)


def test_random_byte_flips_are_all_detected(tmp_path: Path, golden: Golden) -> None:
    data = golden.files[3]
    count = 20_000
    missed = undetected(data, flips(data, count, SEED), tmp_path / "v.safetensors")
    assert missed == [], f"{len(missed)} of {count} flips undetected: {missed[:10]}"


@pytest.mark.soak
def test_random_byte_flips_are_all_detected_soak(tmp_path: Path, golden: Golden) -> None:
    missed = []
    for seed, data in enumerate([golden.files[3], golden.large], start=SEED + 1):
        missed += undetected(data, flips(data, 100_000, seed), tmp_path / "v.safetensors")
    assert missed == [], f"{len(missed)} flips undetected: {missed[:10]}"


def test_flipped_newest_falls_back_and_is_quarantined(tmp_path: Path, golden: Golden) -> None:
    data = golden.files[3]
    for case, (_, mutated) in enumerate(flips(data, 24, SEED + 2)):
        assert_falls_back(tmp_path / f"case-{case}", golden, mutated)


# -- other damage ---------------------------------------------------------------------


def appended(data: bytes) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(SEED)
    for tail in (b"\0", b" ", b"\n", b"\0" * BLOCK, rng.randbytes(1), rng.randbytes(777), data):
        yield f"{len(tail)} bytes appended", data + tail


def test_appended_garbage_is_detected(tmp_path: Path, golden: Golden) -> None:
    data = golden.files[3]
    assert undetected(data, appended(data), tmp_path / "v.safetensors") == []
    for case, (_, mutated) in enumerate(appended(data)):
        assert_falls_back(tmp_path / f"case-{case}", golden, mutated)


def zeroed_blocks(data: bytes, starts: list[int]) -> Iterator[tuple[str, bytes]]:
    for start in starts:
        mutated = bytearray(data)
        end = min(start + BLOCK, len(data))
        mutated[start:end] = bytes(end - start)
        if bytes(mutated) != data:  # a block that was all zeros already is no damage
            yield f"zeroed {start}..{end}", bytes(mutated)


def test_zeroed_block_is_detected(tmp_path: Path, golden: Golden) -> None:
    data = golden.large
    rng = random.Random(SEED)
    starts = list(range(0, len(data), BLOCK)) + rng.sample(range(len(data)), 64)
    cases = list(zeroed_blocks(data, starts))
    assert len(cases) >= len(data) // BLOCK, "the large snapshot should have no zero blocks"
    assert undetected(data, iter(cases), tmp_path / "v.safetensors") == []
    small = golden.files[3]
    for case, (_, mutated) in enumerate(zeroed_blocks(small, [0, BLOCK // 2, len(small) - 100])):
        assert_falls_back(tmp_path / f"case-{case}", golden, mutated)


# -- good files under the wrong name --------------------------------------------------


@pytest.mark.parametrize(
    ("source", "label"),
    [(2, "copy of the previous version"), (1, "an old file put back")],
    ids=["previous-copied", "old-put-back"],
)
def test_file_under_next_versions_name_is_detected(
    tmp_path: Path, golden: Golden, source: int, label: str
) -> None:
    """v3 is a byte-exact good file of another version: the name/header binding fails."""
    files = {1: golden.files[1], 2: golden.files[2], 3: golden.files[source]}
    run = make_run(tmp_path / "verify", files)
    checks = Store(tmp_path / "verify").verify(NAME)
    assert [(c.version, c.ok) for c in checks] == [(1, True), (2, True), (3, False)], label
    assert (run / file_name(3)).read_bytes() == golden.files[source], "verify moved a file"

    assert_falls_back(tmp_path / "load", golden, golden.files[source])

    make_run(tmp_path / "exact", files)
    with pytest.raises(SnapshotCorrupt):
        Store(tmp_path / "exact").load(NAME, version=3)
    assert (tmp_path / "exact" / NAME / "quarantine" / file_name(3)).exists()


@pytest.mark.parametrize("other_version", [3, 1], ids=["same-version", "other-version"])
def test_file_from_another_run_is_detected(
    tmp_path: Path, golden: Golden, other_version: int
) -> None:
    """Another run's good file as our v3: caught by the run name, or by the version."""
    foreign = golden.other[other_version]
    files = {1: golden.files[1], 2: golden.files[2], 3: foreign}
    make_run(tmp_path / "verify", files)
    checks = Store(tmp_path / "verify").verify(NAME)
    assert [(c.version, c.ok) for c in checks] == [(1, True), (2, True), (3, False)]
    assert_falls_back(tmp_path / "load", golden, foreign)


# -- nothing good left ----------------------------------------------------------------


def test_no_good_snapshot_when_every_version_is_bad(tmp_path: Path, golden: Golden) -> None:
    flipped = bytearray(golden.files[3])
    flipped[-5] ^= 0x10
    bad = {1: golden.files[1][:-1], 2: golden.files[2] + b"\0", 3: bytes(flipped)}
    run = make_run(tmp_path, bad)
    with pytest.warns(FallbackWarning) as caught, pytest.raises(NoGoodSnapshot):
        Store(tmp_path).load(NAME)
    assert len([w for w in caught if w.category is FallbackWarning]) == 3
    assert sorted(p.name for p in (run / "quarantine").iterdir()) == sorted(
        [file_name(v) for v in bad] + [file_name(v) + ".reason" for v in bad]
    )
    for version, data in bad.items():
        assert (run / "quarantine" / file_name(version)).read_bytes() == data


def test_no_good_snapshot_persists_once_all_are_quarantined(tmp_path: Path, golden: Golden) -> None:
    """A restart must not take a run whose snapshots were all bad for a fresh run."""
    make_run(tmp_path, {1: golden.files[1][:100]})
    store = Store(tmp_path)
    with pytest.warns(FallbackWarning), pytest.raises(NoGoodSnapshot):
        store.load(NAME)
    with pytest.raises(NoGoodSnapshot):
        store.load(NAME)


@pytest.mark.parametrize("layout", ["no-directory", "empty", "lock-and-temporary"])
def test_no_snapshot_is_not_no_good_snapshot(tmp_path: Path, layout: str) -> None:
    """A run with no snapshot files at all: NoSnapshot, and not its NoGoodSnapshot child."""
    if layout != "no-directory":
        run = make_run(tmp_path, {})
        if layout == "lock-and-temporary":
            (run / ".lock").write_text("3\n")
            (run / f"{snapshot.TMP_PREFIX}{file_name(3)}.123.abcd").write_bytes(b"partial")
    with pytest.raises(NoSnapshot) as caught:
        Store(tmp_path).load(NAME)
    assert not isinstance(caught.value, NoGoodSnapshot)


def test_several_bad_newest_versions_fall_back_past_all(tmp_path: Path, golden: Golden) -> None:
    run = make_run(
        tmp_path, {1: golden.files[1], 2: golden.files[2][:-10], 3: golden.files[3] + b"x"}
    )
    with pytest.warns(FallbackWarning) as caught:
        tree = Store(tmp_path).load(NAME)
    assert same_state(golden.states[1], tree)
    assert len([w for w in caught if w.category is FallbackWarning]) == 2
    assert sorted(p.name for p in (run / "quarantine").glob("*.safetensors")) == [
        file_name(2),
        file_name(3),
    ]


def test_reason_file_says_why(tmp_path: Path, golden: Golden) -> None:
    bad = golden.files[3][:-1]
    expected = reason_of(bad, tmp_path / "scratch")
    run = make_run(tmp_path / "store", {1: golden.files[1], 3: bad})
    with pytest.warns(FallbackWarning, match="version 3"):
        Store(tmp_path / "store").load(NAME)
    reason = run / "quarantine" / (file_name(3) + ".reason")
    assert reason.read_text().strip() == expected


# -- verify ---------------------------------------------------------------------------


Mutation = Callable[[bytes], bytes]
DAMAGE: dict[int, Mutation] = {
    2: lambda data: data[: len(data) // 2],
    3: lambda data: data[:-1] + bytes([data[-1] ^ 0x40]),
    4: lambda data: data[:16] + bytes([data[16] ^ 1]) + data[17:],
    5: lambda data: data + b"garbage",
    6: lambda data: bytes(BLOCK) + data[BLOCK:] if len(data) > BLOCK else bytes(len(data)),
}


def test_verify_reports_every_bad_file_and_moves_nothing(tmp_path: Path, golden: Golden) -> None:
    files = {1: golden.files[1], 7: golden.files[7], 8: golden.files[1]}  # v8: misnamed
    files |= {version: damage(golden.files[version]) for version, damage in DAMAGE.items()}
    run = make_run(tmp_path, dict(sorted(files.items())))
    make_run(tmp_path, {1: golden.other[1], 2: golden.other[2][:-3]}, name=OTHER)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    store = Store(tmp_path)
    checks = store.verify(NAME)
    assert [c.version for c in checks] == sorted(files)
    assert [c.version for c in checks if not c.ok] == [2, 3, 4, 5, 6, 8]
    assert all(c.problem for c in checks if not c.ok)
    everything = store.verify()
    assert {(c.name, c.version) for c in everything if not c.ok} == {
        (NAME, 2),
        (NAME, 3),
        (NAME, 4),
        (NAME, 5),
        (NAME, 6),
        (NAME, 8),
        (OTHER, 2),
    }

    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before, "verify changed, moved or deleted a file"
    assert not (run / "quarantine").exists()


def test_quarantine_keeps_every_bad_copy(tmp_path: Path, golden: Golden) -> None:
    """A version quarantined twice (a bad file reappeared) keeps both copies."""
    run = make_run(tmp_path, {1: golden.files[1], 2: golden.files[2][:-1]})
    store = Store(tmp_path)
    with pytest.warns(FallbackWarning):
        store.load(NAME)
    (run / file_name(2)).write_bytes(golden.files[2][:-2])
    with pytest.warns(FallbackWarning):
        store.load(NAME)
    kept = sorted(p.read_bytes() for p in (run / "quarantine").iterdir() if "reason" not in p.name)
    assert kept == sorted([golden.files[2][:-1], golden.files[2][:-2]])

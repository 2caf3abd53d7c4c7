"""Splitting byte-heavy work into lanes of about equal bytes, and running the lanes at
once: the results in order, and no lane still running when the caller goes on."""

from __future__ import annotations

import contextlib
import gc
import itertools
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshotd import lanes
from snapshotd.lanes import Lanes, even_parts

MiB = 1 << 20


def ends_of(sizes: list[int]) -> list[int]:
    return list(itertools.accumulate(sizes))


def test_small_work_stays_on_one_lane() -> None:
    assert even_parts([MiB] * 7, cpus=2) == [range(7)]


def test_equal_items_are_halved() -> None:
    assert even_parts([MiB] * 200, cpus=2) == [range(100), range(100, 200)]


def test_an_item_is_never_cut() -> None:
    assert even_parts([64 * MiB], cpus=2) == [range(1)]
    assert even_parts([64 * MiB, 1, 1], cpus=4) == [range(1), range(1, 3)]


def test_many_small_items_stay_on_one_lane() -> None:
    """Each would hold the GIL for longer than its copy lets go of it."""
    assert even_parts([1024] * 20_000, cpus=2) == [range(20_000)]


def test_small_items_beside_a_big_one_share_the_lanes() -> None:
    assert even_parts([16 * MiB] + [1024] * 100, cpus=2) == [range(1), range(1, 101)]


def test_one_cpu_makes_one_lane() -> None:
    assert even_parts([MiB] * 200, cpus=1) == [range(200)]


def test_no_items_make_one_empty_lane() -> None:
    assert even_parts([], cpus=4) == [range(0)]
    assert even_parts([], cpus=4, minimum=0) == [range(0)]


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=8 * MiB), min_size=1, max_size=60),
    cpus=st.integers(min_value=1, max_value=8),
    minimum=st.sampled_from([0, MiB]),
)
def test_lanes_cover_every_item_once_in_order_and_share_the_bytes(
    sizes: list[int], cpus: int, minimum: int
) -> None:
    ends = ends_of(sizes)
    parts = even_parts(sizes, cpus, minimum)

    assert [index for part in parts for index in part] == list(range(len(sizes)))
    assert 1 <= len(parts) <= cpus
    assert all(parts), "no lane is empty"
    big = [size for size in sizes if size >= lanes.MINIMUM_ITEM]
    if not big or sum(big) < minimum:
        assert len(parts) == 1
    # No lane holds more than its share and one item beyond it.
    share = ends[-1] / len(parts)
    for part in parts:
        held = sum(sizes[index] for index in part)
        assert held <= share + max(sizes[index] for index in part)


def test_each_part_runs_on_its_own_thread_and_results_keep_their_order() -> None:
    started = threading.Barrier(2, timeout=10)

    def work(part: str) -> tuple[str, int]:
        started.wait()  # both parts must be running at once to pass the barrier
        return part, threading.get_ident()

    with Lanes(2) as pool:
        (first, caller), (second, helper) = pool.map(work, ["a", "b"])

    assert (first, second) == ("a", "b")
    assert caller == threading.get_ident()
    assert helper != caller


def test_one_lane_runs_everything_on_the_caller() -> None:
    with Lanes(1) as pool:
        idents = pool.map(lambda _: threading.get_ident(), [1, 2, 3])

    assert idents == [threading.get_ident()] * 3


def test_a_failure_on_the_caller_waits_for_the_other_lanes() -> None:
    finished = threading.Event()

    def work(part: int) -> None:
        if part == 0:
            raise ValueError("caller's lane")
        time.sleep(0.2)
        finished.set()

    with Lanes(2) as pool, pytest.raises(ValueError, match="caller's lane"):
        pool.map(work, [0, 1])

    assert finished.is_set()


def test_a_failure_in_a_helper_lane_is_raised_to_the_caller() -> None:
    def work(part: int) -> int:
        if part == 1:
            raise KeyError("helper's lane")
        return part

    with Lanes(2) as pool, pytest.raises(KeyError, match="helper's lane"):
        pool.map(work, [0, 1])


def test_a_lane_closes_at_the_nearer_side_of_the_item_that_straddles_its_share() -> None:
    assert even_parts([50 * MiB, 60 * MiB, 10 * MiB], cpus=2) == [range(1), range(1, 3)]
    assert even_parts([10 * MiB, 100 * MiB], cpus=2) == [range(1), range(1, 2)]


def test_no_lane_is_started_for_no_bytes() -> None:
    assert even_parts([64 * MiB, 0, 0, 0], cpus=4) == [range(4)]


def test_a_failed_lane_keeps_nothing_alive_once_handled() -> None:
    """The exception of a helper's part, raised to the caller, must not sit in a
    reference cycle: what the parts held would stay alive until the cyclic collector
    runs, and a training loop may have turned it off."""

    class Buffer:
        pass

    held: list[weakref.ref[Buffer]] = []

    def work(part: int) -> None:
        buffer = Buffer()
        held.append(weakref.ref(buffer))
        if part == 1:
            raise ValueError("helper's lane")

    gc.disable()
    try:
        with Lanes(2) as pool, contextlib.suppress(ValueError):
            pool.map(work, [0, 1])
        assert len(held) == 2
        assert [ref() for ref in held] == [None, None]
    finally:
        gc.enable()


def test_lanes_still_work_while_the_interpreter_shuts_down(tmp_path: Path) -> None:
    """atexit handlers run after thread pools stop taking work: every part then runs
    on the caller's thread instead of failing."""
    script = tmp_path / "late.py"
    script.write_text(
        textwrap.dedent(
            """
            import atexit, sys
            import numpy as np
            import snapshotd
            from snapshotd import lanes

            lanes.usable_cpus = lambda: 2
            path = sys.argv[1]
            state = {"a": np.ones(3 << 20, np.float32), "b": np.ones(3 << 20, np.float32)}
            snapshotd.save(path, state)

            def late() -> None:
                print(sorted(snapshotd.load(path)), flush=True)

            atexit.register(late)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "state.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['a', 'b']", done.stderr

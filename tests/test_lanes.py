"""Splitting byte-heavy work into lanes of about equal bytes, and running the lanes at
once: the results in order, and no lane still running when the caller goes on."""

from __future__ import annotations

import itertools
import threading
import time

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


def test_usable_cpus_follows_the_affinity_mask() -> None:
    import os

    assert lanes.usable_cpus() == len(os.sched_getaffinity(0)) >= 1


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

"""The pieces of the live benchmark cases that can be checked without timing anything:
the schedule arithmetic (made-up times) and the ``/proc`` readers (this process)."""

from __future__ import annotations

import mmap
import os

import pytest

from benchmarks import procstat
from benchmarks.schedule import combine, punctuality

T0 = 1_000_000.0


def test_on_time_snapshots_have_small_delays_and_none_missed() -> None:
    created = [T0 + k + 0.03 for k in range(1, 6)]

    result = punctuality(created, registered=T0, end=T0 + 6.2, interval=1.0)

    assert result.missed == 0
    assert result.due == 5  # slots 1..5 fell due at least one interval before the end
    assert result.taken == 5
    assert result.worst_delay == pytest.approx(0.03)


def test_a_missing_slot_is_a_miss_delayed_by_more_than_one_interval() -> None:
    created = [T0 + 1.01, T0 + 2.01, T0 + 4.01, T0 + 5.01]

    result = punctuality(created, registered=T0, end=T0 + 6.5, interval=1.0)

    assert result.missed == 1
    assert result.worst_delay == pytest.approx(3.5)  # slot 3, due at +3, still open at +6.5
    assert result.worst_delay > 1.0


def test_a_snapshot_late_by_more_than_an_interval_leaves_its_slot_empty() -> None:
    created = [T0 + 1.0, T0 + 3.2, T0 + 4.0]  # slot 2's snapshot came 1.2 s late

    result = punctuality(created, registered=T0, end=T0 + 5.5, interval=1.0)

    assert result.missed == 1
    assert result.worst_delay > 1.0


def test_slots_due_in_the_last_interval_are_not_required_yet() -> None:
    result = punctuality([T0 + 1.0], registered=T0, end=T0 + 2.9, interval=1.0)

    assert (result.due, result.missed) == (1, 0)


def test_versions_outside_the_window_are_ignored() -> None:
    created = [T0 - 5.0, T0 + 0.5, T0 + 1.0, T0 + 2.0, T0 + 9.0]

    result = punctuality(created, registered=T0, end=T0 + 3.5, interval=1.0)

    assert result.taken == 2
    assert result.missed == 0


def test_combine_adds_counts_and_keeps_the_worst_delay() -> None:
    a = punctuality([T0 + 1.1, T0 + 2.1], registered=T0, end=T0 + 3.5, interval=1.0)
    b = punctuality([T0 + 1.4], registered=T0, end=T0 + 3.5, interval=1.0)

    fleet = combine([a, b])

    assert fleet.taken == 3
    assert fleet.missed == 1
    assert fleet.worst_delay == max(a.worst_delay, b.worst_delay)


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="positive interval"):
        punctuality([], registered=T0, end=T0 - 1, interval=1.0)


def test_proc_readers_see_this_process() -> None:
    sample = procstat.memory()
    assert 0 < sample.rss <= sample.hwm
    assert procstat.private_dirty() > 0
    assert procstat.cpu_seconds() > 0


def test_memfd_bytes_counts_a_mapped_memfd_once() -> None:
    before = procstat.memfd_bytes()
    fd = os.memfd_create("bench-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 1 << 20)
        with mmap.mmap(fd, 1 << 20):  # mmap holds a duplicate of the descriptor
            assert procstat.memfd_bytes() - before == 1 << 20
    finally:
        os.close(fd)

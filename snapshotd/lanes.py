"""Byte-heavy work split over the CPUs: the caller's thread and helper threads.

Copies and digests of big buffers let go of the GIL (``np.copyto``, xxhash,
``preadv``), so a pass over a state's bytes can be split into lanes of about equal
bytes, one a usable CPU, that run at once. Restoring uses it:

- a verified restore into the run's own arrays goes over every byte twice (its digest,
  then its copy) where the plain read it is measured against goes over them once; in
  lanes it keeps pace with that read on two cores (docs/PERFORMANCE.md, P3);
- a verified read into fresh memory, piece by piece.

The experiment's copy into its arena does not: on two cores its stall got shorter, but
the training loop around it made fewer steps a second (docs/PERFORMANCE.md, "Tried and
dropped"). Work too small to pay for starting a thread, or made of items too small to
let go of the GIL for long, stays on the caller's thread.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar

from snapshotd import quota

_Part = TypeVar("_Part")
_Result = TypeVar("_Result")

#: Below this many bytes one thread does it all: a thread costs about 0.1 ms to start,
#: what two cores save on 8 MiB.
MINIMUM_BYTES = 8 << 20

#: Items smaller than this do not count toward :data:`MINIMUM_BYTES`: copying or
#: digesting one costs more in Python than in the call that lets go of the GIL, so a
#: second lane only contends for the GIL (20,000 arrays of 1 KiB, digested and copied
#: out of a mapping: 17.9 ms in two lanes, 16.4 ms in one).
MINIMUM_ITEM = 64 << 10


def even_parts(sizes: Sequence[int], cpus: int, minimum: int = MINIMUM_BYTES) -> list[range]:
    """Consecutive index ranges over items of ``sizes`` bytes (in order, as the tensors
    of a layout), one for each of ``cpus``, each holding about the same number of bytes;
    one range of all items when none has :data:`MINIMUM_ITEM` bytes, or those that do
    hold fewer than ``minimum`` bytes together.

    An item is never cut: a lane that would start where the previous one started is
    dropped, so one big item makes one lane.
    """
    # max() first: a state of tens of thousands of small items is told apart in C.
    if not sizes or cpus < 2 or max(sizes) < MINIMUM_ITEM:
        return [range(len(sizes))]
    if sum(filter(MINIMUM_ITEM.__le__, sizes)) < minimum:
        return [range(len(sizes))]
    ends = list(itertools.accumulate(sizes))
    count = min(cpus, len(ends))
    starts = [0]
    for lane in range(1, count):
        start = _closest_start(ends, ends[-1] * lane // count)
        # A lane that would hold no bytes is not started.
        if starts[-1] < start < len(ends) and _before(ends, start) > _before(ends, starts[-1]):
            starts.append(start)
    if len(starts) > 1 and ends[-1] == _before(ends, starts[-1]):
        starts.pop()
    return [range(a, b) for a, b in zip(starts, [*starts[1:], len(ends)], strict=True)]


def _closest_start(ends: Sequence[int], share: int) -> int:
    """Where the lane that should begin at byte ``share`` begins: before or after the
    item that straddles it, whichever boundary is nearer."""
    straddling = bisect.bisect_left(ends, share)
    if straddling and share - ends[straddling - 1] < ends[straddling] - share:
        return straddling
    return straddling + 1


def _before(ends: Sequence[int], index: int) -> int:
    """The bytes of the items before ``index``."""
    return ends[index - 1] if index else 0


def usable_cpus() -> int:
    """The CPUs this process may run on, not the machine's count: its affinity mask
    (which ``taskset``, a systemd ``CPUAffinity=`` or a container's cpuset narrows), and
    no more than its control group's CPU quota allows (``CPUQuota=``, a container's
    ``--cpus``; :mod:`snapshotd.quota`)."""
    affinity = len(os.sched_getaffinity(0))
    allowed = _quota()
    return affinity if allowed is None else min(affinity, allowed)


@functools.cache
def _quota() -> int | None:
    # Read once a process: reading the control group's files costs about 0.1 ms, as
    # much as loading a small state, and the count only shapes how work is split (a
    # quota changed later makes the lanes queue for CPU time, not go wrong).
    return quota.quota_cpus()


class Lanes:
    """Threads for the parts of :func:`even_parts`, for the life of a ``with`` block.

    ``map(work, parts)`` runs ``work`` on every part at once, the first on the caller's
    thread, and returns the results in the parts' order. An exception in any part is
    raised after all parts have finished, so no part still runs when the caller moves on;
    of several, the earliest part's. Once the interpreter is shutting down, helpers take
    no more work and every part runs on the caller's thread.
    """

    def __init__(self, count: int) -> None:
        self._pool = ThreadPoolExecutor(count - 1, "snapshotd-lane") if count > 1 else None

    def __enter__(self) -> Lanes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def map(self, work: Callable[[_Part], _Result], parts: Sequence[_Part]) -> list[_Result]:
        started = [self._start(work, part) for part in parts[1:]]
        try:
            first = [work(part) for part in parts[:1]]
            # Parts no helper took (there are none, or the interpreter is shutting down
            # and starts no threads) run here, after the first.
            here = {
                index: work(part)
                for index, (part, future) in enumerate(zip(parts[1:], started, strict=True))
                if future is None
            }
        finally:
            # Wait for every helper even when the caller's part failed: the parts share
            # buffers that the caller may release once this returns.
            failures = [future.exception() for future in started if future is not None]
        failure = next((failure for failure in failures if failure is not None), None)
        if failure is not None:
            try:
                raise failure
            finally:
                # The traceback holds this frame, whose locals would hold the exception
                # again: a cycle that keeps every buffer of the work alive until the
                # cyclic collector runs (never, in a loop that turned it off).
                del failure, failures, started
        rest = [here[i] if future is None else future.result() for i, future in enumerate(started)]
        return [*first, *rest]

    def _start(self, work: Callable[[_Part], _Result], part: _Part) -> Future[_Result] | None:
        """``work(part)`` on a helper; None when there is none, or when the interpreter
        is shutting down (an ``atexit`` handler, a daemon thread at exit) and a pool no
        longer starts work."""
        if self._pool is None:
            return None
        try:
            return self._pool.submit(work, part)
        except RuntimeError:
            return None

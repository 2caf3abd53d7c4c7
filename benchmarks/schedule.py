"""Whether an experiment's snapshots came on schedule, from their ``created`` times.

The daemon schedules an experiment ``every: I`` from the moment it discovers it: slot
``k`` (k >= 1) falls due at ``start + k * I`` (plus up to the configured jitter), and the
snapshot of a slot records its ``created`` time when the daemon starts taking it. From
outside, ``start`` is known as the moment the experiment registered (discovery follows
within milliseconds, and that latency counts as delay here).

For a window ``[registered, end]``:

- a version belongs to slot ``floor((created - registered) / I)``; its **delay** is
  ``created - due``;
- every slot due at least one interval before ``end`` must have a version; one that has
  none is **missed**, and its delay is ``end - due`` (more than one interval: it is late
  by at least that much);
- a version that came more than one interval after its due time lands in a later slot and
  leaves its own slot empty, so it shows up as a miss too.

So "none missed and none delayed by more than one interval" is ``worst_delay <= I``.
Pure functions: the tests feed them made-up times.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Punctuality", "combine", "punctuality"]


@dataclass(frozen=True)
class Punctuality:
    """How one experiment's (or a fleet's) snapshots kept to the schedule."""

    due: int
    taken: int
    missed: int
    worst_delay: float
    delays: tuple[float, ...]


def punctuality(
    created: Iterable[float], *, registered: float, end: float, interval: float
) -> Punctuality:
    """Check ``created`` times (POSIX seconds) against an ``every: interval`` schedule."""
    if interval <= 0 or end < registered:
        raise ValueError("need a positive interval and end >= registered")
    slots: dict[int, float] = {}
    for when in sorted(created):
        slot = math.floor((when - registered) / interval)
        if slot >= 1 and when <= end:
            slots.setdefault(slot, when)
    # Slots due at least one interval before the end: k < (end - registered) / I - 1.
    last_due = math.ceil((end - registered) / interval - 1) - 1
    delays = [when - (registered + slot * interval) for slot, when in sorted(slots.items())]
    missed_slots = [k for k in range(1, last_due + 1) if k not in slots]
    overdue = [end - (registered + k * interval) for k in missed_slots]
    return Punctuality(
        due=max(last_due, 0),
        taken=len(slots),
        missed=len(missed_slots),
        worst_delay=max([*delays, *overdue], default=0.0),
        delays=tuple(delays),
    )


def combine(parts: Sequence[Punctuality]) -> Punctuality:
    """The fleet's view: totals, and the worst delay of any experiment."""
    return Punctuality(
        due=sum(p.due for p in parts),
        taken=sum(p.taken for p in parts),
        missed=sum(p.missed for p in parts),
        worst_delay=max((p.worst_delay for p in parts), default=0.0),
        delays=tuple(d for p in parts for d in p.delays),
    )

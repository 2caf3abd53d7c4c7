"""The snapshot use case: ask an experiment for its state, commit it, prune by policy.

:func:`capture` is one snapshot, start to finish, as a chain of named steps::

    persist: request (transport) -> commit (store, from the shared mapping) -> done
    then:    prune

:func:`persist` alone ends when the snapshot is durable and the experiment has its
memory back; pruning comes after, as nobody waits for it.

It knows nothing of schedules, threads or signals (that is the daemon's business) and
takes the clock reading as a parameter. Retention runs only after a successful commit,
so a failing disk never makes the daemon delete the snapshots it still has.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from datetime import datetime

from snapshotd.retention import Decision, Policy
from snapshotd.store import Store
from snapshotd.transport import Capture, Experiment, StagingBudgetExceeded

__all__ = ["Budget", "Outcome", "capture", "persist"]


class Budget:
    """Bytes of state that may be in flight at once, across all experiments."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.in_use + nbytes > self.limit:
                return False
            self.in_use += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.in_use -= nbytes


@dataclass(frozen=True)
class Outcome:
    """A committed snapshot."""

    name: str
    version: int
    step: int | None
    safe_point: bool
    nbytes: int
    #: Versions the retention policy deleted afterwards (none from :func:`persist`).
    pruned: tuple[int, ...]


def capture(
    experiment: Experiment,
    store: Store,
    policy: Policy,
    *,
    timeout: float,
    now: datetime,
    budget: Budget | None = None,
) -> Outcome:
    """Take one snapshot of ``experiment`` (:func:`persist`), then apply ``policy``.

    Raises:
        SnapshotSkipped: no safe point came within ``timeout``, or the state does not fit
            the staging ``budget`` right now.
        PeerError, ProtocolError: the experiment is gone or misbehaved.
        CommitFailed: the store could not write it (older versions are untouched).
    """
    persisted = persist(experiment, store, timeout=timeout, now=now, budget=budget)
    decisions = store.prune(experiment.name, policy)
    return dataclasses.replace(persisted, pruned=_deleted(decisions))


def persist(
    experiment: Experiment,
    store: Store,
    *,
    timeout: float,
    now: datetime,
    budget: Budget | None = None,
) -> Outcome:
    """Ask ``experiment`` for its state and commit it; return once it is durable and the
    experiment has been told (``done``). Nothing is pruned. Raises as :func:`capture`."""
    taken = experiment.snapshot(timeout)
    if budget is not None and not budget.reserve(taken.nbytes):
        taken.release()
        experiment.done(taken.id, error="skipped: over the daemon's staging budget")
        raise StagingBudgetExceeded(
            experiment.name,
            f"{taken.nbytes} bytes would exceed the staging budget "
            f"({budget.in_use} of {budget.limit} bytes in flight)",
        )
    try:
        version = _commit(experiment.name, taken, store, now)
    except BaseException as exc:
        taken.release()
        experiment.done(taken.id, error=str(exc) or type(exc).__name__)
        raise
    finally:
        if budget is not None:
            budget.release(taken.nbytes)
    taken.release()
    experiment.done(taken.id, version)
    return Outcome(experiment.name, version, taken.step, taken.safe_point, taken.nbytes, ())


def _commit(name: str, taken: Capture, store: Store, now: datetime) -> int:
    # Written straight from the experiment's shared memory: the arena is already in the
    # file's order, so the data section goes out as one buffer.
    with taken.payload() as payload:
        return store.commit_payload(
            name, payload, step=taken.step, safe_point=taken.safe_point, created=now
        )


def _deleted(decisions: list[Decision]) -> tuple[int, ...]:
    return tuple(d.version for d in decisions if not d.keep)

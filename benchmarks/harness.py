"""The registry of cases, the runner and the statistics every case shares.

A *case* is a named measurement that applies to some states. Registering one::

    @case("peer.pickle_dump_fsync", "pickle.dump(HIGHEST) + fsync", group="peer",
          limit="limit.write_fsync")
    def _pickle(ctx: Context) -> Bench:
        return PickleDump(ctx)

The factory gets a :class:`Context` (the state, a private directory) and returns a
:class:`Bench`, whose ``run`` is the only timed part. The runner measures every case of a
state in interleaved rounds (round 1: every case once, round 2: every case once, ...),
in a seeded random order per round, so slow drifts of this shared machine hit all cases
alike and no case always inherits its neighbour's after-effects; ratios between cases
are taken per round (:func:`paired_ratio`). Before every timed run, untimed: the garbage
collector runs and ``os.sync()`` flushes whatever the previous run left dirty.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from benchmarks.states import StateData, StateSpec

__all__ = [
    "REGISTRY",
    "Bench",
    "Case",
    "Context",
    "Group",
    "Result",
    "Summary",
    "case",
    "cases_for",
    "paired_ratio",
    "run_state",
    "summarize",
]

Group = Literal["limit", "peer", "snapshotd"]
GROUPS: tuple[Group, ...] = ("limit", "peer", "snapshotd")


@dataclass(frozen=True)
class Context:
    """What a case gets: the state (shared, read-only) and a directory of its own."""

    state: StateData
    workdir: Path
    quick: bool


class Bench:
    """One case on one state. Only :meth:`run` is timed; override what you need."""

    def setup(self) -> None:
        """Once, before the first run (write the file a read case reads, ...)."""

    def before(self) -> None:
        """Before each run, untimed (drop a file from the page cache, ...)."""

    def run(self) -> None:
        """The measured operation."""
        raise NotImplementedError

    def measured(self, elapsed: float) -> float:
        """The time recorded for the run just done: ``elapsed``, the wall time of
        :meth:`run`, unless the case timed its operation itself (inside a child process)."""
        return elapsed

    def after(self) -> None:
        """After each run, untimed (free the result, unlink the written file, ...)."""

    def teardown(self) -> None:
        """Once, after the last run."""

    def notes(self) -> dict[str, Any]:
        """Facts worth keeping with the timings (JSON-able), e.g. page-cache residency."""
        return {}


Factory = Callable[[Context], Bench]


@dataclass(frozen=True)
class Case:
    """A registered measurement.

    ``limit`` and ``peers`` name the cases this one is compared with (same state, same
    run); ``states`` limits it to some state keys (None: every state); ``short`` names
    it in the ratio columns of the table.
    """

    name: str
    label: str
    group: Group
    factory: Factory
    limit: str | None = None
    peers: tuple[str, ...] = ()
    states: frozenset[str] | None = None
    short: str = ""

    def applies_to(self, state: str) -> bool:
        return self.states is None or state in self.states


REGISTRY: dict[str, Case] = {}


def case(
    name: str,
    label: str,
    *,
    group: Group,
    limit: str | None = None,
    peers: Sequence[str] = (),
    states: Iterable[str] | None = None,
    short: str | None = None,
) -> Callable[[Factory], Factory]:
    """Register the decorated factory as case ``name``."""

    def register(factory: Factory) -> Factory:
        if name in REGISTRY:
            raise ValueError(f"case {name!r} is registered twice")
        REGISTRY[name] = Case(
            name,
            label,
            group,
            factory,
            limit,
            tuple(peers),
            None if states is None else frozenset(states),
            short or name.partition(".")[2] or name,
        )
        return factory

    return register


def cases_for(state: str, selected: Callable[[str], bool]) -> list[Case]:
    """The registered cases for ``state`` that pass the filter, grouped, in registry order."""
    chosen = [c for c in REGISTRY.values() if c.applies_to(state) and selected(c.name)]
    return sorted(chosen, key=lambda c: GROUPS.index(c.group))


@dataclass
class Result:
    """The timings of one case on one state; ``times[i]`` is round ``i``, None if it failed."""

    case: str
    state: str
    nbytes: int
    times: list[float] = field(default_factory=list)
    error: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)


@dataclass(frozen=True)
class Summary:
    """Median, min and max of a sample."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))

    def inverse(self, numerator: float) -> Summary:
        """``numerator / x`` for each statistic (e.g. seconds -> bytes per second)."""
        return Summary(numerator / self.median, numerator / self.max, numerator / self.min)


def summarize(result: Result) -> Summary | None:
    return Summary.of(result.times) if result.ok else None


def paired_ratio(reference: Result, measured: Result) -> Summary | None:
    """``reference time / measured time``, round by round; >1 means ``measured`` is faster.

    Both were timed in the same rounds, so pairing them cancels drift between rounds.
    """
    if not (reference.ok and measured.ok) or len(reference.times) != len(measured.times):
        return None
    return Summary.of([r / m for r, m in zip(reference.times, measured.times, strict=True)])


def _quiesce() -> None:
    gc.collect()
    os.sync()


def _failure(stage: str) -> str:
    return f"{stage}: {traceback.format_exc(limit=6).rstrip()}"


Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_state(
    spec: StateSpec,
    cases: Sequence[Case],
    *,
    root: Path,
    repeat: int,
    warmup: int,
    quick: bool,
    log: Log = _stderr,
) -> list[Result]:
    """Build ``spec``, measure every case on it in interleaved rounds, free it."""
    started = time.perf_counter()
    state = spec.build()
    log(f"state {spec.key}: {spec.label} built in {time.perf_counter() - started:.1f} s")
    benches: list[tuple[Case, Bench, Result]] = []
    for registered in cases:
        result = Result(registered.name, spec.key, state.nbytes)
        workdir = root / spec.key / registered.name
        workdir.mkdir(parents=True)
        try:
            bench = registered.factory(Context(state, workdir, quick))
            bench.setup()
        except Exception:
            result.error = _failure("setup")
            log(f"  {registered.name}: {result.error}")
            bench = Bench()
        benches.append((registered, bench, result))
    for round_ in range(warmup + repeat):
        timed = round_ >= warmup
        # A fresh, seeded order every round: no case always follows the same neighbour
        # (on a VM the previous case's memory use can change the next one's page faults).
        order = list(benches)
        random.Random(f"{spec.key}/{round_}").shuffle(order)
        for registered, bench, result in order:
            if result.error is not None:
                continue
            try:
                _quiesce()
                bench.before()
                begin = time.perf_counter()
                bench.run()
                elapsed = bench.measured(time.perf_counter() - begin)
                bench.after()
            except Exception:
                result.error = _failure(f"round {round_}")
                log(f"  {registered.name}: {result.error}")
                continue
            if timed:
                result.times.append(elapsed)
        log(f"  round {round_ + 1}/{warmup + repeat} done ({time.perf_counter() - started:.0f} s)")
    for registered, bench, result in benches:
        try:
            bench.teardown()
            result.notes = bench.notes()
        except Exception:
            result.error = result.error or _failure("teardown")
            log(f"  {registered.name}: {result.error}")
    results = [result for _, _, result in benches]
    del benches, state
    gc.collect()
    return results

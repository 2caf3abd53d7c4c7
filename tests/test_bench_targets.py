"""The target arithmetic of the benchmark harness, on made-up timings (nothing timed)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.harness import Result
from benchmarks.targets import evaluate


def results(persist: float, plain: float, preallocated: float) -> dict[tuple[str, str], Result]:
    """P4's cases on state d, the same time in each of three rounds."""
    times = {
        "live.stall": 0.01,
        "live.dumps": 0.1,
        "live.persist": persist,
        "limit.write_fsync": plain,
        "limit.write_fallocate_fsync": preallocated,
    }
    return {(case, "d"): Result(case, "d", 1, [t] * 3) for case, t in times.items()}


def p4(persist: float, plain: float, preallocated: float) -> dict[str, Any]:
    (target,) = [t for t in evaluate(results(persist, plain, preallocated)) if t["id"] == "P4"]
    return target


@pytest.mark.parametrize(
    ("persist", "plain", "preallocated", "verdict"),
    [
        (0.030, 0.040, 0.010, True),  # the named reference decides, even when the other is short
        (0.030, 0.010, 0.040, False),  # and the other cannot rescue it
        (0.010, 0.010, 0.010, True),
    ],
)
def test_a_shown_condition_never_decides_a_verdict(
    persist: float, plain: float, preallocated: float, verdict: bool
) -> None:
    target = p4(persist, plain, preallocated)
    shown = [c for c in target["conditions"] if not c["decides"]]
    assert [c["reference"] for c in shown] == ["limit.write_fallocate_fsync"]
    assert shown[0]["ratio"] == pytest.approx(preallocated / persist)
    assert target["pass"] is verdict

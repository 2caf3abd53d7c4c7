"""Reporting: the readable table, the target verdicts and the JSON document.

Throughput is the state's payload bytes (the sum of the arrays' sizes, the same for every
case of a state) divided by the time; GB/s means 10^9 bytes per second. A ratio is
``reference time / case time`` taken round by round (see :func:`harness.paired_ratio`):
above 1 the case is faster than the reference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import REGISTRY, Result, Summary, paired_ratio, summarize
from benchmarks.states import StateSpec

__all__ = ["fmt", "render_table", "render_targets", "to_json", "write_json"]

Results = Mapping[tuple[str, str], Result]


def fmt(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits, never in exponent notation."""
    if value == 0:
        return "0"
    magnitude = len(str(int(abs(value)))) if abs(value) >= 1 else 0
    if abs(value) < 1:
        text = f"{value:.{digits}g}"
        if "e" in text:
            text = f"{value:.{digits + 6}f}".rstrip("0")
        return text
    return f"{value:.{max(digits - magnitude, 0)}f}"


def _span(summary: Summary, digits: int = 3) -> str:
    return f"{fmt(summary.median, digits)} [{fmt(summary.min, digits)}-{fmt(summary.max, digits)}]"


def _ratio(reference: Result | None, measured: Result) -> Summary | None:
    return None if reference is None else paired_ratio(reference, measured)


def _ratio_text(results: Results, reference: str | None, measured: Result) -> str:
    if reference is None:
        return ""
    ratio = _ratio(results.get((reference, measured.state)), measured)
    if ratio is None:
        return ""
    return f"{ratio.median:.2f}x {REGISTRY[reference].short}"


def render_table(spec: StateSpec, nbytes: int, results: Results) -> str:
    """The table of one state."""
    header = ("case", "GB/s median [min-max]", "seconds median [min-max]", "vs limit", "vs peers")
    rows: list[tuple[str, ...]] = []
    for result in (r for (_, state), r in results.items() if state == spec.key):
        case = REGISTRY[result.case]
        times = summarize(result)
        if times is None:
            rows.append((case.label, "FAILED", (result.error or "").splitlines()[0], "", ""))
            continue
        peers = [_ratio_text(results, peer, result) for peer in case.peers]
        rows.append(
            (
                case.label,
                _span(times.inverse(nbytes / 1e9)),
                _span(times),
                _ratio_text(results, case.limit, result),
                ", ".join(p for p in peers if p),
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        f"state {spec.key}: {spec.label} ({nbytes:,} bytes)"
        + (f" — {spec.purpose}" if spec.purpose else ""),
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def render_targets(targets: Sequence[Mapping[str, Any]], quick: bool) -> str:
    """One line per target and per condition: ratio, requirement, PASS/FAIL."""
    lines = ["targets (report only" + (", quick sizes: not meaningful" if quick else "") + "):"]
    for target in targets:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[target["pass"]]
        lines.append(f"  {target['id']} {verdict}  {target['text']}")
        for condition in target["conditions"]:
            if condition["ratio"] is None:
                lines.append(f"      {condition['text']}: not measured")
                continue
            mark = "ok" if condition["pass"] else "short"
            if not condition["decides"]:
                mark = f"(would be {mark})"
            lines.append(
                f"      {condition['text']}: {condition['ratio']:.3f}x "
                f"(need {condition['requirement']}; rounds "
                f"{condition['ratio_min']:.3f}-{condition['ratio_max']:.3f}) {mark}"
            )
    return "\n".join(lines)


def _summary_json(summary: Summary | None) -> dict[str, float] | None:
    if summary is None:
        return None
    return {"median": summary.median, "min": summary.min, "max": summary.max}


def _result_json(result: Result, results: Results) -> dict[str, Any]:
    case = REGISTRY[result.case]
    times = summarize(result)
    comparisons = {}
    for reference in [case.limit, *case.peers]:
        if reference is not None:
            ratio = _ratio(results.get((reference, result.state)), result)
            comparisons[reference] = _summary_json(ratio)
    return {
        "case": case.name,
        "label": case.label,
        "group": case.group,
        "state": result.state,
        "nbytes": result.nbytes,
        "times_s": result.times,
        "seconds": _summary_json(times),
        "gbps": _summary_json(None if times is None else times.inverse(result.nbytes / 1e9)),
        "limit": case.limit,
        "ratios": comparisons,
        "notes": result.notes,
        "error": result.error,
    }


def to_json(
    *,
    machine: Mapping[str, Any],
    settings: Mapping[str, Any],
    specs: Sequence[StateSpec],
    results: Results,
    targets: Sequence[Mapping[str, Any]],
    elapsed: float,
) -> dict[str, Any]:
    """The whole run as one JSON-able document."""
    return {
        "schema": 1,
        "settings": dict(settings),
        "machine": dict(machine),
        "states": {
            s.key: {"label": s.label, "nbytes": s.nbytes, "arrays": s.count, "purpose": s.purpose}
            for s in specs
        },
        "cases": {
            c.name: {
                "label": c.label,
                "group": c.group,
                "limit": c.limit,
                "peers": list(c.peers),
                "states": [s.key for s in specs if c.applies_to(s.key)],
            }
            for c in REGISTRY.values()
            if any((c.name, s.key) in results for s in specs)
        },
        "results": [_result_json(r, results) for r in results.values()],
        "targets": list(targets),
        "elapsed_s": elapsed,
    }


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)

"""Smoke test of the benchmark harness: ``python -m benchmarks --quick`` runs and reports.

No timed assertions: only that it exits 0 and that the JSON holds every case on every
state with positive timings, and every target with a verdict.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: The measurements the issue asks for; the harness may have more, never fewer.
REQUIRED_CASES = {
    "limit.memcpy",
    "limit.write_fsync",
    "limit.read_cached",
    "limit.read_cached_snapshot",
    "limit.read_cold",
    "peer.pickle_dump_fsync",
    "peer.savez_fsync",
    "peer.safetensors_save_fsync",
    "peer.safetensors_load",
    "snapshotd.store_commit",
    "snapshotd.store_load",
    "snapshotd.store_restore",
    "snapshotd.save",
    "snapshotd.load",
}
STATES = {"a", "b", "c", "d"}
#: Issue "Speed": the live cases' targets (real experiment processes and daemons).
LIVE_TARGETS = {"P1/b", "P1/c", "P2/b", "P2/c", "P3/b", "P3/c", "P4", "P5", "P6"}


def _run_quick(tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out), "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "S1" in completed.stdout
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def test_quick_run_reports_every_case_with_positive_timings(tmp_path: Path) -> None:
    document = _run_quick(tmp_path)

    assert document["settings"]["quick"] is True
    assert set(document["states"]) == STATES
    assert set(document["cases"]) >= REQUIRED_CASES
    by_key = {(r["case"], r["state"]): r for r in document["results"]}
    for name, described in document["cases"].items():
        for state in described["states"]:
            result = by_key[(name, state)]
            assert result["error"] is None, result["error"]
            assert len(result["times_s"]) == document["settings"]["repeat"]
            assert all(t > 0 for t in result["times_s"]), (name, state, result["times_s"])
            assert result["gbps"]["median"] > 0
    for name in REQUIRED_CASES:
        assert set(document["cases"][name]["states"]) == STATES, name

    targets = {t["id"]: t for t in document["targets"]}
    assert set(targets) == {"S1", "S2", "S3", *LIVE_TARGETS}
    for target in targets.values():
        assert target["pass"] in (True, False)
        assert all(c["ratio"] > 0 for c in target["conditions"])

    machine = document["machine"]
    assert machine["filesystem"]
    assert machine["versions"]["numpy"]
    # The benchmark files were removed.
    assert not list(tmp_path.glob(".snapshotd-bench-*"))

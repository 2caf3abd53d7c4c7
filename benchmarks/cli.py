"""``python -m benchmarks``: measure every case on every state, print the table, save JSON.

Exit status: 0 when every case ran, 1 when any case failed, 2 for bad arguments. The
targets are reported, never enforced: a FAIL does not change the exit status.
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import benchmarks.cases  # registers every case
from benchmarks.harness import REGISTRY, Result, cases_for, run_state
from benchmarks.report import render_table, render_targets, to_json, write_json
from benchmarks.states import state_specs
from benchmarks.system import default_workdir, describe_machine, mount_of
from benchmarks.targets import evaluate

__all__ = ["main"]

DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"
#: Keep this much free space beyond the largest state times the files a state writes.
_FILES_PER_STATE = 12


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="snapshotd against the machine's limits and its peers, on the same data.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny states, 2 rounds: a smoke test (seconds)"
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help="where to write the results as JSON"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to write benchmark files (a fresh subdirectory is made and removed); "
        "default: the temp dir if it is on the working directory's filesystem, else the "
        "working directory",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed rounds (default 9; quick 2)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only cases matching this glob (repeatable), e.g. 'snapshotd.*'",
    )
    parser.add_argument(
        "--state", action="append", default=[], help="run only this state (repeatable): a b c d"
    )
    parser.add_argument("--list", action="store_true", help="list the cases and states, then exit")
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    assert benchmarks.cases  # imported for its registrations
    specs = state_specs(args.quick)
    if args.state:
        unknown = set(args.state) - {s.key for s in specs}
        if unknown:
            _log(f"unknown state(s): {', '.join(sorted(unknown))}")
            return 2
        specs = [s for s in specs if s.key in args.state]
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 9)
    if repeat < 1 or args.warmup < 0:
        _log("--repeat must be >= 1 and --warmup >= 0")
        return 2

    def selected(name: str) -> bool:
        return not args.only or any(fnmatch.fnmatchcase(name, p) for p in args.only)

    if args.list:
        for spec in specs:
            print(f"state {spec.key}: {spec.label}")
        for registered in REGISTRY.values():
            print(f"{registered.name:32} {registered.label}")
        return 0

    base = args.dir if args.dir is not None else default_workdir()
    base.mkdir(parents=True, exist_ok=True)
    mount = mount_of(base)
    if mount.in_memory:
        _log(f"warning: the benchmark directory is on {mount.fstype}: disk limits are RAM limits")
    needed = max(s.nbytes for s in specs) * _FILES_PER_STATE
    if shutil.disk_usage(base).free < needed:
        _log(f"not enough free space for benchmark files: need {needed / 1e9:.1f} GB")
        return 2

    started = time.perf_counter()
    started_utc = datetime.now(UTC).isoformat(timespec="seconds")
    root = Path(tempfile.mkdtemp(prefix=".snapshotd-bench-", dir=base))
    machine = describe_machine(root)
    results: dict[tuple[str, str], Result] = {}
    try:
        for spec in specs:
            cases = cases_for(spec.key, selected)
            for result in run_state(
                spec, cases, root=root, repeat=repeat, warmup=args.warmup, quick=args.quick
            ):
                results[(result.case, result.state)] = result
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - started

    targets = evaluate(results)
    print(
        f"snapshotd benchmarks — {machine['cpu_model']}, {machine['usable_cpus']} CPUs, "
        f"{(machine['ram_bytes'] or 0) / 2**30:.0f} GiB RAM, {machine['filesystem']}, "
        f"kernel {machine['kernel']}, Python {machine['versions']['python']}, "
        f"numpy {machine['versions']['numpy']}"
    )
    print(
        f"{repeat} timed rounds after {args.warmup} warm-up, interleaved; GB/s = 10^9 B/s "
        "of array bytes; ratio = reference time / case time per round (median), >1 = faster\n"
    )
    for spec in specs:
        print(render_table(spec, spec.nbytes, results))
        print()
    print(render_targets(targets, args.quick))
    print(f"\ntotal {elapsed:.0f} s")

    settings = {
        "quick": args.quick,
        "repeat": repeat,
        "warmup": args.warmup,
        "only": list(args.only),
        "states": [s.key for s in specs],
        "started_utc": started_utc,
    }
    document = to_json(
        machine=machine,
        settings=settings,
        specs=specs,
        results=results,
        targets=targets,
        elapsed=elapsed,
    )
    write_json(args.json, document)
    _log(f"results written to {args.json}")
    return 1 if any(not r.ok for r in results.values()) else 0

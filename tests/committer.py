"""A child process for the crash and fault tests: commits deterministic states to a Store.

Run as ``python tests/committer.py ROOT NAME N SEED [options]`` (or ``python -m
tests.committer ...`` from the project root). It commits ``N`` versions of
:func:`state_for` ``(SEED, step)`` for ``step = START, START+1, ...`` and prints one line
per event on stdout, flushed at once, so a parent that kills it knows exactly what was
acknowledged before the kill::

    ready                      imports done, about to commit
    ack VERSION STEP           Store.commit returned VERSION for STEP: durable from here on
    pruned VERSION...          a prune deleted these versions (possibly none)
    short-writes COUNT         with --max-write: how many writev calls were cut short
    error CLASS MESSAGE        a snapshotd error ended the run (exit 3 or 4)
    done                       all N commits made (exit 0)

Exit codes: 0 done, 3 ``CommitFailed``, 4 another ``SnapshotdError``, 2 bad arguments.

The parent recomputes :func:`state_for` for the step a snapshot's header names and
compares byte for byte, so a snapshot that mixes two commits, or holds the wrong step's
data, cannot pass.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import snapshotd
from snapshotd import CommitFailed, SnapshotdError, Store
from snapshotd.retention import Policy

EXIT_OK = 0
EXIT_COMMIT_FAILED = 3
EXIT_OTHER_ERROR = 4

KIB = 1024
#: The size of the "weights" array, when the step chooses it: 64 KiB .. 4 MiB.
WEIGHT_SIZES = tuple(64 * KIB << k for k in range(7))

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, SupportsLenAndGetItem

State = dict[str, Any]


def state_for(seed: int, step: int, weights_bytes: int | None = None) -> State:
    """The state committed at ``step`` under ``seed``: a pure function of its arguments.

    Every array is drawn from a generator seeded with ``(seed, step)``, so two steps never
    share content. Without ``weights_bytes`` the size of ``weights`` also depends on the
    step (64 KiB to 4 MiB), so consecutive snapshots differ in layout too.
    """
    rng = np.random.default_rng([seed, step])
    if weights_bytes is None:
        weights_bytes = WEIGHT_SIZES[int(rng.integers(len(WEIGHT_SIZES)))]
    columns = 256
    rows = max(1, weights_bytes // (4 * columns))
    return {
        "weights": rng.standard_normal((rows, columns), dtype=np.float32),
        "moments": rng.integers(-(2**62), 2**62, size=1024, dtype=np.int64),
        "mask": rng.random(4096) < 0.5,
        "step": step,
        "tag": f"seed={seed} step={step}",
    }


def state_difference(expected: Mapping[str, Any], actual: object) -> str | None:
    """Why ``actual`` is not exactly ``expected`` (dtype, shape and every byte), or None."""
    if not isinstance(actual, dict):
        return f"loaded state is a {type(actual).__name__}, not a dict"
    if sorted(actual) != sorted(expected):
        return f"keys {sorted(actual)} != {sorted(expected)}"
    for key, want in expected.items():
        got = actual[key]
        if isinstance(want, np.ndarray):
            if not isinstance(got, np.ndarray):
                return f"{key}: {type(got).__name__} instead of an array"
            if got.dtype != want.dtype or got.shape != want.shape:
                return f"{key}: {got.dtype}{got.shape} instead of {want.dtype}{want.shape}"
            if got.tobytes() != want.tobytes():
                return f"{key}: contents differ"
        elif type(got) is not type(want) or got != want:
            return f"{key}: {got!r} instead of {want!r}"
    return None


def parse_acks(stdout: str) -> dict[int, int]:
    """``{version: step}`` for every complete ``ack`` line (a torn last line is ignored)."""
    acks: dict[int, int] = {}
    for line in stdout.splitlines(keepends=True):
        words = line.split()
        if line.endswith("\n") and len(words) == 3 and words[0] == "ack":
            acks[int(words[1])] = int(words[2])
    return acks


def command(*args: object) -> list[str]:
    """The argv that runs this program with ``args`` under the current interpreter.

    ``sys.executable``, not ``python3``: the latter may be a shell shim (pyenv), which
    would put another process between strace or a kill and the interpreter.
    """
    return [sys.executable, str(Path(__file__).resolve()), *map(str, args)]


def environment(**extra: str) -> dict[str, str]:
    """The child's environment: this one, minus test hooks, importing our ``snapshotd``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSHOTD_")}
    source = str(Path(snapshotd.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _say(*words: object) -> None:
    print(*words, flush=True)


def _cut_writes(max_bytes: int, seed: int) -> Callable[[], int]:
    """Make every ``os.writev`` in this process a real short write of 1..max_bytes bytes.

    The kernel really performs the shortened write and returns its count, which is what
    a short write is; strace's ``inject=writev:retval=N`` cannot stand in for this, as it
    skips the system call and writes nothing. Returns a function counting the cut calls.
    """
    real_writev = os.writev
    rng = random.Random(seed)
    cut = [0]

    def short_writev(fd: int, buffers: SupportsLenAndGetItem[ReadableBuffer]) -> int:
        views = [memoryview(buffers[i]).cast("B") for i in range(len(buffers))]
        total = sum(v.nbytes for v in views)
        budget = rng.randint(1, max_bytes)
        batch = []
        for view in views:
            if budget <= 0:
                break
            batch.append(view[:budget])
            budget -= min(budget, view.nbytes)
        written = real_writev(fd, batch)
        if written < total:
            cut[0] += 1
        return written

    os.writev = short_writev
    return lambda: cut[0]


def _cut_pwrites(max_bytes: int, seed: int) -> Callable[[], int]:
    """Make every ``os.pwrite`` in this process a real short write of 1..max_bytes bytes
    (the header goes out with ``pwrite``); returns a function counting the cut calls."""
    real_pwrite = os.pwrite
    rng = random.Random(seed)
    cut = [0]

    def short_pwrite(fd: int, data: ReadableBuffer, offset: int) -> int:
        view = memoryview(data).cast("B")
        written = real_pwrite(fd, view[: rng.randint(1, max_bytes)], offset)
        if written < view.nbytes:
            cut[0] += 1
        return written

    os.pwrite = short_pwrite
    return lambda: cut[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("root", help="the store's root directory")
    parser.add_argument("name", help="the run name")
    parser.add_argument("count", type=int, help="how many versions to commit")
    parser.add_argument("seed", type=int, help="seeds the states (see state_for)")
    parser.add_argument("--start", type=int, default=0, help="the first step (default 0)")
    parser.add_argument("--weights-bytes", type=int, help="fix the size of the weights array")
    parser.add_argument("--keep-last", type=int, help="prune to the last K versions")
    parser.add_argument("--prune-every", type=int, default=1, help="prune after every P commits")
    parser.add_argument("--max-write", type=int, help="cut every writev to 1..B bytes")
    args = parser.parse_args(argv)

    store = Store(args.root)
    policy = Policy(last=args.keep_last) if args.keep_last else None
    cut_count = _cut_writes(args.max_write, args.seed) if args.max_write else None
    _say("ready")
    try:
        for i in range(args.count):
            step = args.start + i
            version = store.commit(
                args.name, state_for(args.seed, step, args.weights_bytes), step=step
            )
            _say("ack", version, step)
            if policy is not None and (i + 1) % args.prune_every == 0:
                decisions = store.prune(args.name, policy)
                _say("pruned", *sorted(d.version for d in decisions if not d.keep))
    except CommitFailed as exc:
        _say("error", type(exc).__name__, exc)
        return EXIT_COMMIT_FAILED
    except SnapshotdError as exc:
        _say("error", type(exc).__name__, exc)
        return EXIT_OTHER_ERROR
    if cut_count is not None:
        _say("short-writes", cut_count())
    _say("done")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""A small deterministic experiment for the daemon tests, and a garbage-sending impostor.

Run from the project root as a child process::

    python -m tests.e2e_experiment train RUNTIME_DIR NAME [options]
    python -m tests.e2e_experiment garbage RUNTIME_DIR NAME

``train`` registers ``NAME`` with :func:`snapshotd.register` and runs the training loop of
``examples/train.py`` on small arrays: a logistic regression whose data for step ``n`` is
a pure function of ``n``. So a run that was killed and resumed from a snapshot ends with
exactly the weights of :func:`reference` ``(steps)``, bit for bit. The state tree is
``(W, b, t)`` where ``t`` is the last step trained (a snapshot of step ``n`` has
``t == n``). It prints one line per event, flushed at once::

    resumed VERSION STEP       register resumed from VERSION (STEP may be "None")
    resumed none               register did not resume
    ready PID START            the loop starts at step START
    step N LAST_VERSION        every --print-every steps, after run.step(N)
    applied T DIGEST SAFE N    the state was replaced (a push) while the loop was at step
                               N; its t is now T; SAFE is 1 inside run.step (a safe point)
    pushed V S SAME N          run.step(N) returned the pushed snapshot's version V and
                               step S; SAME is 1 if run.resumed says the same
    stalled N                  --stall-after: no run.step after step N, but stays alive
    crashing N                 --crash-after: exits at once (os._exit), leaving its socket
    done N                     --steps reached; the final state went to --out
    closed                     run.close() returned

It stops when its stdin closes (``run.close()``, exit 0) or after ``--steps`` steps.

``garbage`` registers like an experiment would (``<runtime>/experiments/NAME.lock``,
flock'd, and ``NAME.sock``), and answers every connection with bytes that are not the
protocol, then hangs up. It prints ``ready PID 0``, then ``served N`` per connection.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import snapshotd
from snapshotd import rendezvous

N_IN = 24
N_OUT = 4
BATCH = 16
CRASH_EXIT = 17
GARBAGE = b"\x00\xffnot a snapshotd frame\r\n" * 64

Array = np.ndarray[Any, Any]


def emit(*words: object) -> None:
    print(*words, flush=True)


class Model:
    """The tutorial's shape of model: its state is the arrays (and the step counter)."""

    def __init__(self) -> None:
        self.W: Array = np.zeros((N_IN, N_OUT))
        self.b: Array = np.zeros(N_OUT)
        self.t = -1
        self.in_step = False
        self.started = False
        self.loop_step = -1

    def __getstate__(self) -> tuple[Array, Array, int]:
        return (self.W, self.b, self.t)

    def __setstate__(self, state: Sequence[Any]) -> None:
        W, b, t = state
        self.W = np.array(W, dtype=np.float64)
        self.b = np.array(b, dtype=np.float64)
        self.t = int(t)
        if self.started:
            applied = digest(self.W, self.b, self.t)
            emit("applied", self.t, applied, int(self.in_step), self.loop_step)


def digest(W: Array, b: Array, t: int) -> str:
    """A fingerprint of a state, bit-exact (the parent computes it from a snapshot)."""
    h = hashlib.sha256()
    for array in (W, b):
        h.update(str(array.dtype).encode() + str(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    h.update(str(int(t)).encode())
    return h.hexdigest()[:24]


def state_digest(tree: Sequence[Any]) -> str:
    """:func:`digest` of a stored state tree ``(W, b, t)``."""
    W, b, t = tree
    return digest(np.asarray(W), np.asarray(b), int(t))


def train_step(model: Model, step: int, lr: float = 0.1) -> None:
    """One step of ``examples/train.py``'s loop, on data that depends only on ``step``."""
    rng = np.random.default_rng(step)
    x = rng.standard_normal((BATCH, N_IN))
    y = rng.integers(0, N_OUT, BATCH)
    logits = x @ model.W + model.b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(BATCH), y] -= 1
    model.W -= lr * x.T @ p / BATCH
    model.b -= lr * p.mean(axis=0)
    model.t = step


def reference(steps: int) -> Model:
    """The state of a run of ``steps`` steps that was never interrupted."""
    model = Model()
    for step in range(steps):
        train_step(model, step)
    return model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e_experiment")
    modes = parser.add_subparsers(dest="mode", required=True)
    train = modes.add_parser("train")
    garbage = modes.add_parser("garbage")
    for sub in (train, garbage):
        sub.add_argument("runtime_dir")
        sub.add_argument("name")
    train.add_argument("--steps", type=int, default=0, help="stop after this step count")
    train.add_argument("--sleep", type=float, default=0.01, help="seconds between steps")
    train.add_argument("--resume", action="store_true")
    train.add_argument("--store", default=None)
    train.add_argument("--out", default=None, help="write the final state here")
    train.add_argument("--print-every", type=int, default=0)
    train.add_argument("--stall-after", type=int, default=None)
    train.add_argument("--crash-after", type=int, default=None)
    return parser


def _watch_stdin(stop: threading.Event) -> None:
    with contextlib.suppress(OSError, ValueError):
        for _line in sys.stdin:
            pass
    stop.set()


def train(args: argparse.Namespace, stop: threading.Event) -> int:
    model = Model()
    try:
        run = snapshotd.register(
            args.name, model, resume=args.resume, runtime_dir=args.runtime_dir, store=args.store
        )
    except snapshotd.SnapshotdError as exc:
        emit("error", type(exc).__name__, str(exc).replace("\n", " "))
        return 3
    if run.resumed is None:
        emit("resumed", "none")
    else:
        emit("resumed", run.resumed.version, run.resumed.step)
    start = run.resumed.step + 1 if run.resumed and run.resumed.step is not None else 0
    emit("ready", os.getpid(), start)
    model.started = True
    n = start
    try:
        while not stop.is_set() and (args.steps == 0 or n < args.steps):
            model.loop_step = n
            train_step(model, n)
            model.in_step = True
            pushed = run.step(n)
            model.in_step = False
            if pushed is not None:
                emit("pushed", pushed.version, pushed.step, int(run.resumed == pushed), n)
            if args.print_every and n % args.print_every == 0:
                emit("step", n, run.last_version)
            if args.crash_after is not None and n >= args.crash_after:
                emit("crashing", n)
                os._exit(CRASH_EXIT)
            if args.stall_after is not None and n >= args.stall_after:
                emit("stalled", n)
                stop.wait()
                break
            if args.sleep:
                time.sleep(args.sleep)
            n += 1
        if args.steps and n >= args.steps:
            if args.out:
                snapshotd.save(args.out, model, step=n - 1)
            emit("done", n)
    finally:
        run.close()
        emit("closed")
    return 0


def garbage(args: argparse.Namespace, stop: threading.Event) -> int:
    runtime = Path(args.runtime_dir)
    rendezvous.ensure_private_dir(runtime)
    rendezvous.ensure_private_dir(rendezvous.experiments_dir(runtime))
    # Registered the way snapshotd.register does it: a flock'd lock file, then the socket.
    claim = os.open(rendezvous.experiment_lock(runtime, args.name), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
    path = rendezvous.experiment_socket(runtime, args.name)
    listener = rendezvous.bind_private(path)
    listener.settimeout(0.2)
    emit("ready", os.getpid(), 0)
    served = 0
    try:
        while not stop.is_set():
            try:
                conn, _addr = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                with contextlib.suppress(OSError):
                    conn.recv(4096)  # the daemon's hello, if it sends one
                    conn.sendall(GARBAGE)
            served += 1
            emit("served", served)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(claim)
        emit("closed")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop = threading.Event()
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    if args.mode == "garbage":
        return garbage(args, stop)
    return train(args, stop)


if __name__ == "__main__":
    sys.exit(main())

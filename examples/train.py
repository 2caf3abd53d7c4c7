"""A numpy training loop that snapshotd keeps safe (the Theano tutorial's model).

Run the daemon in one terminal (``make run``) and this in another::

    .venv/bin/python examples/train.py

Kill it with ``kill -9`` at any moment and start it again: it resumes from the newest
snapshot that verifies. Deterministic: the same seed and steps give the same weights,
with or without interruptions.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import snapshotd

HERE = Path(__file__).resolve().parent


class LogisticRegression:
    """The tutorial's class: its state is the underlying arrays, (W, b)."""

    def __init__(self, n_in: int = 784, n_out: int = 10) -> None:
        self.W = np.zeros((n_in, n_out))
        self.b = np.zeros(n_out)

    def __getstate__(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        return (self.W, self.b)

    def __setstate__(self, state: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> None:
        W, b = state
        self.W = W
        self.b = b


def batch(step: int, size: int = 64) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The data for ``step``: synthetic, but a pure function of the step (reproducible)."""
    rng = np.random.default_rng(step)
    x = rng.standard_normal((size, 784))
    y = rng.integers(0, 10, size)
    return x, y


def train_step(model: LogisticRegression, step: int, lr: float = 0.1) -> float:
    x, y = batch(step)
    logits = x @ model.W + model.b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.log(p[np.arange(len(y)), y]).mean())
    p[np.arange(len(y)), y] -= 1
    model.W -= lr * x.T @ p / len(y)
    model.b -= lr * p.mean(axis=0)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="mnist-lr")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--sleep", type=float, default=0.01, help="seconds per step")
    parser.add_argument(
        "--runtime-dir", default=os.environ.get("SNAPSHOTD_RUNTIME_DIR", str(HERE.parent / "run"))
    )
    parser.add_argument(
        "--store", default=os.environ.get("SNAPSHOTD_STORE", str(HERE.parent / "snapshots"))
    )
    parser.add_argument("--out", help="write the final weights here (.safetensors)")
    args = parser.parse_args()

    model = LogisticRegression()
    run = snapshotd.register(
        args.name, model, resume=True, runtime_dir=args.runtime_dir, store=args.store
    )
    start = run.resumed.step + 1 if run.resumed and run.resumed.step is not None else 0
    print(
        f"{args.name}: starting at step {start}"
        + (f" (resumed from version {run.resumed.version})" if run.resumed else ""),
        flush=True,
    )
    with run:
        step = start
        while step < args.steps:
            loss = train_step(model, step)
            pushed = run.step(step)
            if pushed is not None and pushed.step is not None:
                # `snapshotd restore NAME` replaced the weights with those of a snapshot:
                # go on from the step they were taken at.
                print(f"restored version {pushed.version} (step {pushed.step})", flush=True)
                step = pushed.step
            if step % 100 == 0:
                print(
                    f"step {step}: loss {loss:.4f}, last snapshot v{run.last_version}", flush=True
                )
            time.sleep(args.sleep)
            step += 1
    if args.out:
        snapshotd.save(args.out, model, step=args.steps - 1)
    print("done", flush=True)


if __name__ == "__main__":
    main()

"""An experiment for the live cases: ``python -m benchmarks.experiment_child [options]``.

It builds a state (a :class:`~benchmarks.states.StateSpec`: the harness's states are
rebuilt bit for bit), optionally registers it with ``snapshotd.register(...,
consistency="step")``, says ``{"ready": ...}`` on stdout, then obeys one JSON command
per line on stdin, answering each with one JSON line on stdout. It trains only when told
to, so between measurements it sleeps and disturbs no other case.

A training step is a small matmul with its gradient (compute-bound, one BLAS thread) and
an in-place update of one state array, taking the arrays in turn, so the state really
changes between snapshots; then ``run.step(n)``, the safe point, whose duration is
recorded. Commands (``op``):

- ``train`` {``sleep``}: train until the next command arrives (no answer);
- ``pause`` {``steps``}: the durations of those steps of the last training (the step that
  served a snapshot is the stall); also the steps and seconds trained;
- ``train_for`` {``warmup``, ``seconds``}: train ``warmup`` seconds, then count the steps
  of ``seconds`` more; snapshots committed meanwhile (``run.last_version``);
- ``memcpy``: one copy of the state into a prefaulted buffer, per array (``np.copyto``),
  timed here, in the process that pays the stall;
- ``pickle`` {``path``}: ``pickle.dump(state, f, HIGHEST_PROTOCOL)`` + flush + fsync,
  timed; the file is removed afterwards;
- ``dumps``: ``pickle.dumps(state, HIGHEST_PROTOCOL)``, timed;
- ``memory``: this process's resident memory and memfd bytes, and the same from before
  it registered;
- ``register`` {``name``} / ``unregister``: for the fleet, which registers anew each round;
- ``stop``: close the registration and exit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import pickle
import queue
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import snapshotd
from benchmarks import procstat
from benchmarks.states import StateSpec

Array = np.ndarray[Any, Any]
_LR = np.float32(1e-4)
_DECAY = np.float32(0.9999)


class Trainer:
    """The work of one training step (see the module docstring)."""

    def __init__(self, arrays: dict[str, Array]) -> None:
        rng = np.random.default_rng(7)
        self.arrays = list(arrays.values())
        self.x = rng.standard_normal((64, 256), dtype=np.float32)
        self.w = rng.standard_normal((256, 256), dtype=np.float32) * np.float32(0.01)
        self.h = np.empty((64, 256), dtype=np.float32)
        self.g = np.empty((256, 256), dtype=np.float32)

    def step(self, n: int) -> None:
        np.matmul(self.x, self.w, out=self.h)
        np.tanh(self.h, out=self.h)
        np.matmul(self.x.T, self.h, out=self.g)
        np.multiply(self.g, _LR, out=self.g)
        np.subtract(self.w, self.g, out=self.w)
        if self.arrays:
            array = self.arrays[n % len(self.arrays)]
            np.multiply(array, _DECAY, out=array)


class Child:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        spec = StateSpec(args.key, args.nbytes, args.count, uniform=args.uniform)
        self.state = spec.build().arrays
        self.trainer = Trainer(self.state)
        self.pairs: list[tuple[Array, Array]] = []
        if args.references:
            self._prefault_copy_target()
        self.run: snapshotd.Run | None = None
        self.n = 0
        self.first = 0
        self.durations: list[float] = []
        self.trained = 0.0
        self.commands: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        gc.collect()
        self.before = procstat.memory()
        if args.name:
            self._register(args.name)

    def _prefault_copy_target(self) -> None:
        total = sum(a.nbytes for a in self.state.values())
        target = np.empty(total, dtype=np.uint8)
        target.fill(0)
        offset = 0
        for array in self.state.values():
            view = target[offset : offset + array.nbytes]
            self.pairs.append((view.view(array.dtype).reshape(array.shape), array))
            offset += array.nbytes

    def _register(self, name: str) -> float:
        """Register; return the time just before (the daemon may see the socket, and
        start its schedule, before ``register`` returns)."""
        begin = time.time()
        self.run = snapshotd.register(
            name, self.state, runtime_dir=self.args.runtime_dir, consistency="step"
        )
        return begin

    # -- the loop ----------------------------------------------------------------------

    def serve(self) -> None:
        threading.Thread(target=self._read_commands, daemon=True).start()
        self._say({"ready": True, "pid": os.getpid(), "before": self.before.as_dict()})
        while True:
            command = self.commands.get()
            if command is None or command.get("op") == "stop":
                break
            self._say(self._dispatch(command))
        if self.run is not None:
            self.run.close()

    def _read_commands(self) -> None:
        for line in sys.stdin:
            if line.strip():
                self.commands.put(json.loads(line))
        self.commands.put(None)  # the parent went away: stop

    def _say(self, answer: dict[str, Any] | None) -> None:
        if answer is not None:
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()

    def _dispatch(self, command: dict[str, Any]) -> dict[str, Any] | None:
        op = command["op"]
        if op == "train":
            self._train(float(command.get("sleep", 0.0)))
            return None
        if op == "pause":
            return self._pause([int(s) for s in command.get("steps", [])])
        if op == "train_for":
            return self._train_for(float(command["warmup"]), float(command["seconds"]))
        if op == "memcpy":
            return {"seconds": self._timed(self._memcpy)}
        if op == "pickle":
            return {"seconds": self._pickle(Path(command["path"]))}
        if op == "dumps":
            return {"seconds": self._timed(self._dumps)}
        if op == "memory":
            return self._memory()
        if op == "register":
            return {"registered": self._register(str(command["name"]))}
        if op == "unregister":
            if self.run is not None:
                self.run.close()
                self.run = None
            return {"unregistered": time.time()}
        raise ValueError(f"unknown command {op!r}")

    def _one_step(self) -> None:
        self.trainer.step(self.n)
        begin = time.perf_counter()
        if self.run is not None:
            self.run.step(self.n)
        self.durations.append(time.perf_counter() - begin)
        self.n += 1

    def _train(self, sleep: float) -> None:
        """Train until a command arrives; keep every step's safe-point duration."""
        self.first, self.durations = self.n, []
        begin = time.perf_counter()
        while self.commands.empty():
            self._one_step()
            if sleep:
                time.sleep(sleep)
        self.trained = time.perf_counter() - begin

    def _pause(self, steps: Sequence[int]) -> dict[str, Any]:
        picked = {}
        for step in steps:
            index = step - self.first
            if 0 <= index < len(self.durations):
                picked[str(step)] = self.durations[index]
        return {"durations": picked, "steps": len(self.durations), "seconds": self.trained}

    def _train_for(self, warmup: float, seconds: float) -> dict[str, Any]:
        self.first, self.durations = self.n, []
        end = time.perf_counter() + warmup
        while time.perf_counter() < end:
            self._one_step()
        before = None if self.run is None else self.run.last_version
        first, begin = self.n, time.perf_counter()
        end = begin + seconds
        while time.perf_counter() < end:
            self._one_step()
        elapsed = time.perf_counter() - begin
        after = None if self.run is None else self.run.last_version
        return {
            "steps": self.n - first,
            "seconds": elapsed,
            "versions": [before, after],
            "slowest_step": max(self.durations[first - self.first :], default=0.0),
        }

    # -- the references, timed in this process -----------------------------------------

    @staticmethod
    def _timed(action: Any) -> float:
        begin = time.perf_counter()
        action()
        return time.perf_counter() - begin

    def _memcpy(self) -> None:
        for target, source in self.pairs:
            np.copyto(target, source)

    def _dumps(self) -> None:
        data = pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)
        del data

    def _pickle(self, path: Path) -> float:
        begin = time.perf_counter()
        with open(path, "wb") as stream:
            pickle.dump(self.state, stream, protocol=pickle.HIGHEST_PROTOCOL)
            stream.flush()
            os.fsync(stream.fileno())
        elapsed = time.perf_counter() - begin
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return elapsed

    def _memory(self) -> dict[str, Any]:
        gc.collect()
        return {
            "before": self.before.as_dict(),
            "now": procstat.memory().as_dict(),
            "memfd_bytes": procstat.memfd_bytes(),
            "state_bytes": sum(a.nbytes for a in self.state.values()),
        }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.experiment_child")
    parser.add_argument("--key", default="live")
    parser.add_argument("--nbytes", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--uniform", action="store_true")
    parser.add_argument("--name", default="", help="register under this name at once")
    parser.add_argument("--runtime-dir", default=None)
    parser.add_argument(
        "--references", action="store_true", help="prepare the memcpy reference's buffer"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    Child(_parser().parse_args(argv)).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

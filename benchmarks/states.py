"""The states benchmarked: named specs, built deterministically, shared by every case.

A state is a flat ``dict[str, ndarray]`` of float32 arrays, the form every peer accepts
(pickle, ``np.savez``, ``safetensors``) and a valid snapshotd state tree. Mixed-size
states draw array sizes log-uniformly over three decades (like real models: a few big
weight matrices, many small biases and norms), scaled so the total is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

__all__ = ["GIB", "KIB", "MIB", "StateData", "StateSpec", "state_specs"]

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
_ITEM = 4  # float32
_SEED = 20_261_128

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class StateSpec:
    """A state to build: ``count`` float32 arrays totalling exactly ``nbytes``."""

    key: str
    nbytes: int
    count: int
    uniform: bool = False
    purpose: str = ""

    @property
    def label(self) -> str:
        if self.uniform:
            return f"{self.count:,} arrays of {_size(self.nbytes // self.count)}"
        return f"{_size(self.nbytes)} in {self.count:,} arrays"

    def sizes(self) -> list[int]:
        """The element count of every array (deterministic)."""
        total = self.nbytes // _ITEM
        if self.uniform:
            if total % self.count:
                raise ValueError(f"state {self.key}: {self.nbytes} bytes do not split evenly")
            return [total // self.count] * self.count
        rng = np.random.default_rng(_SEED + self.count)
        weights = np.exp(rng.uniform(0.0, math.log(1000.0), self.count))
        floor = min(256, total // self.count)
        spare = total - floor * self.count
        sizes = [floor + int(w) for w in np.floor(weights / weights.sum() * spare)]
        sizes[int(np.argmax(sizes))] += total - sum(sizes)
        return sizes

    def build(self) -> StateData:
        rng = np.random.default_rng(_SEED)
        arrays = {
            f"p{i:05d}": rng.standard_normal(n, dtype=np.float32)
            for i, n in enumerate(self.sizes())
        }
        return StateData(self, arrays)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes:,} B"


@dataclass
class StateData:
    """A built state plus the contiguous buffers the physical-limit cases need."""

    spec: StateSpec
    arrays: dict[str, Array]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(a.nbytes for a in self.arrays.values())
        if self.nbytes != self.spec.nbytes:
            raise AssertionError(f"state {self.spec.key}: {self.nbytes} != {self.spec.nbytes}")

    @cached_property
    def flat(self) -> Array:
        """All the state's bytes in one contiguous (and so prefaulted) buffer, in order."""
        out = np.empty(self.nbytes, dtype=np.uint8)
        offset = 0
        for array in self.arrays.values():
            out[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
            offset += array.nbytes
        return out

    @cached_property
    def scratch(self) -> Array:
        """A prefaulted buffer of the state's size that any case may overwrite."""
        out = np.empty(self.nbytes, dtype=np.uint8)
        out.fill(0)
        return out


def state_specs(quick: bool) -> list[StateSpec]:
    """The states of a run, in the order they are measured."""
    if quick:
        return [
            StateSpec("a", 4 * MIB, 100, purpose="store targets S1, S2 (quick size)"),
            StateSpec("b", 2 * MIB, 200),
            StateSpec("c", 8 * MIB, 50),
            StateSpec("d", 2_000 * KIB, 2_000, uniform=True, purpose="S3 (quick size)"),
        ]
    return [
        StateSpec("a", 512 * MIB, 100, purpose="store targets S1, S2"),
        StateSpec("b", 64 * MIB, 200),
        StateSpec("c", 1 * GIB, 50),
        StateSpec("d", 20_000 * KIB, 20_000, uniform=True, purpose="S3: many small arrays"),
    ]

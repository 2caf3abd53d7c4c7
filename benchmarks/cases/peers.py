"""Peers: other ways to save and load the same state, each made durable the same way.

- ``pickle.dump(state, f, protocol=HIGHEST_PROTOCOL)`` + fsync: the Theano tutorial's way
  ("Loading and Saving"), and ``pickle.load`` of that file; also ``pickle.dump`` alone,
  not durable, as the strictest reference for committing many small arrays (S3);
- ``np.savez(f, **state)`` + fsync;
- ``safetensors.numpy.save_file`` + fsync (it closes the file itself, so the fsync opens it
  again), and ``safetensors.numpy.load_file`` with the page cache warm.

Every durable write goes to a new file; the runner unlinks it and ``os.sync()``s between runs.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from benchmarks.cases.files import CacheState, fsync_path, unlink
from benchmarks.harness import Bench, Context, case

WRITE_LIMIT = "limit.write_fsync"
READ_LIMIT = "limit.read_cached"
#: ``np.savez(file, **arrays)``; typed loosely (its stubs give the keywords other types).
_np_savez: Callable[..., None] = np.savez


class _Writer(Bench):
    suffix = ".bin"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.path = ctx.workdir / f"state{self.suffix}"

    def after(self) -> None:
        unlink(self.path)


class _Reader(Bench):
    suffix = ".bin"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.path = ctx.workdir / f"state{self.suffix}"
        self.cache = CacheState(cold=False)
        self.result: Any = None

    def before(self) -> None:
        self.cache.prepare(self.path)

    def after(self) -> None:
        self.result = None

    def notes(self) -> dict[str, Any]:
        return self.cache.notes()


class PickleDump(_Writer):
    """``pickle.dump``, then flush and fsync unless ``durable`` is False (the strictest
    reference for many small arrays: the bytes only reach the page cache)."""

    suffix = ".pkl"

    def __init__(self, ctx: Context, *, durable: bool = True) -> None:
        super().__init__(ctx)
        self.durable = durable

    def run(self) -> None:
        with open(self.path, "wb") as stream:
            pickle.dump(self.ctx.state.arrays, stream, protocol=pickle.HIGHEST_PROTOCOL)
            if self.durable:
                stream.flush()
                os.fsync(stream.fileno())


class PickleLoad(_Reader):
    suffix = ".pkl"

    def setup(self) -> None:
        with open(self.path, "wb") as stream:
            pickle.dump(self.ctx.state.arrays, stream, protocol=pickle.HIGHEST_PROTOCOL)
        self.run()
        self.after()

    def run(self) -> None:
        with open(self.path, "rb") as stream:
            self.result = pickle.load(stream)


class Savez(_Writer):
    suffix = ".npz"

    def run(self) -> None:
        with open(self.path, "wb") as stream:
            _np_savez(stream, **self.ctx.state.arrays)
            stream.flush()
            os.fsync(stream.fileno())


class SafetensorsSave(_Writer):
    suffix = ".safetensors"

    def run(self) -> None:
        save_file(self.ctx.state.arrays, str(self.path))
        fsync_path(self.path)


class SafetensorsLoad(_Reader):
    suffix = ".safetensors"

    def setup(self) -> None:
        save_file(self.ctx.state.arrays, str(self.path))
        self.run()
        self.after()

    def run(self) -> None:
        self.result = load_file(str(self.path))


@case(
    "peer.pickle_dump_fsync",
    "pickle.dump(HIGHEST) + fsync",
    group="peer",
    limit=WRITE_LIMIT,
    short="pickle",
)
def _pickle_dump(ctx: Context) -> Bench:
    return PickleDump(ctx)


@case(
    "peer.pickle_dump",
    "pickle.dump(HIGHEST), no fsync (not durable)",
    group="peer",
    limit=WRITE_LIMIT,
    states=("d",),
    short="pickle (no fsync)",
)
def _pickle_dump_volatile(ctx: Context) -> Bench:
    return PickleDump(ctx, durable=False)


@case("peer.savez_fsync", "np.savez + fsync", group="peer", limit=WRITE_LIMIT, short="savez")
def _savez(ctx: Context) -> Bench:
    return Savez(ctx)


@case(
    "peer.safetensors_save_fsync",
    "safetensors save_file + fsync",
    group="peer",
    limit=WRITE_LIMIT,
    short="safetensors",
)
def _safetensors_save(ctx: Context) -> Bench:
    return SafetensorsSave(ctx)


@case("peer.pickle_load", "pickle.load (warm)", group="peer", limit=READ_LIMIT, short="pickle")
def _pickle_load(ctx: Context) -> Bench:
    return PickleLoad(ctx)


@case(
    "peer.safetensors_load",
    "safetensors load_file (warm)",
    group="peer",
    limit=READ_LIMIT,
    short="safetensors",
)
def _safetensors_load(ctx: Context) -> Bench:
    return SafetensorsLoad(ctx)

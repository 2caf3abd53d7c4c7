"""Physical limits: what this machine does with the state's bytes and no format at all.

- ``limit.memcpy``: copy every array of the state into its place in one prefaulted
  buffer (``np.copyto`` per array: what an experiment pays to hand its state over);
- ``limit.memcpy_flat``: the same bytes as one contiguous copy (bandwidth alone);
- ``limit.write_fsync``: create a new file, ``os.write`` loop of the one buffer, fsync;
- ``limit.write_fallocate_fsync``: the same with ``posix_fallocate`` first, as snapshotd
  does (on ext4 it changes the speed; the targets use the plain one);
- ``limit.read_cached``: ``readinto`` the whole file into a prefaulted buffer, warm cache;
- ``limit.read_cold``: the same after ``posix_fadvise(DONTNEED)`` of the fsynced file;
- ``limit.read_cached_snapshot``: the same warm read of a file snapshotd committed (its
  data section, the same bytes), the "cached read of the same file" a restore is held to.
  The kernel keeps a file's page cache in folios of 4 KiB to 2 MiB, by how the file was
  written and read back, and a read's speed can depend on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import snapshotd
from benchmarks.cases.files import CacheState, read_into, unlink, write_durably
from benchmarks.harness import Bench, Context, case
from snapshotd import snapshot

Array = np.ndarray[Any, Any]


class Memcpy(Bench):
    def __init__(self, ctx: Context, *, flat: bool) -> None:
        self.ctx = ctx
        self.flat = flat
        self.pairs: list[tuple[Array, Array]] = []

    def setup(self) -> None:
        state = self.ctx.state
        if self.flat:
            self.pairs = [(state.scratch, state.flat)]
            return
        offset = 0
        for array in state.arrays.values():
            target = state.scratch[offset : offset + array.nbytes]
            self.pairs.append((target.view(array.dtype).reshape(array.shape), array))
            offset += array.nbytes

    def run(self) -> None:
        for target, source in self.pairs:
            np.copyto(target, source)

    def teardown(self) -> None:
        self.pairs = []


@case("limit.memcpy", "memcpy of the state, per array", group="limit", short="memcpy")
def _memcpy(ctx: Context) -> Bench:
    return Memcpy(ctx, flat=False)


@case("limit.memcpy_flat", "memcpy of the bytes, one buffer", group="limit", short="memcpy1")
def _memcpy_flat(ctx: Context) -> Bench:
    return Memcpy(ctx, flat=True)


class WriteFsync(Bench):
    def __init__(self, ctx: Context, *, preallocate: bool = False) -> None:
        self.ctx = ctx
        self.preallocate = preallocate
        self.path = ctx.workdir / "raw.bin"

    def setup(self) -> None:
        _ = self.ctx.state.flat  # built (and so prefaulted) outside the timed region

    def run(self) -> None:
        write_durably(self.path, self.ctx.state.flat, preallocate=self.preallocate)

    def after(self) -> None:
        unlink(self.path)


@case("limit.write_fsync", "raw write + fsync", group="limit", short="write+fsync")
def _write_fsync(ctx: Context) -> Bench:
    return WriteFsync(ctx)


@case(
    "limit.write_fallocate_fsync",
    "raw posix_fallocate + write + fsync",
    group="limit",
    limit="limit.write_fsync",
    short="falloc+write+fsync",
)
def _write_fallocate_fsync(ctx: Context) -> Bench:
    return WriteFsync(ctx, preallocate=True)


class Read(Bench):
    def __init__(self, ctx: Context, *, cold: bool) -> None:
        self.ctx = ctx
        self.cache = CacheState(cold=cold)
        self.path: Path = ctx.workdir / "raw.bin"
        #: Where the state's bytes begin in the file.
        self.start = 0

    def setup(self) -> None:
        write_durably(self.path, self.ctx.state.flat)
        read_into(self.path, self.ctx.state.scratch)

    def before(self) -> None:
        self.cache.prepare(self.path)

    def run(self) -> None:
        got = read_into(self.path, self.ctx.state.scratch, self.start)
        if got != self.ctx.state.nbytes:
            raise RuntimeError(f"read {got} of {self.ctx.state.nbytes} bytes")

    def notes(self) -> dict[str, Any]:
        return self.cache.notes()


@case("limit.read_cached", "raw read, page cache warm", group="limit", short="read")
def _read_cached(ctx: Context) -> Bench:
    return Read(ctx, cold=False)


@case("limit.read_cold", "raw read, cold (fadvise DONTNEED)", group="limit", short="cold read")
def _read_cold(ctx: Context) -> Bench:
    return Read(ctx, cold=True)


class ReadSnapshotFile(Read):
    """The warm read of a snapshot file's data section into the prefaulted buffer."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, cold=False)
        self.store = snapshotd.Store(ctx.workdir / "store-read")

    def setup(self) -> None:
        self.store.commit("bench", self.ctx.state.arrays)
        (self.path,) = (version.path for version in self.store.versions("bench"))
        self.start = snapshot.read_header(self.path).data_start
        self.run()


@case(
    "limit.read_cached_snapshot",
    "raw read of a snapshot file's data, page cache warm",
    group="limit",
    short="read snapshot",
)
def _read_cached_snapshot(ctx: Context) -> Bench:
    return ReadSnapshotFile(ctx)

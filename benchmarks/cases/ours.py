"""snapshotd itself, on the same state as the limits and the peers.

- ``Store.commit``: durable when it returns (temp file, fsync, rename, directory fsync);
  the committed file is unlinked between runs, so every run writes a new file;
- ``Store.load``: the newest version, every digest verified, page cache warm (and, for
  comparison with the cold read limit, after dropping the file from the page cache);
- ``Store.load(into=model, in_place=True)``: the same restored into arrays the caller
  already has, as ``resume=True, in_place=True`` restores a run: the same situation as
  the read limit's prefaulted buffer, where a plain load must first get new memory;
- ``snapshotd.save`` / ``snapshotd.load``: the store-less functions, one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import snapshotd
from benchmarks.cases.files import CacheState, unlink
from benchmarks.harness import Bench, Context, case

RUN = "bench"
WRITE_PEERS = ("peer.pickle_dump_fsync", "peer.safetensors_save_fsync", "peer.savez_fsync")
READ_PEERS = ("peer.pickle_load", "peer.safetensors_load")


def _committed(store: snapshotd.Store) -> list[Path]:
    return [v.path for v in store.versions(RUN)]


class Commit(Bench):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = snapshotd.Store(ctx.workdir / "store")

    def run(self) -> None:
        self.store.commit(RUN, self.ctx.state.arrays)

    def after(self) -> None:
        for path in _committed(self.store):
            unlink(path)


class Load(Bench):
    def __init__(self, ctx: Context, *, cold: bool) -> None:
        self.ctx = ctx
        self.cache = CacheState(cold=cold)
        self.store = snapshotd.Store(ctx.workdir / "store")
        self.path: Path | None = None
        self.result: Any = None

    def setup(self) -> None:
        self.store.commit(RUN, self.ctx.state.arrays)
        (self.path,) = _committed(self.store)
        self.run()
        self.after()

    def before(self) -> None:
        if self.path is not None:
            self.cache.prepare(self.path)

    def run(self) -> None:
        self.result = self.store.load(RUN)

    def after(self) -> None:
        if len(self.result) != len(self.ctx.state.arrays):
            raise RuntimeError("Store.load returned the wrong number of arrays")
        self.result = None

    def notes(self) -> dict[str, Any]:
        return self.cache.notes()


class Model:
    """A run's model as a resume sees it: its arrays behind the pickle hooks."""

    def __init__(self, arrays: dict[str, Any]) -> None:
        self.arrays = arrays

    def __getstate__(self) -> dict[str, Any]:
        return self.arrays

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.arrays = state


class Restore(Load):
    """Into a prefaulted copy of the state's arrays, held by a model as a resumed run's."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, cold=False)
        self.model = Model({})
        self.kept: dict[str, Any] = {}

    def setup(self) -> None:
        self.model = Model({name: array.copy() for name, array in self.ctx.state.arrays.items()})
        self.kept = dict(self.model.arrays)
        super().setup()

    def run(self) -> None:
        self.result = self.store.load(RUN, into=self.model, in_place=True).arrays

    def after(self) -> None:
        if any(self.model.arrays[name] is not array for name, array in self.kept.items()):
            raise RuntimeError("Store.load(into=...) replaced the arrays instead of filling them")
        super().after()


class Save(Bench):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.path = ctx.workdir / "state.safetensors"

    def run(self) -> None:
        snapshotd.save(self.path, self.ctx.state.arrays)

    def after(self) -> None:
        unlink(self.path)


class LoadFile(Bench):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.path = ctx.workdir / "state.safetensors"
        self.cache = CacheState(cold=False)
        self.result: Any = None

    def setup(self) -> None:
        snapshotd.save(self.path, self.ctx.state.arrays)
        self.run()
        self.after()

    def before(self) -> None:
        self.cache.prepare(self.path)

    def notes(self) -> dict[str, Any]:
        return self.cache.notes()

    def run(self) -> None:
        self.result = snapshotd.load(self.path)

    def after(self) -> None:
        self.result = None


@case(
    "snapshotd.store_commit",
    "snapshotd Store.commit (durable)",
    group="snapshotd",
    limit="limit.write_fsync",
    peers=WRITE_PEERS,
)
def _commit(ctx: Context) -> Bench:
    return Commit(ctx)


@case(
    "snapshotd.store_load",
    "snapshotd Store.load (verified, warm)",
    group="snapshotd",
    limit="limit.read_cached",
    peers=READ_PEERS,
)
def _load(ctx: Context) -> Bench:
    return Load(ctx, cold=False)


@case(
    "snapshotd.store_restore",
    "snapshotd Store.load into the run's arrays (verified, warm)",
    group="snapshotd",
    limit="limit.read_cached",
    peers=READ_PEERS,
)
def _restore(ctx: Context) -> Bench:
    return Restore(ctx)


@case(
    "snapshotd.store_load_cold",
    "snapshotd Store.load (verified, cold)",
    group="snapshotd",
    limit="limit.read_cold",
)
def _load_cold(ctx: Context) -> Bench:
    return Load(ctx, cold=True)


@case(
    "snapshotd.save",
    "snapshotd.save (durable)",
    group="snapshotd",
    limit="limit.write_fsync",
    peers=WRITE_PEERS,
)
def _save(ctx: Context) -> Bench:
    return Save(ctx)


@case(
    "snapshotd.load",
    "snapshotd.load (verified, warm)",
    group="snapshotd",
    limit="limit.read_cached",
    peers=READ_PEERS,
)
def _load_file(ctx: Context) -> Bench:
    return LoadFile(ctx)

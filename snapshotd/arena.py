"""Shared-memory arenas: the memory a state is copied into and handed over by descriptor.

An :class:`Arena` is a ``memfd`` mapped into this process. The experiment copies its
arrays into it at the offsets of a :class:`~snapshotd.format.Layout` (the same offsets
the snapshot file's data section uses, so the daemon can write it out in order) and
passes the descriptor over its socket. The arena is **reused** while the layout stays
the same: a fresh one per snapshot would pay the page faults of new memory again
(about 1 GB/s instead of the ~12 GB/s of copying into memory already touched).

:func:`map_readonly` is the receiving side: it maps a descriptor read-only after the
caller has checked the layout against the descriptor's real size.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from snapshotd.errors import RemoteProtocolError
from snapshotd.format import DtypeRun, Layout, Tensor
from snapshotd.protocol import TensorEntry, TensorTable

__all__ = ["Arena", "layout_of", "map_readonly", "table_of"]

_SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


class Arena:
    """A writable memfd of exactly ``size`` bytes, mapped into this process."""

    def __init__(self, size: int, label: str) -> None:
        self.size = size
        self.fd = os.memfd_create(f"snapshotd-{label}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            # mmap cannot map zero bytes: an empty state gets a one-byte arena.
            os.ftruncate(self.fd, max(size, 1))
            # Sealed against resizing: the reader maps it, and a file that shrank under a
            # mapping would kill the reader with SIGBUS.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SIZE_SEALS)
            self._map = mmap.mmap(self.fd, max(size, 1), mmap.MAP_SHARED)
        except OSError:
            os.close(self.fd)
            raise

    def fill(self, layout: Layout, arrays: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """Copy every array of ``arrays`` (by name) to its place in the layout."""
        self.fill_in_order(layout, list(map(arrays.__getitem__, layout.names)))

    def fill_in_order(self, layout: Layout, arrays: Sequence[np.ndarray[Any, Any]]) -> None:
        """Copy ``arrays``, one per tensor in layout order, to their places.

        Each array must have its tensor's shape, and its dtype up to byte order: it is
        copied in C order and to little-endian (what ``flatten`` would have made of it),
        and anything else raises ``TypeError`` or ``ValueError``.

        One ``np.concatenate`` per run of same-dtype tensors: for a state of 20,000
        small arrays that is half the time of copying them one by one from Python.
        """
        for run in layout.runs:
            self._fill_run(run, arrays)

    def filling(
        self, layout: Layout, arrays: Sequence[np.ndarray[Any, Any]], unit: int
    ) -> Iterator[int]:
        """:meth:`fill_in_order` a piece of ``unit`` to ``2 * unit`` bytes at a time:
        after each piece, yield how many bytes from the arena's start hold the state
        (the last yield is the arena's size; each is larger than the one before, so
        there are at most ``size / unit + 1``). Raises as :meth:`fill_in_order`.

        A piece is one or more runs of one dtype: tensors of two dtypes in turn make a
        run per tensor, and a yield per run would be a message per tensor.
        """
        done = 0
        for run in layout.runs_within(unit):
            self._fill_run(run, arrays)
            if run.end - done >= unit and run.end < layout.data_size:
                done = run.end
                yield done
        yield layout.data_size

    def _fill_run(self, run: DtypeRun, arrays: Sequence[np.ndarray[Any, Any]]) -> None:
        count = (run.end - run.begin) // run.dtype.itemsize
        if count == 0:
            return
        out = np.frombuffer(self._map, dtype=run.dtype, count=count, offset=run.begin)
        # "equiv": byte order may change, nothing else; never a silent conversion.
        np.concatenate(arrays[run.first : run.last], axis=None, out=out, casting="equiv")

    def close(self) -> None:
        try:
            self._map.close()
        finally:
            os.close(self.fd)


def table_of(layout: Layout) -> TensorTable:
    """The wire description of a layout."""
    entries = tuple(
        TensorEntry(t.name, t.dtype.name, t.shape, t.begin, t.end) for t in layout.tensors
    )
    return TensorTable(entries, layout.data_size)


def layout_of(table: TensorTable) -> Layout:
    """The layout a (validated) wire table describes, in offset order.

    A table may list its entries in any order (PROTOCOL.md); a layout is in the order of
    the bytes, which is the order a snapshot file lists and writes its tensors in.
    """
    entries = sorted(table.entries, key=lambda e: (e.begin, e.end))
    tensors = tuple(
        Tensor(e.name, np.dtype(e.dtype).newbyteorder("<"), e.shape, e.begin, e.end)
        for e in entries
    )
    return Layout(tensors, table.size)


def map_readonly(fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of a peer's sealed memfd read-only and shared (no copy).

    Raises:
        RemoteProtocolError: the descriptor is not a memfd sealed against resizing (a
            peer could shrink it under our mapping and crash us with SIGBUS).
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise RemoteProtocolError(f"the descriptor is not sealable shared memory: {exc}") from exc
    if seals & _SIZE_SEALS != _SIZE_SEALS:
        raise RemoteProtocolError("the shared memory is not sealed against resizing")
    if size == 0:
        return mmap.mmap(-1, 1)  # nothing to read; mmap cannot map zero bytes of a file
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError) as exc:
        raise RemoteProtocolError(f"the shared memory cannot be mapped: {exc}") from exc

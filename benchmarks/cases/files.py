"""Small file helpers the cases share: whole-buffer writes and reads, durable cleanup."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.system import drop_file_cache, resident_fraction

__all__ = ["CacheState", "fsync_path", "read_into", "unlink", "warm", "write_durably"]

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def write_durably(path: Path, buffer: np.ndarray[Any, Any], *, preallocate: bool = False) -> None:
    """Create ``path`` and write ``buffer`` with an ``os.write`` loop, then fsync it.

    With ``preallocate``, ``posix_fallocate`` the whole size first (as snapshotd does).
    """
    view = buffer.data.cast("B")
    fd = os.open(path, _CREATE, 0o600)
    try:
        if preallocate and len(view):
            os.posix_fallocate(fd, 0, len(view))
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_into(path: Path, buffer: np.ndarray[Any, Any], offset: int = 0) -> int:
    """``readinto`` the file at ``path`` from ``offset`` into ``buffer`` until it is full
    or the file ends; return the bytes read."""
    view = buffer.data.cast("B")
    with open(path, "rb", buffering=0) as stream:
        stream.seek(offset)
        done = 0
        while done < len(view):
            got = stream.readinto(view[done:])
            if not got:
                break
            done += got
    return done


_WARM_CHUNK = 8 << 20


def warm(path: Path) -> None:
    """Read the whole file once (untimed) so the next read finds it in the page cache.

    Needed before every warm run: a kernel may reclaim page-cache pages it considers idle
    (this project's reference VM runs DAMON with a ``pageout`` scheme for unmapped pages),
    so "written or read a while ago" does not mean "still cached".
    """
    buffer = bytearray(_WARM_CHUNK)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while os.readv(fd, [buffer]):
            pass
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file that a library wrote and closed by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class CacheState:
    """Puts a file into the page cache (or out of it) before every run, and keeps proof.

    Warm: :func:`warm` re-reads it; cold: ``posix_fadvise(DONTNEED)`` after an fsync.
    Either way ``mincore`` then measures the fraction of its pages that are resident.
    """

    def __init__(self, *, cold: bool) -> None:
        self.cold = cold
        self.resident: list[float] = []

    def prepare(self, path: Path) -> None:
        if self.cold:
            drop_file_cache(path)
        else:
            warm(path)
        fraction = resident_fraction(path)
        if fraction is not None:
            self.resident.append(fraction)

    def notes(self) -> dict[str, Any]:
        if not self.resident:
            return {"page_cache": "cold" if self.cold else "warm"}
        return {
            "page_cache": "cold" if self.cold else "warm",
            "resident_fraction_min": min(self.resident),
            "resident_fraction_max": max(self.resident),
        }

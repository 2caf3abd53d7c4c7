"""What a process costs, read from ``/proc``: memory, shared-memory files, CPU time.

Used by the live cases for the experiment (its resident set before registering and after
snapshots, the size of its ``memfd`` arenas) and for the daemon (its ``Private_Dirty``,
which must not grow with the size of the states it snapshots, and its CPU time over a
window). Linux only; every reader raises ``OSError`` when the process is gone.

``Private_Dirty`` counts pages mapped by this process alone: the daemon's read-only
mapping of an experiment's arena is mapped by both processes, so it counts as shared and
never here, while any private copy of the state the daemon made would.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MemorySample",
    "PeakSampler",
    "cpu_seconds",
    "memfd_bytes",
    "memory",
    "private_dirty",
]

_KIB = 1024
_TICKS = os.sysconf("SC_CLK_TCK")


def _fields(text: str) -> dict[str, int]:
    """``Key:   123 kB`` lines as bytes (other lines are skipped)."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * _KIB
    return values


def _proc(pid: int | None) -> Path:
    return Path("/proc") / ("self" if pid is None else str(pid))


@dataclass(frozen=True)
class MemorySample:
    """Resident memory of one process, in bytes (``/proc/<pid>/status``)."""

    rss: int
    rss_anon: int
    rss_shmem: int
    hwm: int

    def as_dict(self) -> dict[str, int]:
        return {
            "rss": self.rss,
            "rss_anon": self.rss_anon,
            "rss_shmem": self.rss_shmem,
            "hwm": self.hwm,
        }


def memory(pid: int | None = None) -> MemorySample:
    """The resident set of ``pid`` (default: this process)."""
    values = _fields((_proc(pid) / "status").read_text())
    return MemorySample(
        values.get("VmRSS", 0), values.get("RssAnon", 0), values.get("RssShmem", 0), values["VmHWM"]
    )


def private_dirty(pid: int | None = None) -> int:
    """``Private_Dirty`` of ``/proc/<pid>/smaps_rollup``, in bytes."""
    return _fields((_proc(pid) / "smaps_rollup").read_text())["Private_Dirty"]


def memfd_bytes(pid: int | None = None) -> int:
    """The total size of the ``memfd`` files ``pid`` holds open (its arenas).

    Each file counts once, however many descriptors refer to it (``mmap`` keeps a
    duplicate of the descriptor it maps).
    """
    sizes: dict[tuple[int, int], int] = {}
    for entry in (_proc(pid) / "fd").iterdir():
        try:
            if os.readlink(entry).startswith("/memfd:"):
                info = entry.stat()
                sizes[(info.st_dev, info.st_ino)] = info.st_size
        except FileNotFoundError:  # closed while we looked
            continue
    return sum(sizes.values())


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time ``pid`` has used so far (``/proc/<pid>/stat``)."""
    text = (_proc(pid) / "stat").read_text()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    after = text[text.rindex(")") + 2 :].split()
    utime, stime = int(after[11]), int(after[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS


@dataclass
class PeakSampler:
    """Samples a process's ``Private_Dirty`` on a thread; keeps the peak.

    A transient private copy of a state lasts as long as copying it does (tens of
    milliseconds per 100 MB), so a sample every ``interval`` seconds sees it.
    """

    pid: int
    interval: float = 0.01
    peak: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PeakSampler:
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="peak-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            value = private_dirty(self.pid)
        except OSError:
            return
        self.peak = max(self.peak, value)
        self.samples += 1

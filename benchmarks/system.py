"""The machine and its files: description, filesystem checks, page-cache control.

Everything here is read-only on the system except :func:`drop_file_cache`, which drops
one file's clean pages with ``posix_fadvise(DONTNEED)`` (never the global drop_caches).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snapshotd import lanes

__all__ = [
    "Mount",
    "default_workdir",
    "describe_machine",
    "drop_file_cache",
    "mount_of",
    "resident_fraction",
]

#: Filesystems that keep files in RAM: fsync costs nothing there, so disk limits lie.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs"})


@dataclass(frozen=True)
class Mount:
    """The mount a path lies on (from /proc/self/mountinfo)."""

    fstype: str
    source: str
    options: str

    @property
    def in_memory(self) -> bool:
        return self.fstype in MEMORY_FILESYSTEMS


def mount_of(path: Path) -> Mount:
    """The mount holding ``path``: the longest mount point that is a prefix of it."""
    target = os.path.realpath(path)
    best: tuple[int, Mount] = (-1, Mount("unknown", "unknown", ""))
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best[1]
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        point = fields[4].encode().decode("unicode_escape")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best[0]:
            best = (len(point), Mount(fields[sep + 1], fields[sep + 2], fields[sep + 3]))
    return best[1]


def default_workdir() -> Path:
    """Where benchmark files go by default: on the working directory's filesystem.

    The system temp dir is used when it is on that same filesystem (and so not a tmpfs
    unless the working directory is one too); otherwise a hidden directory in the
    working directory. The caller creates a fresh subdirectory inside it.
    """
    cwd = Path.cwd()
    system_tmp = Path(tempfile.gettempdir())
    try:
        same = os.stat(system_tmp).st_dev == os.stat(cwd).st_dev
    except OSError:
        same = False
    if same and not mount_of(system_tmp).in_memory:
        return system_tmp
    return cwd


def drop_file_cache(path: Path) -> None:
    """Evict ``path``'s clean pages from the page cache (they must be fsynced already)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """The fraction of ``path``'s pages in the page cache (``mincore``), or None if unknown."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(path, "rb") as stream, mmap.mmap(stream.fileno(), size, prot=mmap.PROT_READ) as m:
            address = np.frombuffer(m, dtype=np.uint8).ctypes.data
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = np.zeros(pages, dtype=np.uint8)
            if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec.ctypes) != 0:
                return None
            resident = int(np.count_nonzero(vec & 1))
    except (OSError, AttributeError, ValueError):
        return None
    return resident / pages


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _virtualized() -> bool | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return "hypervisor" in line.split()
    except OSError:
        pass
    return None


def _damon_active() -> bool:
    """Whether a DAMON monitor runs: its schemes may page out idle page cache."""
    states = Path("/sys/kernel/mm/damon/admin/kdamonds").glob("*/state")
    try:
        return any(p.read_text().strip() == "on" for p in states)
    except OSError:
        return False


def _mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _read_first_line(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "numpy": np.__version__}
    for module in ("safetensors", "xxhash", "snapshotd"):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        found[module] = str(getattr(imported, "__version__", getattr(imported, "VERSION", "?")))
    return found


def _git_revision() -> str | None:
    """The project's commit (and whether the tree differs from it), if git is there."""
    root = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def describe_machine(workdir: Path) -> dict[str, Any]:
    """What the numbers were measured on (no paths: only kinds and sizes)."""
    mount = mount_of(workdir)
    usage = shutil.disk_usage(workdir)
    return {
        "cpu_model": _cpu_model(),
        "virtualized": _virtualized(),
        "logical_cpus": os.cpu_count(),
        # What snapshotd splits its work over: the affinity mask within any CPU quota.
        "usable_cpus": lanes.usable_cpus(),
        "ram_bytes": _mem_total(),
        "kernel": platform.release(),
        "os": platform.system(),
        "filesystem": mount.fstype,
        "filesystem_options": mount.options,
        "filesystem_free_bytes": usage.free,
        "transparent_hugepages": _read_first_line("/sys/kernel/mm/transparent_hugepage/enabled"),
        "damon_active": _damon_active(),
        "versions": _versions(),
        "git_revision": _git_revision(),
        "executable_is_venv": sys.prefix != sys.base_prefix,
    }

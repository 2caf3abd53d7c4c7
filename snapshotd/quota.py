"""The CPU time a process's control group allows it, as a whole number of CPUs.

A container or a systemd unit with ``CPUQuota=200%`` on a 64-core host still has all 64
cores in its affinity mask, but only two cores' worth of time: work split into 64 lanes
would only queue for it. Linux applies the quota of the process's group and of every
group above it, so all of those this process can see are read, and the smallest wins:

- cgroup v2: ``cpu.max``, ``"<quota> <period>"`` in microseconds, or ``"max <period>"``;
- cgroup v1: ``cpu.cfs_quota_us`` (``-1``: none) over ``cpu.cfs_period_us``, in the
  hierarchy that holds the ``cpu`` controller.

Where each hierarchy is mounted, and which of its groups the mount shows at its top (a
container's own group, say), comes from ``/proc/self/mountinfo``; the process's group in
each, from ``/proc/self/cgroup``. A group the mount does not show (outside a cgroup
namespace, ``/..``) is not looked for, and nothing outside the mount is read.

A quota is time per period, spent on any CPUs: 1.5 CPUs' worth counts as 2 lanes, which
share it. Anything that cannot be read or parsed counts as no quota, as the affinity
mask then decides.

The parsers are pure (:func:`cpus_of_max`, :func:`cpus_of_cfs`, :func:`groups_of`,
:func:`mounts_of`); :func:`quota_cpus` reads the files it is pointed at, so tests lay
out a cgroup tree and its mount table in a directory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = [
    "Groups",
    "Mount",
    "Mounts",
    "cpus_of_cfs",
    "cpus_of_max",
    "groups_of",
    "mounts_of",
    "quota_cpus",
]

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
PROC_SELF_MOUNTINFO = Path("/proc/self/mountinfo")
#: The kernel's period when a v1 group's own cannot be read.
DEFAULT_PERIOD_US = "100000"


def cpus_of_max(text: str) -> int | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` (``"150000 100000"`` -> 2); None for
    ``"max ..."`` or text that is not a quota."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _cpus(fields[0], fields[1])


def cpus_of_cfs(quota: str, period: str) -> int | None:
    """CPUs allowed by cgroup v1's ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``
    (``"-1"``: no quota, None)."""
    return _cpus(quota.strip(), period.strip())


def _cpus(quota: str, period: str) -> int | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


@dataclass(frozen=True)
class Groups:
    """Where a process sits: its cgroup v2 path, and its path in the v1 hierarchy that
    holds the ``cpu`` controller."""

    unified: str | None = None
    cpu: str | None = None


def groups_of(text: str) -> Groups:
    """Parse ``/proc/<pid>/cgroup``: lines of ``id:controllers:path``."""
    unified = cpu = None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3 or not fields[2].startswith("/"):
            continue
        number, listed, path = fields
        if number == "0" and not listed:
            unified = path
        elif "cpu" in listed.split(","):
            cpu = path
    return Groups(unified, cpu)


@dataclass(frozen=True)
class Mount:
    """One mount of a cgroup hierarchy: the group it shows at its top (``root``, a path
    in the hierarchy) and where (``point``)."""

    root: str
    point: Path


@dataclass(frozen=True)
class Mounts:
    """The first mount of the v2 hierarchy, and of the v1 hierarchy holding ``cpu``."""

    unified: Mount | None = None
    cpu: Mount | None = None


def mounts_of(text: str) -> Mounts:
    """Parse ``/proc/<pid>/mountinfo``: ``id parent dev root point options [tags] - type
    source super-options``, with spaces and the like escaped as octal (``\\040``)."""
    unified = cpu = None
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        kind = fields[dash + 1] if len(fields) > dash + 1 else ""
        options = fields[dash + 3].split(",") if len(fields) > dash + 3 else []
        mount = Mount(_unescape(fields[3]), Path(_unescape(fields[4])))
        if kind == "cgroup2" and unified is None:
            unified = mount
        elif kind == "cgroup" and "cpu" in options and cpu is None:
            cpu = mount
    return Mounts(unified, cpu)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda octal: chr(int(octal[1], 8)), field)


def quota_cpus(
    proc_cgroup: Path = PROC_SELF_CGROUP, proc_mountinfo: Path = PROC_SELF_MOUNTINFO
) -> int | None:
    """The CPUs the quotas over this process allow, or None when there is no quota (or
    none that can be read)."""
    groups = groups_of(_read(proc_cgroup))
    mounts = mounts_of(_read(proc_mountinfo))
    limits = [*_v2_limits(mounts.unified, groups.unified), *_v1_limits(mounts.cpu, groups.cpu)]
    return min(limits, default=None)


def _v2_limits(mount: Mount | None, group: str | None) -> Iterator[int]:
    # On a hybrid system the v2 tree has no cpu controller, and so no cpu.max to read.
    for directory in _directories(mount, group):
        limit = cpus_of_max(_read(directory / "cpu.max"))
        if limit is not None:
            yield limit


def _v1_limits(mount: Mount | None, group: str | None) -> Iterator[int]:
    for directory in _directories(mount, group):
        quota = _read(directory / "cpu.cfs_quota_us")
        period = _read(directory / "cpu.cfs_period_us") or DEFAULT_PERIOD_US
        limit = cpus_of_cfs(quota, period) if quota else None
        if limit is not None:
            yield limit


def _directories(mount: Mount | None, group: str | None) -> list[Path]:
    """The group's directory under ``mount`` and every one above it up to the mount's
    top, deepest first; none when the mount does not show the group."""
    if mount is None or group is None:
        return []
    path, top = PurePosixPath(group), PurePosixPath(mount.root)
    if ".." in path.parts or not path.is_relative_to(top):
        return []
    parts = path.relative_to(top).parts
    return [mount.point.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""

"""The CPU time a process's control group allows it, as a whole number of CPUs.

A container or a systemd unit with ``CPUQuota=200%`` on a 64-core host still has all 64
cores in its affinity mask, but only two cores' worth of time: work split into 64 lanes
would only queue for it. Linux applies the quota of the process's group and of every
group above it, so all of them are read, and the smallest wins:

- cgroup v2: ``cpu.max``, ``"<quota> <period>"`` in microseconds, or ``"max <period>"``;
- cgroup v1: ``cpu.cfs_quota_us`` (``-1``: none) over ``cpu.cfs_period_us``, in the
  hierarchy that holds the ``cpu`` controller.

A quota of 1.5 CPUs counts as 2: the second CPU still runs half the time. Anything
that cannot be read or parsed counts as no quota, as the affinity mask then decides.

The parsers are pure (:func:`cpus_of_max`, :func:`cpus_of_cfs`, :func:`groups_of`);
:func:`quota_cpus` reads the files under the roots it is given, so tests lay out a
cgroup tree in a directory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["Groups", "cpus_of_cfs", "cpus_of_max", "groups_of", "quota_cpus"]

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


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
    holds the ``cpu`` controller (with that hierarchy's controller list, which names its
    directory under the cgroup root, as ``cpu,cpuacct``)."""

    unified: str | None = None
    cpu: str | None = None
    cpu_controllers: str | None = None


def groups_of(text: str) -> Groups:
    """Parse ``/proc/<pid>/cgroup``: lines of ``id:controllers:path``."""
    unified = cpu = controllers = None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3 or not fields[2].startswith("/"):
            continue
        number, listed, path = fields
        if number == "0" and not listed:
            unified = path
        elif "cpu" in listed.split(","):
            cpu, controllers = path, listed
    return Groups(unified, cpu, controllers)


def quota_cpus(proc_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT) -> int | None:
    """The CPUs the quotas over this process allow, or None when there is no quota (or
    none that can be read)."""
    try:
        groups = groups_of(proc_cgroup.read_text())
    except (OSError, UnicodeDecodeError):
        return None
    limits = [*_v2_limits(root, groups), *_v1_limits(root, groups)]
    return min(limits, default=None)


def _v2_limits(root: Path, groups: Groups) -> Iterator[int]:
    # Only where v2 holds the controllers (a unified mount, with cgroup.controllers at
    # its top); a hybrid system's v2 tree has no cpu controller.
    if groups.unified is None or not (root / "cgroup.controllers").exists():
        return
    for directory in _directories(root, groups.unified):
        limit = cpus_of_max(_read(directory / "cpu.max"))
        if limit is not None:
            yield limit


def _v1_limits(root: Path, groups: Groups) -> Iterator[int]:
    if groups.cpu is None or groups.cpu_controllers is None:
        return
    for name in (groups.cpu_controllers, "cpu", "cpu,cpuacct"):
        mount = root / name
        if mount.is_dir():
            break
    else:
        return
    for directory in _directories(mount, groups.cpu):
        quota = _read(directory / "cpu.cfs_quota_us")
        limit = cpus_of_cfs(quota, _read(directory / "cpu.cfs_period_us")) if quota else None
        if limit is not None:
            yield limit


def _directories(mount: Path, group: str) -> list[Path]:
    """The group's directory under ``mount`` and every one above it, up to the mount.

    In a container, ``/proc/self/cgroup`` may name a path of the host's tree while the
    container's own group is mounted at the top: when the path is not there, the top is
    the group."""
    parts = PurePosixPath(group).relative_to("/").parts
    deepest = mount.joinpath(*parts)
    if not deepest.is_dir():
        return [mount]
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""

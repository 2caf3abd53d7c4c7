"""A control group's CPU quota as a number of CPUs: the parsers, the quota found in
cgroup trees laid out in a directory with their mount table (v2, v1, hybrid, nested
groups, a container's view), and a real group where the machine lets a test make one."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotd import lanes, quota
from snapshotd.quota import (
    Groups,
    Mount,
    Mounts,
    cpus_of_cfs,
    cpus_of_max,
    groups_of,
    mounts_of,
    quota_cpus,
)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2),
        ("150000 100000", 2),  # 1.5 CPUs of time: two lanes share it
        ("50000 100000", 1),
        ("1000 100000", 1),  # never fewer than one
        ("400000 50000", 8),
        ("", None),
        ("max", None),
        ("200000", None),
        ("lots 100000", None),
        ("200000 0", None),
        ("-5 100000", None),
    ],
)
def test_cpu_max(text: str, cpus: int | None) -> None:
    assert cpus_of_max(text) == cpus


@pytest.mark.parametrize(
    ("quota_us", "period_us", "cpus"),
    [
        ("-1\n", "100000\n", None),
        ("250000\n", "100000\n", 3),
        ("100000", "100000", 1),
        ("0", "100000", None),
        ("", "100000", None),
        ("100000", "", None),
    ],
)
def test_cfs_quota(quota_us: str, period_us: str, cpus: int | None) -> None:
    assert cpus_of_cfs(quota_us, period_us) == cpus


def test_proc_cgroup_lines() -> None:
    hybrid = "12:cpu,cpuacct:/system.slice/run.service\n4:memory:/x\n0::/system.slice\n"
    assert groups_of(hybrid) == Groups("/system.slice", "/system.slice/run.service")
    assert groups_of("0::/user.slice/u.scope\n") == Groups("/user.slice/u.scope")
    assert groups_of("0::/a:b\n") == Groups("/a:b")  # a colon in a group's name
    # cpuacct alone is not the cpu controller; named and malformed lines are skipped
    assert groups_of("3:cpuacct:/a\n1:name=systemd:/b\ngarbage\n2:cpu:relative\n") == Groups()


def test_mountinfo_lines() -> None:
    v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    assert mounts_of(v2) == Mounts(unified=Mount("/", Path("/sys/fs/cgroup")))
    v1 = (
        "25 23 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n"
        "26 25 0:23 / /sys/fs/cgroup/unified rw shared:5 - cgroup2 cgroup2 rw\n"
        "27 25 0:24 / /sys/fs/cgroup/systemd rw shared:6 - cgroup cgroup rw,xattr,name=systemd\n"
        "31 25 0:28 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n"
        "32 25 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "33 25 0:30 / /elsewhere rw - cgroup cgroup rw,cpu,cpuacct\n"  # a second mount
    )
    assert mounts_of(v1) == Mounts(
        unified=Mount("/", Path("/sys/fs/cgroup/unified")),
        cpu=Mount("/docker/abc", Path("/sys/fs/cgroup/cpu,cpuacct")),
    )
    escaped = "40 31 0:40 /a\\040b /mnt/my\\040cgroup rw - cgroup cgroup rw,cpu\n"
    assert mounts_of(escaped).cpu == Mount("/a b", Path("/mnt/my cgroup"))
    assert mounts_of("garbage\n1 2 3 4 5 6\n1 2 3 / /x rw -\n") == Mounts()


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class Machine:
    """A process's /proc/self/cgroup and /proc/self/mountinfo, and the mounted trees, in
    a directory."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.mounts: list[str] = []

    def mount(self, kind: str, options: str, *, root: str = "/") -> Path:
        point = self.folder / f"mount{len(self.mounts)}"
        point.mkdir(parents=True)
        escaped = str(point).replace(" ", "\\040")
        self.mounts.append(
            f"{30 + len(self.mounts)} 1 0:1 {root} {escaped} rw - {kind} x {options}"
        )
        return point

    def quota(self, cgroup: str) -> int | None:
        write(self.folder / "cgroup", cgroup)
        write(self.folder / "mountinfo", "\n".join(self.mounts) + "\n")
        return quota_cpus(self.folder / "cgroup", self.folder / "mountinfo")


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path / "machine with spaces")


def test_v2_the_tightest_quota_of_the_group_and_those_above_it(machine: Machine) -> None:
    top = machine.mount("cgroup2", "rw,nsdelegate")
    write(top / "a" / "cpu.max", "max 100000\n")
    write(top / "a" / "b" / "cpu.max", "300000 100000\n")
    assert machine.quota("0::/a/b\n") == 3
    write(top / "a" / "cpu.max", "100000 100000\n")  # a parent's limit binds its children
    assert machine.quota("0::/a/b\n") == 1


def test_v2_without_a_quota(machine: Machine) -> None:
    top = machine.mount("cgroup2", "rw")
    write(top / "a" / "cpu.max", "max 100000\n")
    assert machine.quota("0::/a\n") is None


def test_hybrid_the_cpu_quota_is_in_the_v1_hierarchy(machine: Machine) -> None:
    unified = machine.mount("cgroup2", "rw")  # holds no cpu controller: no cpu.max
    (unified / "a").mkdir()
    cpu = machine.mount("cgroup", "rw,cpu,cpuacct")
    write(cpu / "a" / "cpu.cfs_quota_us", "250000\n")
    write(cpu / "a" / "cpu.cfs_period_us", "100000\n")
    write(cpu / "cpu.cfs_quota_us", "-1\n")
    write(cpu / "cpu.cfs_period_us", "100000\n")
    assert machine.quota("12:cpu,cpuacct:/a\n0::/a\n") == 3


def test_v1_period_unreadable_is_the_kernels_default(machine: Machine) -> None:
    cpu = machine.mount("cgroup", "rw,cpu")
    write(cpu / "g" / "cpu.cfs_quota_us", "50000\n")
    assert machine.quota("5:cpu:/g\n") == 1
    write(cpu / "g" / "cpu.cfs_quota_us", "350000\n")
    assert machine.quota("5:cpu:/g\n") == 4


def test_a_mount_of_a_containers_group_shows_it_and_its_children(machine: Machine) -> None:
    # No cgroup namespace: the process sees the host's path, the mount's top is its group.
    cpu = machine.mount("cgroup", "rw,cpu,cpuacct", root="/docker/abc")
    write(cpu / "cpu.cfs_quota_us", "200000\n")
    write(cpu / "cpu.cfs_period_us", "100000\n")
    assert machine.quota("4:cpu,cpuacct:/docker/abc\n") == 2
    write(cpu / "sub" / "cpu.cfs_quota_us", "100000\n")
    write(cpu / "sub" / "cpu.cfs_period_us", "100000\n")
    assert machine.quota("4:cpu,cpuacct:/docker/abc/sub\n") == 1


def test_a_group_the_mount_does_not_show_is_not_looked_for(machine: Machine) -> None:
    top = machine.mount("cgroup2", "rw")
    write(top.parent / "cpu.max", "100000 100000\n")  # outside the mount: never read
    write(top.parent / "sib" / "cpu.max", "100000 100000\n")
    write(top / "cpu.max", "100000 100000\n")
    # moved out of its cgroup namespace
    assert machine.quota("0::/..\n") is None
    assert machine.quota("0::/../sib\n") is None
    other = machine.mount("cgroup", "rw,cpu", root="/docker/abc")
    write(other / "cpu.cfs_quota_us", "100000\n")
    assert machine.quota("4:cpu:/docker/other\n") is None  # not under the mount's top


def test_nothing_readable_is_no_quota(machine: Machine, tmp_path: Path) -> None:
    assert quota_cpus(tmp_path / "missing", tmp_path / "missing too") is None
    top = machine.mount("cgroup2", "rw")
    (top / "a" / "cpu.max").mkdir(parents=True)  # a directory where a file should be
    assert machine.quota("0::/a\n") is None
    assert machine.quota("") is None


def test_this_process_has_a_quota_or_none() -> None:
    found = quota.quota_cpus()
    assert found is None or found >= 1


def test_usable_cpus_is_the_affinity_mask_within_the_quota(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    affinity = len(os.sched_getaffinity(0))
    found = quota.quota_cpus()
    assert lanes.usable_cpus() == (affinity if found is None else min(affinity, found)) >= 1
    for given, expected in ((1, 1), (10_000, affinity), (None, affinity)):
        lanes._quota.cache_clear()
        monkeypatch.setattr(quota, "quota_cpus", lambda given=given: given)
        try:
            assert lanes.usable_cpus() == expected
        finally:
            lanes._quota.cache_clear()


# -- a real control group ------------------------------------------------------------


def _group_base() -> tuple[Path, str] | None:
    """Where this process could make a control group with a CPU quota, and in which
    hierarchy ("v2" or "v1"); None when it plainly cannot."""
    groups = groups_of(Path("/proc/self/cgroup").read_text())
    mounts = mounts_of(Path("/proc/self/mountinfo").read_text())
    for kind, mount, group in (
        ("v2", mounts.unified, groups.unified),
        ("v1", mounts.cpu, groups.cpu),
    ):
        if mount is None or group is None or not Path(group).is_relative_to(mount.root):
            continue
        own = mount.point.joinpath(*Path(group).relative_to(mount.root).parts)
        # v2: a sibling (a group holding processes may not have children that use
        # controllers), or a child of the top; v1 has no such rule.
        base = own.parent if kind == "v2" and own != mount.point else own
        control = (base / "cgroup.subtree_control") if kind == "v2" else (base / "cpu.cfs_quota_us")
        with contextlib.suppress(OSError):
            if kind == "v2" and "cpu" not in control.read_text().split():
                continue
            if control.exists() and os.access(base, os.W_OK):
                return base, kind
    return None


@contextlib.contextmanager
def _group_with_one_cpu() -> Iterator[tuple[Path, str]]:
    found = _group_base()
    if found is None:
        pytest.skip("this process may not make a control group with a CPU quota here")
    base, kind = found
    group = base / f"snapshotd-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a control group here: {exc}")
    try:
        try:
            if kind == "v2":
                (group / "cpu.max").write_text("100000 100000")
            else:
                (group / "cpu.cfs_period_us").write_text("100000")
                # EINVAL where a group above allows less than one CPU
                (group / "cpu.cfs_quota_us").write_text("100000")
        except OSError as exc:
            pytest.skip(f"cannot set a CPU quota here: {exc}")
        yield group, kind
    finally:
        _remove_group(group)


def _remove_group(group: Path) -> None:
    # The kernel may hold a group busy for a moment after its last process was reaped.
    deadline = time.monotonic() + 5
    while True:
        try:
            group.rmdir()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                warnings.warn(f"test control group {group} left behind: {exc}", stacklevel=1)
                return
            time.sleep(0.05)


def test_a_process_in_a_group_with_a_quota_of_one_cpu_uses_one_lane() -> None:
    script = (
        "import os, sys\n"
        "sys.stdin.readline()  # moved into the group by now\n"
        "from snapshotd import lanes\n"
        "print(len(os.sched_getaffinity(0)), lanes.usable_cpus())\n"
    )
    with _group_with_one_cpu() as (group, _):
        child = subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            try:
                (group / "cgroup.procs").write_text(str(child.pid))
            except OSError as exc:
                pytest.skip(f"cannot move a process into a control group here: {exc}")
            out, _ = child.communicate("go\n", timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
    assert child.returncode == 0
    affinity, usable = map(int, out.split())
    assert affinity == len(os.sched_getaffinity(0))
    assert usable == 1

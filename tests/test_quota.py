"""A control group's CPU quota as a number of CPUs: the parsers, and the quota found in
real cgroup trees laid out in a directory (v2, v1, nested groups, a container's view)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapshotd import lanes, quota
from snapshotd.quota import Groups, cpus_of_cfs, cpus_of_max, groups_of, quota_cpus


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2),
        ("150000 100000", 2),  # 1.5 CPUs: the second one still runs half the time
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
    assert groups_of(hybrid) == Groups("/system.slice", "/system.slice/run.service", "cpu,cpuacct")
    assert groups_of("0::/user.slice/u.scope\n") == Groups("/user.slice/u.scope")
    # cpuacct alone is not the cpu controller; malformed lines are skipped
    assert groups_of("3:cpuacct:/a\ngarbage\n2:cpu:relative\n") == Groups()


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


def test_v2_the_tightest_quota_of_the_group_and_those_above_it(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu memory\n")
    write(root / "a" / "cpu.max", "max 100000\n")
    write(root / "a" / "b" / "cpu.max", "300000 100000\n")
    me = proc(tmp_path, "0::/a/b\n")
    assert quota_cpus(me, root) == 3
    write(root / "a" / "cpu.max", "100000 100000\n")  # a parent's limit binds its children
    assert quota_cpus(me, root) == 1


def test_v2_without_a_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu\n")
    write(root / "a" / "cpu.max", "max 100000\n")
    assert quota_cpus(proc(tmp_path, "0::/a\n"), root) is None


def test_a_hybrid_systems_v2_tree_is_not_read_for_the_cpu(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"  # no cgroup.controllers at the top: v1 holds the cpu
    write(root / "a" / "cpu.max", "100000 100000\n")
    assert quota_cpus(proc(tmp_path, "0::/a\n"), root) is None


def test_v1_quota_in_the_cpu_hierarchy(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    group = root / "cpu,cpuacct" / "system.slice" / "run.service"
    write(group / "cpu.cfs_quota_us", "250000\n")
    write(group / "cpu.cfs_period_us", "100000\n")
    write(root / "cpu,cpuacct" / "system.slice" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu,cpuacct" / "system.slice" / "cpu.cfs_period_us", "100000\n")
    me = proc(tmp_path, "12:cpu,cpuacct:/system.slice/run.service\n0::/system.slice\n")
    assert quota_cpus(me, root) == 3


def test_v1_cpu_mounted_under_its_own_name(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu" / "g" / "cpu.cfs_quota_us", "50000\n")
    write(root / "cpu" / "g" / "cpu.cfs_period_us", "100000\n")
    assert quota_cpus(proc(tmp_path, "5:cpuacct,cpu:/g\n"), root) == 1


def test_a_containers_own_group_is_the_top_of_its_mount(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host's path; the container sees its group at the top.
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu\n")
    write(root / "cpu.max", "200000 100000\n")
    assert quota_cpus(proc(tmp_path, "0::/kubepods/pod1/abc\n"), root) == 2


def test_nothing_readable_is_no_quota(tmp_path: Path) -> None:
    assert quota_cpus(tmp_path / "missing", tmp_path) is None
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu\n")
    (root / "a" / "cpu.max").mkdir(parents=True)  # a directory where a file should be
    assert quota_cpus(proc(tmp_path, "0::/a\n"), root) is None


def test_this_process_has_a_quota_or_none() -> None:
    found = quota.quota_cpus()
    assert found is None or found >= 1


def test_usable_cpus_is_the_affinity_mask_within_the_quota(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    affinity = len(os.sched_getaffinity(0))
    found = quota.quota_cpus()
    assert lanes.usable_cpus() == (affinity if found is None else min(affinity, found)) >= 1
    lanes._quota.cache_clear()
    monkeypatch.setattr(quota, "quota_cpus", lambda: 1)
    try:
        assert lanes.usable_cpus() == 1
    finally:
        lanes._quota.cache_clear()
    monkeypatch.setattr(quota, "quota_cpus", lambda: 10_000)
    try:
        assert lanes.usable_cpus() == affinity
    finally:
        lanes._quota.cache_clear()


def _cpu_group_base() -> tuple[Path, str] | None:
    """Where this process may make a control group with a CPU quota, and which
    hierarchy that is ("v2" or "v1"); None when it may not (not root, no controller)."""
    groups = groups_of(Path("/proc/self/cgroup").read_text())
    top = Path("/sys/fs/cgroup")
    if (top / "cgroup.controllers").exists() and groups.unified is not None:
        # A sibling of this process's group (a group holding processes may not have
        # children that use controllers), or a child of the top one.
        own = top.joinpath(*Path(groups.unified).parts[1:])
        base = own if own == top else own.parent
        control = base / "cgroup.subtree_control"
        if control.exists() and "cpu" in control.read_text().split() and os.access(base, os.W_OK):
            return base, "v2"
        return None
    if groups.cpu is not None and groups.cpu_controllers is not None:
        base = top / groups.cpu_controllers
        base = base.joinpath(*Path(groups.cpu).parts[1:])
        if (base / "cpu.cfs_quota_us").exists() and os.access(base, os.W_OK):
            return base, "v1"
    return None


def test_a_process_in_a_group_with_a_quota_of_one_cpu_uses_one_lane(tmp_path: Path) -> None:
    import subprocess
    import sys

    found = _cpu_group_base()
    if found is None:
        pytest.skip("this process may not make a control group with a CPU quota")
    base, kind = found
    group = base / f"snapshotd-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a control group here: {exc}")
    try:
        if kind == "v2":
            (group / "cpu.max").write_text("100000 100000")
        else:
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text("100000")
        script = (
            "import os, sys\n"
            "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
            "from snapshotd import lanes\n"
            "print(len(os.sched_getaffinity(0)), lanes.usable_cpus())\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, str(group / "cgroup.procs")],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        affinity, usable = map(int, done.stdout.split())
        assert affinity == len(os.sched_getaffinity(0))
        assert usable == 1
    finally:
        group.rmdir()

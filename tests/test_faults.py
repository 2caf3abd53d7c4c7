"""I/O errors during a commit: each one fails that commit cleanly with ``CommitFailed``.

"Cleanly" means (SPEC §5, DESIGN §3): the child reports ``CommitFailed`` and exits with
the committer's known code; the older versions are byte-for-byte unchanged; no new
version is listed and no file exists under its name; no temporary file is left; the
next commit works and gets a new version.

Faults come from real mechanisms:

- ``strace -e inject=SYSCALL:error=ERRNO:when=K`` (skipped when strace is missing or
  ptrace is not allowed). Injection only applies to *traced* system calls, so the call is
  in ``-e trace=`` too (``trace=none`` injects nothing), and the log (``-y`` shows the
  path behind every fd) proves that the injected call hit the intended file;
- a full tmpfs (needs ``mount``: skipped where it is not allowed);
- ``RLIMIT_FSIZE`` in the child (``EFBIG``, and a real short write before it);
- short writes: every ``writev`` of the child is cut to a random length. strace cannot
  do this: ``inject=writev:retval=N`` skips the system call, so nothing is written at all.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import snapshotd
from snapshotd import Store
from snapshotd.retention import Policy
from snapshotd.store import file_name
from tests import committer

NAME = "fault-run"
SEED = int(os.environ.get("SNAPSHOTD_TEST_SEED", "20261128"))
WEIGHTS = 256 * 1024
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def strace() -> str:
    """The strace executable, if it can trace here; else skip."""
    path = shutil.which("strace")
    if path is None:
        pytest.skip("strace is not installed")
    probe = subprocess.run(
        [path, "-f", "-o", os.devnull, "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()}")
    return path


@dataclass
class Before:
    """A store with two good versions, and what they looked like."""

    root: Path
    digests: dict[str, str]  # file name -> sha256 of its contents

    @property
    def run(self) -> Path:
        return self.root / NAME


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def two_versions(root: Path) -> Before:
    store = Store(root)
    for step in (0, 1):
        store.commit(NAME, committer.state_for(SEED, step, WEIGHTS), step=step)
    files = sorted((root / NAME).glob("v*.safetensors"))
    assert [p.name for p in files] == [file_name(1), file_name(2)]
    return Before(root, {p.name: sha256(p) for p in files})


def assert_clean_failure(before: Before, context: str) -> None:
    """The failed commit left the store exactly as it was, then the next one works."""
    run = before.run
    names = sorted(p.name for p in run.iterdir() if p.name not in (".lock",))
    assert names == sorted(before.digests), f"{context}: the run directory holds {names}"
    for name, digest in before.digests.items():
        assert sha256(run / name) == digest, f"{context}: {name} changed"
    store = Store(before.root)
    assert [v.version for v in store.versions(NAME)] == [1, 2], context
    newest = store.load(NAME)
    assert committer.state_difference(committer.state_for(SEED, 1, WEIGHTS), newest) is None

    version = store.commit(NAME, committer.state_for(SEED, 7, WEIGHTS), step=7)
    assert version > 2, f"{context}: the next commit reused version {version}"
    again = store.load(NAME, version=version)
    assert committer.state_difference(committer.state_for(SEED, 7, WEIGHTS), again) is None


def run_child(
    prefix: list[str], before: Before, *extra: object, preexec: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    """Commit one version of step 2 from a child, under ``prefix`` (strace ...)."""
    argv = committer.command(before.root, NAME, 1, SEED, "--start", 2, "--weights-bytes", WEIGHTS)
    return subprocess.run(
        [*prefix, *argv, *map(str, extra)],
        env=committer.environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        preexec_fn=preexec,
    )


def assert_commit_failed(
    result: subprocess.CompletedProcess[str], context: str, *, first: bool = True
) -> None:
    """The child's (``first``: only) commit failed with CommitFailed, and said so."""
    said = f"{context}:\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.returncode == committer.EXIT_COMMIT_FAILED, said
    assert "error CommitFailed" in result.stdout, said
    if first:
        assert committer.parse_acks(result.stdout) == {}, said


# -- strace fault injection -----------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """Inject ``error`` into the ``when``-th call of each of ``syscalls``."""

    id: str
    syscalls: str
    error: str
    #: What the injected call must have been made on: a regex over its strace line.
    target: str
    when: int = 1
    #: Limit tracing (and so injection) to calls on the run directory itself.
    on_run_dir: bool = False


TMP = r"\.tmp\.v000003\.safetensors\."
WRITES = "writev,pwritev,pwritev2,pwrite64"  # not write: that is the child's stdout too
RENAMES = "rename,renameat,renameat2"
FAULTS = [
    Fault("fallocate-ENOSPC", "fallocate", "ENOSPC", TMP),
    Fault("fallocate-EDQUOT", "fallocate", "EDQUOT", TMP),
    Fault("writev-ENOSPC", WRITES, "ENOSPC", TMP),
    Fault("writev-EIO", WRITES, "EIO", TMP),
    Fault("header-pwrite-ENOSPC", "pwrite64", "ENOSPC", TMP),
    Fault("writeback-EIO", "sync_file_range", "EIO", TMP),
    Fault("fsync-file-EIO", "fsync,fdatasync", "EIO", TMP),
    Fault("fsync-dir-EIO", "fsync,fdatasync", "EIO", f"<[^>]*/{NAME}>", on_run_dir=True),
    Fault("rename-EIO", RENAMES, "EIO", TMP),
    Fault("rename-EACCES", RENAMES, "EACCES", TMP),
]


@pytest.mark.strace
@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.id)
def test_injected_error_fails_the_commit_cleanly(tmp_path: Path, strace: str, fault: Fault) -> None:
    before = two_versions(tmp_path / "store")
    log = tmp_path / "strace.log"
    prefix = [strace, "-f", "-y", "-o", str(log), "-e", f"trace={fault.syscalls}"]
    prefix += ["-e", f"inject={fault.syscalls}:error={fault.error}:when={fault.when}"]
    if fault.on_run_dir:
        prefix += ["-P", str(before.run)]
    result = run_child(prefix, before)

    trace = log.read_text()
    injected = [line for line in trace.splitlines() if line.endswith("(INJECTED)")]
    assert len(injected) == 1, f"expected one injected call, strace logged:\n{trace}"
    assert re.search(fault.target, injected[0]), f"injected into the wrong call: {injected[0]}"
    assert f"-1 {fault.error} " in injected[0]
    assert_commit_failed(result, fault.id)
    if fault.id == "fsync-file-EIO":
        # fsyncgate: after a failed fsync the same file is never fsynced again and trusted.
        retried = [line for line in trace.splitlines() if re.search(TMP, line)]
        assert retried == injected, f"the failed file was fsynced again:\n{trace}"
    assert_clean_failure(before, fault.id)


# -- short writes ---------------------------------------------------------------------


def test_short_writes_still_produce_a_correct_file(tmp_path: Path) -> None:
    before = two_versions(tmp_path / "store")
    result = run_child([], before, "--max-write", 3000)
    assert result.returncode == 0, result.stdout + result.stderr
    assert committer.parse_acks(result.stdout) == {3: 2}
    for name, digest in before.digests.items():
        assert sha256(before.run / name) == digest
    loaded = Store(before.root).load(NAME, version=3)
    assert committer.state_difference(committer.state_for(SEED, 2, WEIGHTS), loaded) is None
    (cut,) = re.findall(r"^short-writes (\d+)$", result.stdout, re.MULTILINE)
    assert int(cut) >= 50, f"only {cut} writes were cut short: the test tested little"


def test_short_header_writes_still_produce_a_correct_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The header (hundreds of KB for thousands of arrays) goes out with pwrite at offset
    # 0 after the data: every one of its writes is cut short here, for real.
    rng = np.random.default_rng(4)
    state = {f"a{i}": rng.standard_normal(4) for i in range(3000)}
    monkeypatch.setattr(os, "pwrite", os.pwrite)  # restored after the test
    cut = committer._cut_pwrites(1000, seed=6)

    snapshotd.save(tmp_path / "many.safetensors", state)

    assert cut() >= 100, f"only {cut()} header writes were cut short"
    loaded = snapshotd.load(tmp_path / "many.safetensors")
    assert loaded.keys() == state.keys()
    for key, array in state.items():
        np.testing.assert_array_equal(loaded[key], array)


def test_short_writes_across_batches_of_many_small_arrays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of arrays (some empty) go out in several writev batches; real short
    writes cut some batches anywhere while others complete whole."""
    rng = np.random.default_rng(3)
    state = {f"a{i}": rng.standard_normal(int(rng.integers(0, 40))) for i in range(3000)}
    monkeypatch.setattr(os, "writev", os.writev)  # restored after the test
    cut = committer._cut_writes(150_000, seed=5)

    snapshotd.save(tmp_path / "many.safetensors", state)

    assert cut() >= 2, "no batch was cut short: the test tested little"
    loaded = snapshotd.load(tmp_path / "many.safetensors")
    assert loaded.keys() == state.keys()
    for key, array in state.items():
        np.testing.assert_array_equal(loaded[key], array)


# -- RLIMIT_FSIZE ---------------------------------------------------------------------


def limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    return preexec


def test_file_size_limit_fails_the_commit_cleanly(tmp_path: Path) -> None:
    before = two_versions(tmp_path / "store")
    result = run_child([], before, preexec=limit_file_size(WEIGHTS // 2))
    assert_commit_failed(result, "RLIMIT_FSIZE")
    assert "File too large" in result.stdout, result.stdout
    assert_clean_failure(before, "RLIMIT_FSIZE")


@pytest.mark.strace
@pytest.mark.parametrize("error", ["ENOSYS", "EINVAL", "ENOMEM"])
def test_a_kernel_without_early_writeback_still_commits(
    tmp_path: Path, strace: str, error: str
) -> None:
    """sync_file_range only gives the fsync a head start: where it is not supported
    (ENOSYS, EINVAL) or cannot run right now (ENOMEM), the commit goes on without it."""
    before = two_versions(tmp_path / "store")
    log = tmp_path / "strace.log"
    prefix = [strace, "-f", "-y", "-o", str(log), "-e", "trace=sync_file_range,fsync"]
    prefix += ["-e", f"inject=sync_file_range:error={error}"]
    result = run_child(prefix, before)

    assert result.returncode == 0, result.stdout + result.stderr
    assert committer.parse_acks(result.stdout) == {3: 2}
    trace = log.read_text().splitlines()
    assert len([line for line in trace if "sync_file_range(" in line]) == 1, trace
    assert any(re.search(TMP, line) and "fsync(" in line for line in trace), trace
    loaded = Store(before.root).load(NAME, version=3)
    assert committer.state_difference(committer.state_for(SEED, 2, WEIGHTS), loaded) is None


@pytest.mark.strace
def test_short_write_then_efbig_fails_the_commit_cleanly(tmp_path: Path, strace: str) -> None:
    """With preallocation skipped, the size limit cuts a writev short, then refuses."""
    before = two_versions(tmp_path / "store")
    log = tmp_path / "strace.log"
    prefix = [strace, "-f", "-y", "-o", str(log), "-e", "trace=fallocate,writev"]
    prefix += ["-e", "inject=fallocate:retval=0"]  # pretend preallocation worked
    result = run_child(prefix, before, preexec=limit_file_size(WEIGHTS // 2))
    assert_commit_failed(result, "short write, then EFBIG")
    writes = [line for line in log.read_text().splitlines() if "writev(" in line]
    returned = [line.rsplit("= ", 1)[1] for line in writes]
    assert len(returned) == 2, writes
    # The data goes first, behind the room left for the header: the limit cuts it that
    # many bytes (a few hundred) before WEIGHTS // 2.
    cut = int(returned[0])
    assert WEIGHTS // 2 - 4096 < cut < WEIGHTS // 2, f"the first writev was not cut short: {writes}"
    assert returned[1].startswith("-1 EFBIG"), writes
    assert_clean_failure(before, "short write, then EFBIG")


# -- a full file system ---------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted for the test (skip where mounting is not allowed)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount are not installed")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_file_system_fails_the_commit_cleanly(small_filesystem: Path) -> None:
    root = small_filesystem / "store"
    weights = 32 * 1024
    result = subprocess.run(
        committer.command(root, NAME, 100, SEED, "--weights-bytes", weights),
        env=committer.environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert_commit_failed(result, "full tmpfs", first=False)
    assert "No space left on device" in result.stdout
    acked = committer.parse_acks(result.stdout)  # the commits before the disk filled up
    assert len(acked) >= 2, f"the file system filled up too early: {result.stdout}"

    run = root / NAME
    leftovers = [p.name for p in run.iterdir() if not p.name.startswith("v") and p.name != ".lock"]
    assert leftovers == [], f"garbage left on the full file system: {leftovers}"
    store = Store(root)
    assert {v.version: v.step for v in store.versions(NAME)} == acked
    for version, step in acked.items():
        loaded = store.load(NAME, version=version)
        expected = committer.state_for(SEED, step, weights)
        assert committer.state_difference(expected, loaded) is None, f"v{version}"

    # Room made by retention: the store keeps serving.
    store.prune(NAME, Policy(last=1))
    version = store.commit(NAME, committer.state_for(SEED, 99, weights), step=99)
    assert version == max(acked) + 1


# -- what prune and quarantine do to a directory is made durable -----------------------


def fsyncs_after(trace: str, directory: Path, changes: str) -> tuple[int, int]:
    """(index of the last ``changes`` call in ``directory``, index of the last fsync of
    ``directory`` itself), over the lines of an ``strace -y`` log."""
    lines = trace.splitlines()
    changed = [
        i
        for i, line in enumerate(lines)
        if re.match(r"(\d+ +)?" + changes, line) and str(directory) in line
    ]
    synced = [
        i
        for i, line in enumerate(lines)
        if re.search(rf"fsync\(\d+<{re.escape(str(directory))}>\)", line)
    ]
    assert changed, f"no {changes} in {directory}:\n{trace}"
    assert synced, f"{directory} was never fsynced:\n{trace}"
    return changed[-1], synced[-1]


@pytest.mark.strace
def test_a_prune_fsyncs_the_run_directory_after_its_unlinks(tmp_path: Path, strace: str) -> None:
    before = two_versions(tmp_path / "store")
    log = tmp_path / "strace.log"
    prefix = [strace, "-f", "-y", "-o", str(log), "-e", "trace=unlink,unlinkat,fsync"]
    result = run_child(prefix, before, "--keep-last", 1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name for p in before.run.glob("v*")] == [file_name(3)]
    last_unlink, last_fsync = fsyncs_after(log.read_text(), before.run, r"unlink(at)?\(")
    assert last_fsync > last_unlink, "the unlinks were never made durable"


@pytest.mark.strace
def test_a_quarantine_fsyncs_both_directories_after_the_move(tmp_path: Path, strace: str) -> None:
    before = two_versions(tmp_path / "store")
    newest = before.run / file_name(2)
    data = bytearray(newest.read_bytes())
    data[-1] ^= 1
    newest.write_bytes(bytes(data))
    log = tmp_path / "strace.log"
    load = "import sys, warnings, snapshotd; warnings.simplefilter('ignore'); "
    load += f"snapshotd.Store(sys.argv[1]).load({NAME!r})"
    result = subprocess.run(
        [
            strace,
            "-f",
            "-y",
            "-o",
            str(log),
            "-e",
            "trace=rename,renameat,renameat2,fsync",
            sys.executable,
            "-c",
            load,
            str(before.root),
        ],
        env=committer.environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    trace = log.read_text()
    moved, synced = fsyncs_after(trace, before.run, r"rename")
    assert synced > moved, "the move out of the run directory was never made durable"
    quarantine = before.run / "quarantine"
    assert (quarantine / file_name(2)).exists()
    moved_in, synced_in = fsyncs_after(trace, quarantine, r"rename")
    assert synced_in > moved_in, "the move into quarantine was never made durable"

"""The command line as a user runs it: real ``snapshotd`` processes, exit codes, output.

SPEC §3: every command takes ``--config``; ``list``, ``verify`` and ``export`` work with
no daemon; a usage or config error exits 2 with one line naming the key path, never a
traceback. Exit codes are those of ``snapshotd/cli.py``'s docstring.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

import snapshotd
from snapshotd import exitcode
from tests.daemon_harness import Sandbox, clean_env, snapshotd_command, wait_until

EXIT_OK, EXIT_BAD, EXIT_USAGE, EXIT_NO_SNAPSHOT, EXIT_NO_DAEMON, EXIT_EXPERIMENT = 0, 1, 2, 3, 5, 6


def state(t: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int]:
    """A small state whose every value depends on ``t``."""
    return (np.full((4, 3), float(t)), np.arange(5, dtype=np.int32) + t, t)


def assert_one_clean_line(result: subprocess.CompletedProcess[str]) -> str:
    """A user error: exactly one line on stderr, starting ``snapshotd:``, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("snapshotd: "), result.stderr
    return lines[0]


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        sandbox.write_config()
        yield sandbox


@pytest.fixture
def filled(box: Sandbox) -> Sandbox:
    """A store with alpha v1..v3 (steps 10, 20, 30) and beta v1, written without a daemon."""
    store = box.store
    for t in (10, 20, 30):
        store.commit("alpha", state(t), step=t)
    store.commit("beta", state(99), step=99)
    return box


# -- configuration errors ------------------------------------------------------------

BAD_CONFIGS = {
    "unknown top-level key": ("schedul:\n  every: 1s\n", "schedul", "'schedul'"),
    "unknown daemon key": ("daemon: {timeout: 2s, retries: 3}\n", "daemon.retries", "'retries'"),
    "unknown key in an override": (
        'experiments:\n  "m-*":\n    keep: {lst: 2}\n',
        "experiments.m-*.keep.lst",
        "'lst'",
    ),
    "bad duration": ("schedule: {every: 10 minutes}\n", "schedule.every", "'10 minutes'"),
    "bad daemon duration": ("daemon: {timeout: soon}\n", "daemon.timeout", "'soon'"),
    "wrong type: string for a count": ("keep: {last: five}\n", "keep.last", "'five'"),
    "wrong type: scalar for a mapping": ("schedule: 10m\n", "schedule", "'10m'"),
    "wrong type: string for a daemon count": (
        "daemon: {max_io_failures: '3'}\n",
        "daemon.max_io_failures",
        "'3'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_start_with_a_bad_config_exits_2_naming_the_key_path(box: Sandbox, case: str) -> None:
    body, key_path, bad_value = BAD_CONFIGS[case]
    box.config.write_text(f"store: ./store\nruntime_dir: ./run\n{body}")
    result = box.cli("start", timeout=30)
    assert result.returncode == EXIT_USAGE, result.stderr
    line = assert_one_clean_line(result)
    assert line.startswith(f"snapshotd: {box.config}: {key_path}: "), line
    assert bad_value in line, line
    # The daemon did not start: nothing was created.
    assert not box.runtime.exists()
    assert not box.store_dir.exists()


TAGS = {
    "apply": '!!python/object/apply:os.system ["touch {canary}"]',
    "new": '!!python/object/new:subprocess.call [["touch", "{canary}"]]',
    "name": "!!python/name:os.system",
}


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_start_refuses_a_python_tag_and_runs_nothing(box: Sandbox, tag: str) -> None:
    canary = box.root / "canary"
    value = TAGS[tag].format(canary=canary)
    box.config.write_text(f"store: ./store\nruntime_dir: ./run\ndaemon:\n  log_level: {value}\n")
    result = box.cli("start", timeout=30)
    assert result.returncode == EXIT_USAGE, result.stderr
    line = assert_one_clean_line(result)
    assert "python/" in line, line  # it says which tag it refused
    assert not canary.exists(), "the YAML tag was executed"
    assert not box.runtime.exists()


def test_a_python_tag_error_names_its_key_path(box: Sandbox) -> None:
    # SPEC §4: "A config error names the key path". For an unknown tag the message names
    # only the whole document ("config:") and a line/column.
    canary = box.root / "canary"
    box.config.write_text(
        "store: ./store\nruntime_dir: ./run\ndaemon:\n"
        f'  log_level: !!python/object/apply:os.system ["touch {canary}"]\n'
    )
    result = box.cli("start", timeout=30)
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result)
    assert line.startswith(f"snapshotd: {box.config}: daemon.log_level: "), line


def test_missing_config_file_exits_2(box: Sandbox) -> None:
    result = box.cli("list", "--config", str(box.root / "nowhere.yaml"))
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result)
    assert "nowhere.yaml" in line


# -- read commands without a daemon ---------------------------------------------------


def test_status_without_a_daemon_exits_5(box: Sandbox) -> None:
    result = box.cli("status")
    assert result.returncode == EXIT_NO_DAEMON, result.stderr
    assert "not running" in result.stdout
    as_json = box.cli("status", "--json")
    assert as_json.returncode == EXIT_NO_DAEMON
    assert json.loads(as_json.stdout) == {"running": False}


@pytest.mark.parametrize("command", [("snapshot", "alpha"), ("restore", "alpha")])
def test_daemon_commands_without_a_daemon_exit_5(filled: Sandbox, command: tuple[str, str]) -> None:
    result = filled.cli(*command)
    assert result.returncode == EXIT_NO_DAEMON, result.stderr
    line = assert_one_clean_line(result)
    assert "no daemon" in line


def test_list_works_without_a_daemon(filled: Sandbox) -> None:
    result = filled.cli("list")
    assert result.returncode == EXIT_OK, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0][:3] == ["NAME", "VERSION", "CREATED"]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        ("alpha", "1"),
        ("alpha", "2"),
        ("alpha", "3"),
        ("beta", "1"),
    ]
    listed = json.loads(filled.cli("list", "alpha", "--json").stdout)
    assert [(v["name"], v["version"], v["step"], v["problem"]) for v in listed] == [
        ("alpha", 1, 10, None),
        ("alpha", 2, 20, None),
        ("alpha", 3, 30, None),
    ]


@pytest.mark.parametrize("command", [("status",), ("snapshot", "alpha")])
def test_commands_that_ask_the_daemon_refuse_a_store_they_would_ignore(
    filled: Sandbox, command: tuple[str, ...]
) -> None:
    result = filled.cli(*command, "--store", "nowhere")
    assert result.returncode == EXIT_USAGE
    assert "unrecognized arguments: --store" in result.stderr


def test_read_commands_take_a_store_without_any_config(filled: Sandbox) -> None:
    # README: list, verify and export also take --store DIR (no config file needed).
    for command in (["list", "--json"], ["verify"], ["export", "beta", "-o", "beta.npz"]):
        result = subprocess.run(
            [*snapshotd_command(), command[0], "--store", str(filled.store_dir), *command[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=filled.root,
            env=clean_env({"SNAPSHOTD_CONFIG": str(filled.root / "absent.yaml")}),
        )
        assert result.returncode == EXIT_OK, (command, result.stderr)
    assert (filled.root / "beta.npz").exists()


def test_verify_works_without_a_daemon_and_exits_1_on_a_bad_snapshot(filled: Sandbox) -> None:
    good = filled.cli("verify")
    assert good.returncode == EXIT_OK, good.stderr
    assert good.stdout.strip().splitlines()[-1] == "4 checked, 0 bad"
    victim = filled.store.versions("alpha")[1].path
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # one bit pattern in the last array's data
    victim.write_bytes(bytes(data))
    bad = filled.cli("verify", "--json")
    assert bad.returncode == EXIT_BAD, bad.stderr
    report = json.loads(bad.stdout)
    assert (report["checked"], report["bad"]) == (4, 1)
    assert [(s["name"], s["version"]) for s in report["snapshots"] if not s["ok"]] == [("alpha", 2)]
    assert victim.exists(), "verify is read-only: it must not move the bad file"


def test_export_works_without_a_daemon(filled: Sandbox) -> None:
    npz = filled.root / "alpha.npz"
    result = filled.cli("export", "alpha", "-o", str(npz))
    assert result.returncode == EXIT_OK, result.stderr
    assert "v3" in result.stdout
    with np.load(npz, allow_pickle=False) as exported:
        arrays = sorted((exported[k] for k in exported.files), key=lambda a: a.ndim)
    W, b, _t = state(30)
    assert [a.tobytes() for a in arrays] == [b.tobytes(), W.tobytes()]
    older = filled.root / "alpha-v1.safetensors"
    result = filled.cli("export", "alpha", "--version", "1", "-o", str(older))
    assert result.returncode == EXIT_OK, result.stderr
    tensors = safetensors.numpy.load_file(str(older))
    assert sorted(a.tobytes() for a in tensors.values()) == sorted(
        a.tobytes() for a in state(10)[:2]
    )


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("export", "alpha", "-o", "out.txt"), EXIT_USAGE),
        (("export", "gamma", "-o", "out.npz"), EXIT_NO_SNAPSHOT),
        (("export", "alpha", "--version", "99", "-o", "out.npz"), EXIT_NO_SNAPSHOT),
        (("restore", "gamma", "--", sys.executable, "-c", "pass"), EXIT_NO_SNAPSHOT),
        (("list", "bad/name"), EXIT_USAGE),
        (("list", ""), EXIT_USAGE),
        # A mistyped name or store is not an empty answer ("0 checked, 0 bad").
        (("list", "gamma"), EXIT_NO_SNAPSHOT),
        (("verify", "gamma"), EXIT_NO_SNAPSHOT),
        (("prune", "gamma"), EXIT_NO_SNAPSHOT),
        (("list", "--store", "nowhere"), EXIT_NO_SNAPSHOT),
        (("verify", "--store", "nowhere"), EXIT_NO_SNAPSHOT),
        (("prune", "--store", "nowhere"), EXIT_NO_SNAPSHOT),
        # The daemon restores from its own store: a --store here would be ignored.
        (("restore", "alpha", "--store", "nowhere"), EXIT_USAGE),
        # A name no experiment can have is the caller's mistake, not "not registered".
        (("snapshot", "a/b"), EXIT_USAGE),
        (("restore", "a/b"), EXIT_USAGE),
    ],
)
def test_refusals_have_their_exit_codes(filled: Sandbox, args: tuple[str, ...], code: int) -> None:
    result = filled.cli(*args)
    assert result.returncode == code, (result.stdout, result.stderr)
    line = assert_one_clean_line(result)
    if "gamma" in args and args[0] in ("list", "verify", "prune"):
        assert "runs: alpha, beta" in line  # what there is instead
    if "nowhere" in args:
        expected = "--store is for restore NAME -- CMD" if args[0] == "restore" else "no store at"
        assert expected in line
        assert "--store" in line


RESUME_PROBE = (
    "import os, sys; "
    "ok = os.environ.get('SNAPSHOTD_RESUME') == '2' and os.environ.get('SNAPSHOTD_STORE'); "
    "sys.exit(7 if ok else 1)"
)


def test_restore_with_a_command_runs_it_resuming_and_passes_its_exit_code(
    filled: Sandbox,
) -> None:
    result = filled.cli(
        "restore", "--version", "2", "alpha", "--", sys.executable, "-c", RESUME_PROBE
    )
    assert result.returncode == 7, result.stderr


def test_restore_accepts_version_after_the_name_as_documented(filled: Sandbox) -> None:
    # SPEC §3 and the README write it `restore NAME [--version V] -- CMD ARGS...`, but the
    # parser's REMAINDER after NAME swallows `--version 2` as the command to run.
    result = filled.cli(
        "restore", "alpha", "--version", "2", "--", sys.executable, "-c", RESUME_PROBE
    )
    assert result.returncode == 7, result.stderr


RESUMING_SCRIPT = """
import sys
import numpy as np
import snapshotd
from snapshotd import exitcode

held = {"state": (np.zeros((4, 3)), np.zeros(5, dtype=np.int32), 0)}
with snapshotd.register(
    "alpha", None, get=lambda: held["state"], set=lambda s: held.update(state=s),
    resume=True, runtime_dir=sys.argv[1],
) as run:
    print(run.resumed.version, run.resumed.step, held["state"][2])
"""


@pytest.mark.parametrize(("version", "expected"), [("1", "1 10 10"), (None, "3 30 30")])
def test_restore_with_a_command_resumes_a_resume_true_script_from_the_version_asked(
    filled: Sandbox, version: str | None, expected: str
) -> None:
    asked = ("--version", version) if version else ()
    result = filled.cli(
        "restore",
        "alpha",
        *asked,
        "--",
        sys.executable,
        "-c",
        RESUMING_SCRIPT,
        str(filled.root / "script-run"),
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.split() == expected.split()


# -- prune ------------------------------------------------------------------------------


def test_prune_dry_run_says_why_and_deletes_nothing_then_prune_applies_keep(box: Sandbox) -> None:
    for t in range(1, 7):
        box.store.commit("alpha", state(t), step=t)
    dry = box.cli("prune", "--dry-run", "--json")
    assert dry.returncode == EXIT_OK, dry.stderr
    decisions = {d["version"]: d for d in json.loads(dry.stdout)}
    assert {v for v, d in decisions.items() if d["keep"]} == {4, 5, 6}
    assert all(
        d["reasons"] == [] and d["action"] == "delete" for v, d in decisions.items() if v < 4
    )
    assert all(d["action"] == "keep" and d["dry_run"] for v, d in decisions.items() if v >= 4)
    assert "newest" in decisions[6]["reasons"]
    assert any(r.startswith("last ") for r in decisions[4]["reasons"])
    assert box.versions("alpha") == [1, 2, 3, 4, 5, 6]
    text = box.cli("prune", "--dry-run").stdout
    assert "alpha v1: would delete" in text
    assert re.search(r"alpha v5: keep \(.*last 2/3", text), text
    real = box.cli("prune")
    assert real.returncode == EXIT_OK, real.stderr
    assert "alpha v3: deleted" in real.stdout
    assert box.versions("alpha") == [4, 5, 6]


def test_prune_keeps_pinned_versions(box: Sandbox) -> None:
    box.write_config(keep={"last": 2, "pinned": [1]})
    for t in range(1, 6):
        box.store.commit("alpha", state(t), step=t)
    result = box.cli("prune", "alpha")
    assert result.returncode == EXIT_OK, result.stderr
    assert box.versions("alpha") == [1, 4, 5]
    assert "alpha v1: keep (pinned)" in result.stdout


# -- with a daemon ------------------------------------------------------------------------


def test_snapshot_prints_the_new_version_and_status_lists_the_experiment(box: Sandbox) -> None:
    box.write_config(schedule={"every": "1h"}, keep={"last": 3})
    daemon = box.start_daemon()
    exp = box.start_experiment("exp", "--print-every", "10")
    wait_until(lambda: daemon.experiment("exp"), 5, "the daemon to discover exp")
    printed = []
    for _ in range(4):
        result = box.cli("snapshot", "exp")
        assert result.returncode == EXIT_OK, result.stderr
        printed.append(int(result.stdout.strip()))
    assert printed == [1, 2, 3, 4]
    assert box.versions("exp") == [2, 3, 4]  # keep last 3, applied after each snapshot
    as_json = json.loads(box.cli("snapshot", "exp", "--json").stdout)
    assert as_json["version"] == 5
    assert as_json["pruned"] == [2]
    assert isinstance(as_json["step"], int)

    status = box.cli("status", "--json")
    assert status.returncode == EXIT_OK, status.stderr
    document = json.loads(status.stdout)
    assert document["running"] is True
    assert document["pid"] == daemon.pid
    (entry,) = document["experiments"]
    assert (entry["name"], entry["pid"], entry["last_version"]) == ("exp", exp.pid, 5)
    assert entry["schedule"] == "every 1h"
    table = box.cli("status").stdout
    assert re.search(rf"^exp\s+{exp.pid}\s+every 1h\s+5\s", table, re.M), table

    unknown = box.cli("snapshot", "nosuch")
    assert unknown.returncode == EXIT_EXPERIMENT
    assert "is registered" in assert_one_clean_line(unknown)
    assert daemon.stop() == 0
    assert exp.finish() == 0


@pytest.fixture
def served(box: Sandbox) -> Sandbox:
    """A daemon (manual snapshots only) with the experiment exp and its version 1."""
    box.write_config(schedule={"every": "1h"})
    daemon = box.start_daemon()
    box.start_experiment("exp")
    wait_until(lambda: daemon.experiment("exp"), 5, "the daemon to discover exp")
    assert box.cli("snapshot", "exp").stdout.strip() == "1"
    return box


def test_the_daemons_commands_go_on_while_its_config_file_is_invalid(served: Sandbox) -> None:
    # The daemon keeps its last good config while the file is being edited; the
    # commands that only talk to it need nothing from the file but runtime_dir.
    good = served.config.read_text()
    served.config.write_text(good.replace("keep:", "keep:\n  hourli: 2"))
    warning = (
        f"snapshotd: warning: {served.config}: keep.hourli: unknown key 'hourli'; allowed keys: "
    )
    for args in (("status", "--json"), ("snapshot", "exp"), ("restore", "exp")):
        result = served.cli(*args)
        assert result.returncode == EXIT_OK, (args, result.stderr)
        assert result.stderr.startswith(warning), (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
    assert json.loads(served.cli("status", "--json").stdout)["running"] is True

    # Without even YAML there is no runtime_dir to go on with: a usage error that says
    # which file and where.
    served.config.write_text("runtime_dir: [\n")
    broken = served.cli("status")
    assert broken.returncode == EXIT_USAGE
    assert assert_one_clean_line(broken).startswith(
        f"snapshotd: {served.config}: config: invalid YAML at line"
    )
    served.config.write_text(good)


def test_push_restore_prints_what_it_restored(served: Sandbox) -> None:
    result = served.cli("restore", "--version", "1", "exp")
    assert result.returncode == EXIT_OK, result.stderr
    assert re.fullmatch(r"restored exp v1 \(step \d+\)\n", result.stdout), result.stdout


def test_restore_json_is_for_the_push_only(served: Sandbox) -> None:
    pushed = served.cli("restore", "exp", "--version", "1", "--json")
    assert pushed.returncode == EXIT_OK, pushed.stderr
    assert json.loads(pushed.stdout)["version"] == 1
    started = served.cli("restore", "exp", "--json", "--", sys.executable, "-c", "pass")
    assert started.returncode == EXIT_USAGE
    assert "--json is for restore NAME" in assert_one_clean_line(started)


def test_push_restore_accepts_version_after_the_name_as_documented(served: Sandbox) -> None:
    # `snapshotd restore NAME [--version V]` (SPEC §3): the parser takes `--version 1`
    # for a command to start instead of an option.
    result = served.cli("restore", "exp", "--version", "1")
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith("restored exp v1 "), result.stdout


def test_push_restore_of_a_missing_version_exits_3(served: Sandbox) -> None:
    # cli.py: exit 3 is "no snapshot (or no good snapshot) to act on".
    result = served.cli("restore", "--version", "99", "exp")
    assert_one_clean_line(result)
    assert result.returncode == EXIT_NO_SNAPSHOT, result.stderr


def test_push_restore_into_an_unknown_experiment_exits_6(served: Sandbox) -> None:
    result = served.cli("restore", "nosuch")
    assert result.returncode == EXIT_EXPERIMENT, result.stderr
    assert "is registered" in assert_one_clean_line(result)


def test_commands_read_the_config_relative_to_its_own_directory(
    box: Sandbox, tmp_path: Path
) -> None:
    # store and runtime_dir in the config are relative to the config file, not the cwd.
    box.config.write_text("store: ./store\nruntime_dir: ./run\n")
    box.store.commit("alpha", state(1), step=1)
    result = subprocess.run(
        [*snapshotd_command(), "list", "--config", str(box.config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert [v["version"] for v in json.loads(result.stdout)] == [1]


def test_a_fallback_past_a_damaged_snapshot_is_one_warning_line(filled: Sandbox) -> None:
    newest = filled.store_dir / "alpha" / "v000003.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 1
    newest.write_bytes(bytes(data))
    result = filled.cli("export", "alpha", "-o", "alpha.npz")
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.strip().startswith("exported alpha v2 ")
    # The message alone: no file and line of snapshotd's, no "FallbackWarning".
    assert result.stderr.splitlines() == [
        "snapshotd: warning: snapshot 'alpha' version 3 is bad (digest mismatch in tensor "
        "'1'); moved to quarantine, falling back to an older version"
    ]


def test_prune_says_which_versions_it_moved_to_quarantine(filled: Sandbox) -> None:
    newest = filled.store_dir / "alpha" / "v000003.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 1
    newest.write_bytes(bytes(data))
    for flags, verb in ((("--dry-run",), "would be moved"), ((), "moved")):
        as_json = json.loads(filled.cli("prune", "alpha", "--json", "--dry-run").stdout)
        assert [(e["version"], e["action"], e["dry_run"]) for e in as_json] == [
            (3, "quarantine", True),
            (2, "keep", True),
            (1, "keep", True),
        ]
        result = filled.cli("prune", "alpha", *flags)
        assert result.returncode == EXIT_OK, result.stderr
        assert f"alpha v3: damaged (digest mismatch in tensor '1'), {verb} to quarantine" in (
            result.stdout.splitlines()
        )
    assert not newest.exists()
    assert (filled.store_dir / "alpha" / "quarantine" / newest.name).exists()


def test_without_a_daemon_the_hint_starts_one_on_the_same_config(box: Sandbox) -> None:
    result = box.cli("snapshot", "alpha")
    assert result.returncode == EXIT_NO_DAEMON
    assert assert_one_clean_line(result).endswith(
        f"start it with: snapshotd start --config {box.config}"
    )


def test_version_flag() -> None:
    result = subprocess.run(
        [*snapshotd_command(), "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"snapshotd {snapshotd.__version__}"


def test_list_says_why_a_version_is_damaged_without_repeating_its_path(filled: Sandbox) -> None:
    (filled.store_dir / "alpha" / "v000004.safetensors").write_bytes(b"\x00" * 100)
    result = filled.cli("list", "alpha")
    assert result.returncode == EXIT_OK, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("alpha  4 ")]
    assert "damaged: " in row
    assert str(filled.store_dir) not in row


def _readme_json_keys() -> dict[str, set[str]]:
    """The keys the README's ``--json`` table names for each command."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("With `--json` a command prints", 1)[1].split("\n\n", 2)[1]
    keys = {}
    for row in section.splitlines()[2:]:
        command, prints = row.strip("|").split("|", 1)
        keys[command.strip(" `")] = set(re.findall(r"`(\w+)`", prints))
    return keys


def test_the_readme_names_every_key_of_every_json_output(served: Sandbox) -> None:
    documented = _readme_json_keys()
    brief = served.start_experiment("brief")  # one that crashes, for status's "left"

    def status_of() -> dict[str, Any]:
        document: dict[str, Any] = json.loads(served.cli("status", "--json").stdout)
        return document

    wait_until(lambda: len(status_of()["experiments"]) == 2, 5, "the daemon to find brief")
    brief.kill()
    status = wait_until(lambda: (s := status_of())["left"] and s, 5, "brief to be dropped")
    (experiment,) = status["experiments"]
    (left,) = status["left"]
    snapshot = json.loads(served.cli("snapshot", "exp", "--json").stdout)
    listed = json.loads(served.cli("list", "--json").stdout)
    verify = json.loads(served.cli("verify", "--json").stdout)
    prune = json.loads(served.cli("prune", "--json").stdout)
    restore = json.loads(served.cli("restore", "exp", "--json").stdout)
    assert (restore["version"], restore["skipped"]) == (2, [])
    assert documented == {
        "restore NAME": set(restore),
        "status": set(status) | set(experiment) | set(left),
        "list": set(listed[0]),
        "snapshot": set(snapshot),
        "verify": set(verify) | set(verify["snapshots"][0]),
        "prune": set(prune[0]),
    }


def test_help_lists_every_exit_code_and_restore_shows_its_command_form() -> None:
    def help_of(*args: str) -> str:
        result = subprocess.run(
            [*snapshotd_command(), *args, "--help"], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        return " ".join(result.stdout.split())

    codes = {v for k, v in vars(exitcode).items() if k.isupper() and isinstance(v, int)}
    assert {code for code, _text in exitcode.MEANINGS} == codes
    text = help_of()
    for code, meaning in exitcode.MEANINGS:
        assert f"{code} {meaning}" in text
    assert "NAME [--json | -- CMD ARGS...]" in help_of("restore")
    assert "SIGHUP" in help_of("start")


def test_export_of_an_unknown_run_names_the_runs_there(filled: Sandbox) -> None:
    result = filled.cli("export", "nope", "-o", str(filled.root / "x.npz"))
    assert result.returncode == EXIT_NO_SNAPSHOT
    assert "(runs: alpha" in assert_one_clean_line(result)

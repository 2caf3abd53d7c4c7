"""The shipped systemd units pass ``systemd-analyze verify`` and say what DESIGN §7 asks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from snapshotd import exitcode, rendezvous

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SHIPPED = {
    "snapshotd.service": UNITS / "snapshotd.service",
    "snapshotd@example.service": UNITS / "snapshotd@.service",
    "snapshotd-user.service": UNITS / "user" / "snapshotd.service",
}
# The units name the installed binary; verify checks that it exists, so point them at
# the one this test environment has.
INSTALLED = ("/usr/local/bin/snapshotd", "%h/.local/bin/snapshotd")

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")


def _binary() -> str:
    found = Path(sys.executable).with_name("snapshotd")
    assert found.exists(), "the console script is not installed next to the interpreter"
    return str(found)


def _verify(unit_dir: Path, name: str) -> subprocess.CompletedProcess[str]:
    assert analyze is not None
    return subprocess.run(
        [analyze, "verify", name], cwd=unit_dir, capture_output=True, text=True, timeout=60
    )


def _install(tmp_path: Path, name: str, text: str) -> None:
    for path in INSTALLED:
        text = text.replace(path, _binary())
    (tmp_path / name).write_text(text)


@needs_analyze
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_unit_verifies_cleanly(tmp_path: Path, name: str) -> None:
    _install(tmp_path, name, SHIPPED[name].read_text())
    result = _verify(tmp_path, name)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    # The negative control: the check above would notice a typo or a missing binary.
    text = SHIPPED["snapshotd.service"].read_text().replace("Type=notify", "Typo=notify")
    (tmp_path / "broken.service").write_text(text)  # the binary path is left unresolvable
    result = _verify(tmp_path, "broken.service")
    assert result.returncode != 0
    assert "Typo" in result.stderr


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_unit_is_notify_with_watchdog_and_reload(name: str) -> None:
    lines = SHIPPED[name].read_text().splitlines()
    directives = [line for line in lines if line and not line.startswith(("#", "["))]
    assert "Type=notify" in directives
    assert any(line.startswith("WatchdogSec=") for line in directives)
    assert "ExecReload=/bin/kill -HUP $MAINPID" in directives
    assert "Restart=on-failure" in directives
    # systemd has no trailing comments: a '#' after a value becomes part of the value.
    assert not [line for line in directives if " #" in line]


@pytest.mark.parametrize("name", ["snapshotd.service", "snapshotd@example.service"])
def test_system_units_are_hardened_without_hiding_the_sockets(name: str) -> None:
    text = SHIPPED[name].read_text()
    for directive in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "RuntimeDirectoryPreserve=yes",
        "RuntimeDirectoryMode=0700",
    ):
        assert directive in text, directive
    assert "MemoryDenyWriteExecute=yes" not in text


def test_template_reads_the_instance_config() -> None:
    text = SHIPPED["snapshotd@example.service"].read_text()
    assert "--config /etc/snapshotd/%i.yaml" in text


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_config_error_is_not_restarted_over_and_over(name: str) -> None:
    # Exit code 2 means the config cannot be used: restarting cannot help, and five quick
    # restarts would only bury the message under StartLimitBurst's.
    lines = SHIPPED[name].read_text().splitlines()
    assert f"RestartPreventExitStatus={exitcode.USAGE}" in lines
    assert f"RestartPreventExitStatus={exitcode.NO_DAEMON}" not in lines  # I/O: restart


@pytest.mark.parametrize("name", ["snapshotd.service", "snapshotd@example.service"])
def test_system_units_point_the_daemon_at_the_runtime_directory_they_make(name: str) -> None:
    # Without runtime_dir in the config the daemon would fall back to /tmp/snapshotd-UID
    # (this user has no XDG_RUNTIME_DIR), which PrivateTmp hides from every experiment.
    lines = SHIPPED[name].read_text().splitlines()
    (made,) = [line.split("=", 1)[1] for line in lines if line.startswith("RuntimeDirectory=")]
    assert f"Environment=SNAPSHOTD_RUNTIME_DIR=%t/{made}" in lines
    assert rendezvous.runtime_dir(None, {"SNAPSHOTD_RUNTIME_DIR": "/run/x"}) == Path("/run/x")

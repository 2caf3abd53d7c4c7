"""Fixtures shared by the in-process client tests: a runtime directory, and an
environment without the user's own ``SNAPSHOTD_*`` settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.experiment import runtime_dir


@pytest.fixture
def runtime() -> Iterator[Path]:
    with runtime_dir() as path:
        yield path


@pytest.fixture
def no_ambient_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's own variables must not steer a test."""
    for name in ("SNAPSHOTD_RESUME", "SNAPSHOTD_STORE", "SNAPSHOTD_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)


#: Seconds a soak test may take before pytest-timeout fails it (others: pyproject's).
SOAK_TIMEOUT = 3600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("soak") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SOAK_TIMEOUT))

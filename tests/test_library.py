"""The store-less library: snapshotd.save / snapshotd.load, atomic replacement, corruption,
and what ``import snapshotd`` pulls in."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import snapshotd
from snapshotd.errors import CommitFailed, SnapshotCorrupt, StateError, UsageError

Array = npt.NDArray[Any]


class Model:
    """The Theano tutorial's class."""

    def __init__(self, fill: float = 0.0) -> None:
        self.W = np.full((5, 3), fill)
        self.b = np.full(3, fill, np.float32)

    def __getstate__(self) -> tuple[Array, Array]:
        return (self.W, self.b)

    def __setstate__(self, state: tuple[Array, Array]) -> None:
        self.W, self.b = state


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SNAPSHOTD_CRASHPOINT"}
    package_parent = str(Path(snapshotd.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# --- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("as_text", [False, True], ids=["pathlib", "str"])
def test_load_returns_the_saved_tree(tmp_path: Path, as_text: bool) -> None:
    path = tmp_path / "tree.safetensors"
    state = {"w": np.arange(4.0), "opt": [np.int64(3), (1.5, "adam")], "none": None}

    snapshotd.save(str(path) if as_text else path, state, step=9, metadata={"k": "v"})
    loaded = snapshotd.load(str(path) if as_text else path)

    assert list(loaded) == ["w", "opt", "none"]
    assert loaded["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert type(loaded["opt"]) is list
    assert loaded["opt"][0] == 3
    assert type(loaded["opt"][0]) is np.int64
    assert loaded["opt"][1] == (1.5, "adam")
    assert loaded["none"] is None


def test_load_into_an_object_restores_it_and_returns_it(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    snapshotd.save(path, Model(fill=2.0))
    model = Model()

    returned = snapshotd.load(path, into=model)

    assert returned is model
    assert model.W.tolist() == np.full((5, 3), 2.0).tolist()
    assert model.b.dtype == np.float32


def test_load_into_a_dict_restores_in_place_and_returns_it(tmp_path: Path) -> None:
    path = tmp_path / "d.safetensors"
    snapshotd.save(path, {"w": np.ones(3)})
    target = {"w": np.zeros(3)}
    alias = target["w"]

    assert snapshotd.load(path, into=target) is target
    assert alias.tolist() == [1.0, 1.0, 1.0]


def test_save_writes_a_private_file_and_no_leftovers(tmp_path: Path) -> None:
    snapshotd.save(tmp_path / "m.safetensors", Model(1.0))

    assert listing(tmp_path) == ["m.safetensors"]
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o600


def test_save_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    snapshotd.save(path, Model(1.0))

    snapshotd.save(path, Model(2.0))

    assert snapshotd.load(path)[0][0, 0] == 2.0
    assert listing(tmp_path) == ["m.safetensors"]


# --- atomic replacement -------------------------------------------------------------


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process: writes past ``limit`` fail with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


NOT_STR_TO_STR: Any = {"k": 1}
FAILED_SAVES: list[Any] = [
    pytest.param(
        lambda path: snapshotd.save(path, {"w": np.ones(3), "bad": {"set"}}),
        StateError,
        id="state-error",
    ),
    pytest.param(
        lambda path: snapshotd.save(path, {"w": np.ones(3)}, metadata=NOT_STR_TO_STR),
        UsageError,
        id="bad-metadata",
    ),
    pytest.param(
        lambda path: snapshotd.save(path, [np.ones(3), np.zeros(2, object)]),
        StateError,
        id="object-array-late-in-the-tree",
    ),
]


@pytest.mark.parametrize(("attempt", "error"), FAILED_SAVES)
def test_a_failed_save_leaves_the_old_file_untouched(
    tmp_path: Path, attempt: Callable[[Path], None], error: type[Exception]
) -> None:
    path = tmp_path / "m.safetensors"
    snapshotd.save(path, Model(1.0))
    before = path.read_bytes()

    with pytest.raises(error):
        attempt(path)

    assert path.read_bytes() == before
    assert listing(tmp_path) == ["m.safetensors"]
    assert snapshotd.load(path)[0][0, 0] == 1.0


def test_an_io_error_mid_save_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    snapshotd.save(path, Model(1.0))
    before = path.read_bytes()

    with file_size_limit(64 * 1024), pytest.raises(CommitFailed):
        snapshotd.save(path, {"big": np.ones(1 << 17)})  # 1 MiB of data

    assert path.read_bytes() == before
    assert listing(tmp_path) == ["m.safetensors"]


def test_saving_into_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(CommitFailed):
        snapshotd.save(tmp_path / "missing" / "m.safetensors", Model())

    assert listing(tmp_path) == []


CRASHING_SAVE = """
import sys
import numpy as np
import snapshotd
snapshotd.save(sys.argv[1], {"generation": np.full(50_000, 2.0)})
"""


@pytest.mark.parametrize(
    ("point", "survivor"),
    [
        pytest.param("commit.after_create", 1.0, id="after-create"),
        pytest.param("commit.before_fsync", 1.0, id="before-fsync"),
        pytest.param("commit.before_rename", 1.0, id="before-rename"),
        pytest.param("commit.after_rename", 2.0, id="after-rename"),
    ],
)
def test_a_save_killed_at_any_step_leaves_a_complete_old_or_new_file(
    tmp_path: Path, point: str, survivor: float
) -> None:
    path = tmp_path / "m.safetensors"
    snapshotd.save(path, {"generation": np.full(50_000, 1.0)})

    child = subprocess.run(
        [sys.executable, "-c", CRASHING_SAVE, str(path)],
        env=child_env(SNAPSHOTD_CRASHPOINT=point),
        capture_output=True,
        timeout=60,
        check=False,
    )

    assert child.returncode == -signal.SIGKILL, child.stderr
    loaded = snapshotd.load(path)
    assert loaded["generation"].shape == (50_000,)
    assert set(loaded["generation"].tolist()) == {survivor}


# --- corruption ---------------------------------------------------------------------


def _flip(at: int) -> Callable[[bytes], bytes]:
    def damage(blob: bytes) -> bytes:
        data = bytearray(blob)
        data[at] ^= 0x04
        return bytes(data)

    return damage


CORRUPTIONS: list[Any] = [
    pytest.param(_flip(-1), id="last-data-byte"),
    pytest.param(_flip(-200), id="middle-data-byte"),
    pytest.param(_flip(40), id="header-byte"),
    pytest.param(_flip(0), id="length-prefix"),
    pytest.param(lambda blob: blob[:-1], id="truncated-by-one"),
    pytest.param(lambda blob: blob[: len(blob) // 2], id="truncated-by-half"),
    pytest.param(lambda blob: blob + b"\0", id="one-byte-appended"),
    pytest.param(lambda blob: b"", id="empty"),
    pytest.param(lambda blob: blob[:7], id="shorter-than-the-prefix"),
    pytest.param(lambda blob: bytes(len(blob)), id="all-zero"),
    pytest.param(
        lambda blob: np.random.default_rng(1).integers(0, 256, len(blob), np.uint8).tobytes(),
        id="random-bytes",
    ),
]


@pytest.mark.parametrize("damage", CORRUPTIONS)
def test_a_corrupted_file_raises_snapshot_corrupt_and_restores_nothing(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    path = tmp_path / "m.safetensors"
    snapshotd.save(path, Model(3.0))
    path.write_bytes(damage(path.read_bytes()))
    model = Model(0.0)
    w, b = model.W, model.b

    with pytest.raises(SnapshotCorrupt) as info:
        snapshotd.load(path, into=model)

    assert info.value.path == str(path)
    assert info.value.reason
    assert model.W is w
    assert model.b is b
    assert w.tolist() == np.zeros((5, 3)).tolist()
    with pytest.raises(SnapshotCorrupt):
        snapshotd.load(path)


# --- what the client library imports ------------------------------------------------


def test_import_snapshotd_does_not_import_the_daemons_dependencies() -> None:
    probe = (
        "import sys, snapshotd\n"
        "heavy = {'yaml', 'apscheduler', 'watchdog'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert result.stdout.strip() == "[]"

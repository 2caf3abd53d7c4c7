"""Restoring into the arrays an object already has (``load(into=...)``, ``Store.load``,
resume): verified before a byte changes, no second copy of the state, and a fresh read
whenever filling in place would be wrong."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import snapshotd
from snapshotd import snapshot
from snapshotd.errors import FallbackWarning, SnapshotCorrupt
from snapshotd.format import header_length
from snapshotd.store import Store

Array = npt.NDArray[Any]


class Net:
    """A model whose state is its ``params`` dict and a step counter."""

    def __init__(self, fill: float, sizes: tuple[int, ...] = (6, 4, 3)) -> None:
        self.params = {f"p{i}": np.full(n, fill, np.float32) for i, n in enumerate(sizes)}
        self.step = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params, "step": self.step}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.params = state["params"]
        self.step = state["step"]


def saved(tmp_path: Path, fill: float, step: int = 7) -> Path:
    path = tmp_path / f"net-{fill}.safetensors"
    net = Net(fill)
    net.step = step
    snapshotd.save(path, net)
    return path


def data_start(path: Path) -> int:
    raw = path.read_bytes()
    return 8 + header_length(raw[:8], len(raw), str(path))


def damage_last_array(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def mappings_of(path: Path) -> list[str]:
    text = Path("/proc/self/maps").read_text()
    return [line for line in text.splitlines() if line.endswith(str(path))]


# -- in place --------------------------------------------------------------------------


def test_an_object_is_restored_into_its_own_arrays(tmp_path: Path) -> None:
    path = saved(tmp_path, 2.0, step=7)
    net = Net(0.0)
    before = dict(net.params)

    snapshotd.load(path, into=net)

    assert net.step == 7
    for name, array in net.params.items():
        assert array is before[name], f"{name} was replaced, not filled"
        assert array.tolist() == [2.0] * array.size


def test_a_store_restores_in_place_and_leaves_no_mapping(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.commit("net", Net(5.0))
    net = Net(0.0)
    kept = net.params["p1"]

    assert store.load("net", into=net) is net

    assert net.params["p1"] is kept
    assert kept.tolist() == [5.0] * 4
    assert mappings_of(store.root / "net" / "v000001.safetensors") == []


def test_in_place_restore_allocates_no_second_copy(tmp_path: Path) -> None:
    """16 MiB restored in place allocates far less than the state; read fresh it would
    allocate all of it (the check fails if restoring in place is lost)."""
    path = tmp_path / "big.safetensors"
    snapshotd.save(path, {"w": np.ones(4 << 20, np.float32)})
    target = {"w": np.zeros(4 << 20, np.float32)}
    tracemalloc.start()
    try:
        snapshotd.load(path, into=target)
        _, peak = tracemalloc.get_traced_memory()
        fresh = snapshotd.load(path)
        _, fresh_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert target["w"].min() == 1.0
    assert fresh_peak >= 16 << 20, "the fresh read's buffer should be traced"
    assert peak < 1 << 20
    del fresh


@pytest.mark.parametrize(
    "damage",
    [damage_last_array, lambda path: path.write_bytes(path.read_bytes()[:-1])],
    ids=["digest", "truncated"],
)
def test_a_snapshot_that_fails_verification_changes_nothing(tmp_path: Path, damage: Any) -> None:
    path = saved(tmp_path, 3.0)
    damage(path)
    net = Net(1.0)
    before = {name: array.copy() for name, array in net.params.items()}

    with pytest.raises(SnapshotCorrupt):
        snapshotd.load(path, into=net)

    assert net.step == 0
    for name, array in net.params.items():
        np.testing.assert_array_equal(array, before[name])


def test_the_store_falls_back_without_touching_the_arrays_with_the_bad_version(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    store.commit("net", Net(1.0))
    store.commit("net", Net(2.0))
    damage_last_array(store.root / "net" / "v000002.safetensors")
    net = Net(0.0)
    kept = net.params["p0"]

    with pytest.warns(FallbackWarning, match="version 2 is bad"):
        store.load("net", into=net)

    assert net.params["p0"] is kept
    assert all(a.tolist() == [1.0] * a.size for a in net.params.values())


def test_a_file_under_another_versions_name_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.commit("net", Net(1.0))
    store.commit("net", Net(2.0))
    run = store.root / "net"
    (run / "v000001.safetensors").write_bytes((run / "v000002.safetensors").read_bytes())
    net = Net(0.0)

    with pytest.raises(SnapshotCorrupt, match="version 2"):
        store.load("net", 1, into=net)

    assert all(a.tolist() == [0.0] * a.size for a in net.params.values())


# -- read fresh where filling in place would be wrong ----------------------------------


def test_one_array_under_two_names_is_not_filled_twice(tmp_path: Path) -> None:
    """Tied weights now, untied in the snapshot: both names get their own values."""
    path = tmp_path / "untied.safetensors"
    snapshotd.save(path, {"a": np.full(3, 1.0), "b": np.full(3, 2.0)})
    tied = np.zeros(3)
    target = {"a": tied, "b": tied}

    snapshotd.load(path, into=target)

    assert target["a"].tolist() == [1.0] * 3
    assert target["b"].tolist() == [2.0] * 3


@pytest.mark.parametrize(
    ("a_end", "b_start", "in_place"),
    [(5, 5, True), (10, 5, False)],
    ids=["adjacent-views-stay-views", "overlapping-views-are-replaced"],
)
def test_views_of_one_buffer(tmp_path: Path, a_end: int, b_start: int, in_place: bool) -> None:
    """Parameters as views of one flat buffer (as optimisers keep them) are filled in
    place, unless they overlap: then one would overwrite the other."""
    path = tmp_path / "views.safetensors"
    stored_a, stored_b = np.arange(float(a_end)), np.arange(100.0, 115.0 - b_start)
    snapshotd.save(path, {"a": stored_a, "b": stored_b})
    flat = np.zeros(15)
    target = {"a": flat[:a_end], "b": flat[b_start:]}

    snapshotd.load(path, into=target)

    assert target["a"].tolist() == stored_a.tolist()
    assert target["b"].tolist() == stored_b.tolist()
    assert np.shares_memory(target["a"], flat) is in_place
    assert np.shares_memory(target["b"], flat) is in_place


def test_read_only_arrays_are_replaced(tmp_path: Path) -> None:
    path = saved(tmp_path, 4.0)
    net = Net(0.0)
    frozen = net.params["p2"]
    frozen.flags.writeable = False

    snapshotd.load(path, into=net)

    assert net.params["p2"] is not frozen
    assert net.params["p2"].tolist() == [4.0] * 3
    assert frozen.tolist() == [0.0] * 3


@pytest.mark.parametrize(
    "unfit",
    [
        lambda: np.zeros(4, ">f8"),
        lambda: np.zeros(8)[::2],
    ],
    ids=["big-endian", "strided"],
)
def test_arrays_the_bytes_cannot_be_copied_into_are_not_filled(tmp_path: Path, unfit: Any) -> None:
    """Given to ``read`` directly (``arrays_of`` never returns such arrays): a wrong
    byte order or a gap between elements would scramble the stored bytes."""
    path = tmp_path / "w.safetensors"
    snapshotd.save(path, {"w": np.arange(4.0)})
    array = unfit()

    loaded = snapshot.read(path, {"w": array})

    assert loaded.arrays["w"] is not array
    assert loaded.arrays["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert array.tolist() == [0.0] * 4


def test_a_big_endian_array_of_a_dict_gets_the_values(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    snapshotd.save(path, {"w": np.arange(4.0)})
    target = {"w": np.zeros(4, ">f8")}

    snapshotd.load(path, into=target)

    assert target["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_another_shape_is_read_fresh(tmp_path: Path) -> None:
    path = saved(tmp_path, 4.0)
    net = Net(0.0, sizes=(6, 5, 3))
    old = net.params["p0"]

    snapshotd.load(path, into=net)

    assert net.params["p1"].shape == (4,)
    assert net.params["p0"] is not old
    assert old.tolist() == [0.0] * 6


def test_a_transposed_view_gets_the_stored_values(tmp_path: Path) -> None:
    """A non-contiguous array is flattened as a copy: the object gets that copy."""
    path = tmp_path / "t.safetensors"
    snapshotd.save(path, {"w": np.arange(6.0).reshape(2, 3).T.copy()})
    target = {"w": np.zeros((2, 3)).T}

    snapshotd.load(path, into=target)

    assert target["w"].tolist() == np.arange(6.0).reshape(2, 3).T.tolist()


def test_an_object_without_state_yet_is_restored(tmp_path: Path) -> None:
    """Built with __new__: its __getstate__ fails, so there is nothing to fill."""
    path = saved(tmp_path, 6.0, step=3)
    net = Net.__new__(Net)

    snapshotd.load(path, into=net)

    assert net.step == 3
    assert net.params["p0"].tolist() == [6.0] * 6


def test_a_failed_restore_releases_the_mapping_with_the_error(tmp_path: Path) -> None:
    path = saved(tmp_path, 3.0)
    damage_last_array(path)

    with pytest.raises(SnapshotCorrupt):
        snapshotd.load(path, into=Net(0.0))

    assert mappings_of(path) == []

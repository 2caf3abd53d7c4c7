"""Restoring a store's snapshot into the arrays an object already has (``in_place=True`` on
``Store.load`` and ``register``): verified before a byte changes, no second copy of the
state, and a fresh read whenever filling in place would be wrong or would change more
than the object. Without ``in_place`` nothing but the object changes."""

from __future__ import annotations

import contextlib
import gc
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import snapshotd
from snapshotd import snapshot
from snapshotd.errors import FallbackWarning, RestoreMismatch, SnapshotCorrupt, UsageError
from snapshotd.store import Store

Array = npt.NDArray[Any]

pytestmark = pytest.mark.usefixtures("no_ambient_configuration")


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


class Holder:
    """Hands its ``state`` out and takes one back as it is: any tree, any arrays."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def __getstate__(self) -> Any:
        return self.state

    def __setstate__(self, state: Any) -> None:
        self.state = state


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def committed(store: Store, state: Any, step: int = 7) -> Path:
    """Commit ``state`` as a new version of run ``net``; its file."""
    version = store.commit("net", state, step=step)
    return store.root / "net" / f"v{version:06d}.safetensors"


def damage_last_array(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def mappings_of(path: Path) -> list[str]:
    text = Path("/proc/self/maps").read_text()
    return [line for line in text.splitlines() if line.endswith(str(path))]


# -- in place --------------------------------------------------------------------------


def test_an_object_is_restored_into_its_own_arrays(store: Store) -> None:
    saved = Net(2.0)
    saved.step = 7
    path = committed(store, saved)
    net = Net(0.0)
    before = dict(net.params)

    assert store.load("net", into=net, in_place=True) is net

    assert net.step == 7
    for name, array in net.params.items():
        assert array is before[name], f"{name} was replaced, not filled"
        assert array.tolist() == [2.0] * array.size
    assert mappings_of(path) == []


class Student:
    """Hands out an array it does not own: its teacher's (kept fixed while it learns)."""

    def __init__(self, teacher: dict[str, Array]) -> None:
        self.teacher = teacher
        self.w = np.zeros(3)

    def __getstate__(self) -> dict[str, Any]:
        return {"w": self.w, "teacher": self.teacher["emb"]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.w = state["w"]


def test_without_in_place_only_the_object_changes(store: Store) -> None:
    committed(store, {"w": np.full(3, 5.0), "teacher": np.full(4, -1.0)})
    teacher = {"emb": np.arange(4.0)}
    student = Student(teacher)
    before = student.w

    store.load("net", into=student)

    assert student.w.tolist() == [5.0] * 3
    assert student.w is not before
    assert before.tolist() == [0.0] * 3
    assert teacher["emb"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_resume_is_in_place_only_when_asked(store: Store, runtime: Path) -> None:
    committed(store, Net(2.0))
    plain, filled = Net(0.0), Net(0.0)
    plain_before, filled_before = plain.params["p0"], filled.params["p0"]

    with snapshotd.register("net", plain, resume=True, store=store.root, runtime_dir=runtime):
        pass
    with snapshotd.register(
        "net", filled, resume=True, in_place=True, store=store.root, runtime_dir=runtime
    ):
        pass

    assert plain.params["p0"] is not plain_before
    assert plain_before.tolist() == [0.0] * 6
    assert filled.params["p0"] is filled_before
    assert filled_before.tolist() == [2.0] * 6


def test_in_place_restore_allocates_no_second_copy(store: Store) -> None:
    """16 MiB restored in place allocates far less than the state; read fresh it would
    allocate all of it (the check fails if restoring in place is lost)."""
    committed(store, {"w": np.ones(4 << 20, np.float32)})
    model = Holder({"w": np.zeros(4 << 20, np.float32)})
    tracemalloc.start()
    try:
        store.load("net", into=model, in_place=True)
        _, peak = tracemalloc.get_traced_memory()
        fresh = store.load("net")
        _, fresh_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert model.state["w"].min() == 1.0
    assert fresh_peak >= 16 << 20, "the fresh read's buffer should be traced"
    assert peak < 1 << 20
    del fresh


def test_a_file_given_by_path_is_read_fresh(tmp_path: Path) -> None:
    """Anyone may rewrite a file named by path while it is read: it is never mapped."""
    path = tmp_path / "net.safetensors"
    snapshotd.save(path, Net(2.0))
    net = Net(0.0)
    before = net.params["p0"]

    snapshotd.load(path, into=net)

    assert net.params["p0"] is not before
    assert net.params["p0"].tolist() == [2.0] * 6
    assert before.tolist() == [0.0] * 6


@pytest.mark.parametrize(
    "damage",
    [damage_last_array, lambda path: path.write_bytes(path.read_bytes()[:-1])],
    ids=["digest", "truncated"],
)
def test_a_snapshot_that_fails_verification_changes_nothing(store: Store, damage: Any) -> None:
    damage(committed(store, Net(3.0)))
    net = Net(1.0)
    before = {name: array.copy() for name, array in net.params.items()}

    with pytest.raises(SnapshotCorrupt):
        store.load("net", 1, into=net, in_place=True)

    assert net.step == 0
    for name, array in net.params.items():
        np.testing.assert_array_equal(array, before[name])


def test_a_failed_restore_releases_the_mapping_with_the_error(store: Store) -> None:
    path = committed(store, Net(3.0))
    damage_last_array(path)

    with pytest.raises(SnapshotCorrupt):
        store.load("net", 1, into=Net(0.0), in_place=True)

    assert mappings_of(path) == []


def test_the_store_falls_back_without_touching_the_arrays_with_the_bad_version(
    store: Store,
) -> None:
    committed(store, Net(1.0))
    damage_last_array(committed(store, Net(2.0)))
    net = Net(0.0)
    kept = net.params["p0"]

    with pytest.warns(FallbackWarning, match="version 2 is bad"):
        store.load("net", into=net, in_place=True)

    assert net.params["p0"] is kept
    assert all(a.tolist() == [1.0] * a.size for a in net.params.values())


def test_a_file_under_another_versions_name_changes_nothing(store: Store) -> None:
    committed(store, Net(1.0))
    newer = committed(store, Net(2.0))
    (store.root / "net" / "v000001.safetensors").write_bytes(newer.read_bytes())
    net = Net(0.0)

    with pytest.raises(SnapshotCorrupt, match="version 2"):
        store.load("net", 1, into=net, in_place=True)

    assert all(a.tolist() == [0.0] * a.size for a in net.params.values())


# -- read fresh where filling in place would be wrong ----------------------------------


def test_one_array_under_two_names_is_not_filled_twice(store: Store) -> None:
    """Tied weights now, untied in the snapshot: both names get their own values."""
    committed(store, {"a": np.full(3, 1.0), "b": np.full(3, 2.0)})
    tied = np.zeros(3)
    model = Holder({"a": tied, "b": tied})

    store.load("net", into=model, in_place=True)

    assert model.state["a"].tolist() == [1.0] * 3
    assert model.state["b"].tolist() == [2.0] * 3


@pytest.mark.parametrize(
    ("cut", "views_as_dict", "views_as_object"),
    [
        (lambda flat: {"a": flat[:5], "b": flat[5:]}, {"a", "b"}, {"a", "b"}),
        (lambda flat: {"a": flat[::2], "b": flat[1::2]}, {"a", "b"}, set()),
        (lambda flat: {"a": flat[:5], "b": flat[4:9]}, {"b"}, set()),
    ],
    ids=["adjacent", "interleaved", "overlapping"],
)
@pytest.mark.parametrize("holder", [False, True], ids=["dict", "object"])
def test_views_of_one_buffer(
    store: Store, cut: Any, views_as_dict: set[str], views_as_object: set[str], holder: bool
) -> None:
    """Parameters as views of one flat buffer (as optimisers keep them) stay views where
    filling them in place is right. An object's strided views are flattened as copies,
    and overlapping ones are read fresh; a dict fills every entry, and one that a later
    entry overwrote takes its stored array instead."""
    flat = np.zeros(10)
    target = cut(flat)
    stored = {
        name: np.arange(view.size) + 10.0 * k for k, (name, view) in enumerate(target.items())
    }
    committed(store, stored)
    model = Holder(target)

    store.load("net", into=model if holder else target, in_place=True)

    restored = model.state if holder else target
    for name, values in stored.items():
        assert restored[name].tolist() == values.tolist()
    views = views_as_object if holder else views_as_dict
    assert {name for name in stored if np.shares_memory(restored[name], flat)} == views


def test_a_dict_of_many_columns_is_filled_in_place(store: Store) -> None:
    """The columns of one matrix share no memory: all of them are filled, in one pass."""
    matrix = np.zeros((3, 2000))
    target = {f"c{k}": matrix[:, k] for k in range(2000)}
    committed(store, {name: np.full(3, float(k)) for k, name in enumerate(target)})

    store.load("net", into=target, in_place=True)

    assert all(np.shares_memory(column, matrix) for column in target.values())
    assert matrix[:, 1999].tolist() == [1999.0] * 3


def test_read_only_arrays_are_replaced(store: Store) -> None:
    committed(store, Net(4.0))
    net = Net(0.0)
    frozen = net.params["p2"]
    frozen.flags.writeable = False

    store.load("net", into=net, in_place=True)

    assert net.params["p2"] is not frozen
    assert net.params["p2"].tolist() == [4.0] * 3
    assert frozen.tolist() == [0.0] * 3


def test_a_memory_mapped_array_is_not_written_through_to_its_file(
    store: Store, tmp_path: Path
) -> None:
    committed(store, {"w": np.full(4, 9.0)})
    on_disk = np.memmap(tmp_path / "weights.bin", np.float64, "w+", shape=(4,))
    on_disk[:] = 1.0
    on_disk.flush()
    model = Holder({"w": on_disk})

    store.load("net", into=model, in_place=True)

    assert model.state["w"].tolist() == [9.0] * 4
    assert np.fromfile(tmp_path / "weights.bin").tolist() == [1.0] * 4


def test_another_shape_is_read_fresh(store: Store) -> None:
    committed(store, Net(4.0))
    net = Net(0.0, sizes=(6, 5, 3))
    old = net.params["p0"]

    store.load("net", into=net, in_place=True)

    assert net.params["p1"].shape == (4,)
    assert net.params["p0"] is not old
    assert old.tolist() == [0.0] * 6


def test_an_object_without_state_yet_is_restored(store: Store) -> None:
    """Built with __new__: its __getstate__ fails, so there is nothing to fill."""
    saved = Net(6.0)
    saved.step = 3
    committed(store, saved)
    net = Net.__new__(Net)

    store.load("net", into=net, in_place=True)

    assert net.step == 3
    assert net.params["p0"].tolist() == [6.0] * 6


@pytest.mark.parametrize(
    "unfit",
    [
        lambda: np.zeros(4, ">f8"),
        lambda: np.zeros(8)[::2],
        lambda: np.frombuffer(bytearray(32)),
    ],
    ids=["big-endian", "strided", "foreign-buffer"],
)
def test_arrays_the_bytes_cannot_be_copied_into_are_not_filled(store: Store, unfit: Any) -> None:
    """Given to ``read`` directly (``arrays_of`` never returns the first two): a wrong
    byte order or a gap between elements would scramble the stored bytes, and memory
    numpy does not own may belong to something else."""
    path = committed(store, {"w": np.arange(4.0)})
    array = unfit()

    loaded = snapshot.read(path, {"w": array})

    assert loaded.arrays["w"] is not array
    assert loaded.arrays["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert array.tolist() == [0.0] * 4


# -- targets that check the tree are never filled before their checks -----------------


def test_a_dict_that_does_not_fit_is_left_as_it_was(store: Store) -> None:
    """``{"1": ...}`` stored, ``{1: ...}`` now: both are named "1", yet the dict refuses."""
    committed(store, {"1": np.full(3, 9.0)})
    target = {1: np.zeros(3)}

    with pytest.raises(RestoreMismatch):
        store.load("net", into=target, in_place=True)

    assert target[1].tolist() == [0.0] * 3


def test_a_resume_with_a_rename_that_swaps_two_names(store: Store, runtime: Path) -> None:
    committed(store, {"enc": np.full(3, 1.0), "dec": np.full(3, 2.0)})
    target = {"enc": np.zeros(3), "dec": np.zeros(3)}

    with snapshotd.register(
        "net",
        target,
        rename={"enc": "dec", "dec": "enc"},
        resume=True,
        in_place=True,
        store=store.root,
        runtime_dir=runtime,
    ):
        pass

    assert target["enc"].tolist() == [2.0] * 3
    assert target["dec"].tolist() == [1.0] * 3


def test_a_dict_is_filled_in_place_by_its_own_checks(store: Store) -> None:
    committed(store, {"w": np.full(3, 5.0)})
    target = {"w": np.zeros(3)}
    alias = target["w"]

    store.load("net", into=target, in_place=True)

    assert target["w"] is alias
    assert alias.tolist() == [5.0] * 3


def test_get_without_set_is_refused_before_anything_changes(store: Store, runtime: Path) -> None:
    committed(store, {"w": np.full(3, 5.0)})
    state = {"w": np.zeros(3)}

    with pytest.raises(UsageError, match="no set="):
        snapshotd.register(
            "net",
            get=lambda: state,
            resume=True,
            in_place=True,
            store=store.root,
            runtime_dir=runtime,
        )

    assert state["w"].tolist() == [0.0] * 3


# -- on two CPUs -----------------------------------------------------------------------


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Split work in two lanes even where this process may use one CPU. The threads
    that read or digested data are recorded, to show that both lanes ran."""
    monkeypatch.setattr(snapshotd.lanes, "usable_cpus", lambda: 2)
    threads: set[int] = set()
    for name in ("digest", "_read_into"):
        monkeypatch.setattr(snapshot, name, recording(getattr(snapshot, name), threads))
    return threads


def recording(function: Any, threads: set[int]) -> Any:
    def recorded(*args: Any) -> Any:
        threads.add(threading.get_ident())
        return function(*args)

    return recorded


def big_state(fill: float) -> dict[str, Array]:
    """12 MiB over both copy paths: arrays big enough to copy without the GIL, small
    ones copied byte to byte, a bool and a half-float array among them."""
    return {
        "emb": np.full((1024, 1024), fill, np.float64),
        "w": np.full(512 << 10, fill, np.float32),
        "mask": np.full(300 << 10, fill > 0, np.bool_),
        "half": np.full(100 << 10, fill, np.float16),
        **{f"b{k}": np.full(3, fill + k, np.float32) for k in range(8)},
    }


def test_a_big_state_is_restored_in_place_in_two_lanes(store: Store, two_cpus: set[int]) -> None:
    stored = big_state(2.5)
    committed(store, stored)
    model = Holder(big_state(0.0))
    kept = dict(model.state)

    store.load("net", into=model, in_place=True)

    assert len(two_cpus) == 2
    for name, array in model.state.items():
        assert array is kept[name]
        np.testing.assert_array_equal(array, stored[name])


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_bad_digest_in_either_lane_changes_nothing(
    store: Store, two_cpus: set[int], where: str
) -> None:
    path = committed(store, big_state(2.5))
    header = snapshot.read_header(path)
    first = header.layout.tensors[0]
    with path.open("r+b") as file:
        at = header.data_start + (first.begin if where == "first" else header.layout.data_size - 1)
        file.seek(at)
        byte = file.read(1)
        file.seek(at)
        file.write(bytes([byte[0] ^ 0xFF]))
    model = Holder(big_state(0.0))

    with pytest.raises(SnapshotCorrupt, match="digest mismatch"):
        store.load("net", 1, into=model, in_place=True)

    assert len(two_cpus) == 2
    for name, array in big_state(0.0).items():
        np.testing.assert_array_equal(model.state[name], array)


def test_a_tensor_read_in_pieces_stays_in_one_lane(store: Store, two_cpus: set[int]) -> None:
    """A tensor bigger than a read is digested as it streams by, piece after piece: the
    lanes of a fresh read never part its pieces, and a flipped byte anywhere in it is
    found."""
    big = np.arange(5 << 20, dtype=np.float32)  # 20 MiB: three pieces
    stored = {"big": big, "other": np.arange(3 << 20, dtype=np.float32)}
    path = committed(store, stored)

    loaded = store.load("net")

    assert len(two_cpus) == 2
    np.testing.assert_array_equal(loaded["big"], big)
    np.testing.assert_array_equal(loaded["other"], stored["other"])
    header = snapshot.read_header(path)
    with path.open("r+b") as file:
        file.seek(header.data_start + header.layout.tensors[0].begin + (12 << 20))
        file.write(b"\xff")
    with pytest.raises(SnapshotCorrupt, match="'big'"):
        store.load("net", 1)


def test_a_bad_digest_in_a_helper_lane_leaves_no_buffer_behind(
    store: Store, two_cpus: set[int]
) -> None:
    """The fresh buffer of a read that failed is freed when the error is handled, even
    with the cyclic collector off: a store then reads the next older version, and two
    buffers at once would be twice the state."""
    path = committed(store, {"a": np.ones(3 << 20, np.float32), "b": np.ones(3 << 20, np.float32)})
    damage_last_array(path)

    gc.disable()
    tracemalloc.start()
    try:
        with contextlib.suppress(SnapshotCorrupt):
            store.load("net", 1)
        left, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()

    assert len(two_cpus) == 2
    assert peak >= 24 << 20, "the read's buffer should be traced"
    assert left < 1 << 20

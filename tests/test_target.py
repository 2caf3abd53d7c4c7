"""Targets: pickle-hook objects (the Theano tutorial's class), plain classes, dicts restored
in place, renames, mismatches that change nothing, and explicit get=/set= callables."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.array_utils import byte_bounds

import snapshotd
from snapshotd.errors import RestoreMismatch, UsageError
from snapshotd.target import adapt, overlapping

Array = npt.NDArray[Any]


# --- the classes under test ---------------------------------------------------------


class Model:
    """The Theano tutorial's class: state is the (W, b) tuple."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.W = rng.standard_normal((7, 3))
        self.b = rng.standard_normal(3).astype(np.float32)

    def __getstate__(self) -> tuple[Array, Array]:
        return (self.W, self.b)

    def __setstate__(self, state: tuple[Array, Array]) -> None:
        self.W, self.b = state


class NamedModel:
    """Version 1 of a model whose state is a dict of named arrays."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.W = rng.standard_normal((7, 3))
        self.b = rng.standard_normal(3)

    def __getstate__(self) -> dict[str, Any]:
        return {"W": self.W, "b": self.b}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.W, self.b = state["W"], state["b"]


class RenamedModel:
    """Version 2: ``W`` became ``weights``; ``__setstate__`` maps old snapshots."""

    def __init__(self) -> None:
        self.weights = np.zeros((7, 3))
        self.b = np.zeros(3)

    def __getstate__(self) -> dict[str, Any]:
        return {"weights": self.weights, "b": self.b}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # written by Model: (W, b)
            state = {"weights": state[0], "b": state[1]}
        elif "W" in state:  # written by NamedModel
            state = {"weights": state["W"], "b": state["b"]}
        self.weights, self.b = state["weights"], state["b"]


class Plain:
    """No pickle hooks of its own: its __dict__ is its state."""

    def __init__(self, seed: int = 0) -> None:
        self.W = np.full((2, 2), float(seed))
        self.lr = 0.1 * seed
        self.tag = f"seed-{seed}"


class TupleStateNoSetstate:
    def __getstate__(self) -> tuple[int, int]:
        return (1, 2)


def save_then_load_into(obj: object, into: object, directory: Path) -> Any:
    path = directory / "m.safetensors"
    snapshotd.save(path, obj)
    return snapshotd.load(path, into=into)


def commit_then_load_into(obj: object, into: object, directory: Path) -> Any:
    store = snapshotd.Store(directory / "store")
    store.commit("run", obj)
    return store.load("run", into=into)


Restore = Callable[[object, object, Path], Any]
RESTORES: list[Any] = [
    pytest.param(save_then_load_into, id="save-load"),
    pytest.param(commit_then_load_into, id="store"),
]


# --- objects with the pickle hooks --------------------------------------------------


@pytest.mark.parametrize("restore", RESTORES)
def test_theano_tutorial_class_round_trips(tmp_path: Path, restore: Restore) -> None:
    original = Model(seed=1)
    fresh = Model(seed=2)

    returned = restore(original, fresh, tmp_path)

    assert returned is fresh
    assert fresh.W.tobytes() == original.W.tobytes()
    assert fresh.W.dtype == np.float64
    assert fresh.b.tobytes() == original.b.tobytes()
    assert fresh.b.dtype == np.float32


def test_theano_tutorial_state_comes_back_as_the_tuple(tmp_path: Path) -> None:
    snapshotd.save(tmp_path / "m.safetensors", Model(seed=3))

    state = snapshotd.load(tmp_path / "m.safetensors")

    assert type(state) is tuple
    assert len(state) == 2
    assert state[0].tolist() == Model(seed=3).W.tolist()


@pytest.mark.parametrize("old", [Model, NamedModel], ids=["tuple-state", "dict-state"])
@pytest.mark.parametrize("restore", RESTORES)
def test_renamed_class_maps_the_stored_tree_in_setstate(
    tmp_path: Path, restore: Restore, old: Callable[[int], Any]
) -> None:
    original = old(4)
    upgraded = RenamedModel()

    restore(original, upgraded, tmp_path)

    assert upgraded.weights.tolist() == original.W.tolist()
    assert upgraded.b.tolist() == original.b.tolist()
    assert not hasattr(upgraded, "W")


@pytest.mark.parametrize("restore", RESTORES)
def test_class_without_setstate_gets_its_dict_updated(tmp_path: Path, restore: Restore) -> None:
    original = Plain(seed=3)
    target = Plain(seed=0)
    vars(target)["extra"] = "kept"  # not part of the stored state

    returned = restore(original, target, tmp_path)

    assert returned is target
    assert target.W.tolist() == [[3.0, 3.0], [3.0, 3.0]]
    assert target.lr == original.lr
    assert target.tag == "seed-3"
    assert vars(target)["extra"] == "kept"


def test_object_without_setstate_and_non_dict_state_cannot_be_restored(tmp_path: Path) -> None:
    snapshotd.save(tmp_path / "t.safetensors", TupleStateNoSetstate())

    with pytest.raises(UsageError, match="__setstate__"):
        snapshotd.load(tmp_path / "t.safetensors", into=TupleStateNoSetstate())


# --- dict targets -------------------------------------------------------------------


@pytest.mark.parametrize("restore", RESTORES)
def test_dict_target_is_restored_in_place_where_shape_and_dtype_match(
    tmp_path: Path, restore: Restore
) -> None:
    stored = {
        "W": np.arange(6.0).reshape(3, 2),
        "b": np.arange(3.0),
        "h": np.ones(2, np.float32),
        "lr": 0.5,
        "frozen": np.full(2, 7.0),
    }
    frozen = np.zeros(2)
    frozen.flags.writeable = False
    target: dict[str, Any] = {
        "W": np.zeros((3, 2)),
        "b": np.zeros(2),
        "h": np.zeros(2),
        "lr": 0.0,
        "frozen": frozen,
    }
    alias_w, old_b, old_h = target["W"], target["b"], target["h"]

    returned = restore(stored, target, tmp_path)

    assert returned is target
    assert target["W"] is alias_w, "same shape and dtype: restored in place"
    assert alias_w.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert target["b"] is not old_b, "shape differs: replaced"
    assert target["b"].tolist() == [0.0, 1.0, 2.0]
    assert old_b.tolist() == [0.0, 0.0]
    assert target["h"] is not old_h, "dtype differs: replaced"
    assert target["h"].dtype == np.float32
    assert old_h.tolist() == [0.0, 0.0]
    assert target["lr"] == 0.5
    assert target["frozen"].tolist() == [7.0, 7.0]
    assert frozen.tolist() == [0.0, 0.0]


def test_in_place_restore_copies_so_the_target_does_not_alias_the_file_buffer(
    tmp_path: Path,
) -> None:
    snapshotd.save(tmp_path / "d.safetensors", {"a": np.ones(3), "b": np.ones(3)})
    target = {"a": np.zeros(3), "b": np.zeros(3)}
    snapshotd.load(tmp_path / "d.safetensors", into=target)

    target["a"][:] = 5.0

    assert target["b"].tolist() == [1.0, 1.0, 1.0]
    assert snapshotd.load(tmp_path / "d.safetensors")["a"].tolist() == [1.0, 1.0, 1.0]


def test_rename_maps_stored_names_for_dict_targets(tmp_path: Path) -> None:
    snapshotd.save(tmp_path / "old.safetensors", {"W": np.full(3, 2.0), "b": np.ones(1)})
    target: dict[str, Any] = {"weights": np.zeros(3), "b": np.zeros(1)}
    alias = target["weights"]

    adapt(target, rename={"W": "weights"}).set_state(snapshotd.load(tmp_path / "old.safetensors"))

    assert target["weights"] is alias
    assert alias.tolist() == [2.0, 2.0, 2.0]
    assert set(target) == {"weights", "b"}


def test_rename_is_harmless_for_snapshots_that_already_use_the_new_name(tmp_path: Path) -> None:
    snapshotd.save(tmp_path / "new.safetensors", {"weights": np.full(3, 4.0), "b": np.ones(1)})
    target: dict[str, Any] = {"weights": np.zeros(3), "b": np.zeros(1)}

    adapt(target, rename={"W": "weights"}).set_state(snapshotd.load(tmp_path / "new.safetensors"))

    assert target["weights"].tolist() == [4.0, 4.0, 4.0]


def test_rename_onto_a_name_that_is_also_stored_is_an_error_not_a_silent_drop(
    tmp_path: Path,
) -> None:
    # Both stored 'W' and stored 'weights' would land on target 'weights': one of them
    # would be dropped without a word.
    snapshotd.save(
        tmp_path / "both.safetensors", {"W": np.full(3, 1.0), "weights": np.full(3, 2.0)}
    )
    target: dict[str, Any] = {"weights": np.zeros(3)}

    with pytest.raises(UsageError):
        adapt(target, rename={"W": "weights"}).set_state(
            snapshotd.load(tmp_path / "both.safetensors")
        )

    assert target["weights"].tolist() == [0.0, 0.0, 0.0]


def snapshot_of(target: dict[Any, Any]) -> list[tuple[Any, int, Any]]:
    """Keys, object identities and deep-copied values: enough to prove nothing changed."""
    return [(key, id(value), copy.deepcopy(value)) for key, value in target.items()]


def assert_unchanged(target: dict[Any, Any], before: list[tuple[Any, int, Any]]) -> None:
    assert [key for key, _, _ in before] == list(target)
    for key, identity, value in before:
        assert id(target[key]) == identity, key
        if isinstance(value, np.ndarray):
            assert target[key].tobytes() == value.tobytes(), key
        else:
            assert target[key] == value, key


@pytest.mark.parametrize(
    ("stored", "missing", "unexpected"),
    [
        pytest.param(
            {"W": np.ones(3), "extra": np.ones(1), "more": 1},
            ["'b'", "'lr'"],
            ["'extra'", "'more'"],
            id="missing-and-unexpected",
        ),
        pytest.param({"W": np.ones(3)}, ["'b'", "'lr'"], [], id="missing-only"),
        pytest.param(
            {"W": np.ones(3), "b": np.ones(5), "lr": 1.0, 0: 1, "0": 2},
            [],
            ["'0'", "0"],
            id="unexpected-only-int-and-str-keys",
        ),
    ],
)
def test_missing_or_unexpected_names_list_them_all_and_change_nothing(
    tmp_path: Path, stored: dict[Any, Any], missing: list[str], unexpected: list[str]
) -> None:
    snapshotd.save(tmp_path / "s.safetensors", stored)
    target: dict[Any, Any] = {"W": np.zeros(3), "b": np.zeros(2), "lr": 0.0}
    before = snapshot_of(target)

    with pytest.raises(RestoreMismatch) as info:
        snapshotd.load(tmp_path / "s.safetensors", into=target)

    assert info.value.missing == missing
    assert info.value.unexpected == unexpected
    for name in missing + unexpected:
        assert name in str(info.value)
    assert_unchanged(target, before)


def test_a_non_dict_state_does_not_fit_a_dict_target_and_changes_nothing(
    tmp_path: Path,
) -> None:
    snapshotd.save(tmp_path / "t.safetensors", Model())
    target: dict[str, Any] = {"W": np.zeros((7, 3)), "b": np.zeros(3)}
    before = snapshot_of(target)

    with pytest.raises(RestoreMismatch):
        snapshotd.load(tmp_path / "t.safetensors", into=target)

    assert_unchanged(target, before)


def test_store_load_into_a_mismatched_dict_changes_nothing(tmp_path: Path) -> None:
    store = snapshotd.Store(tmp_path / "store")
    store.commit("run", {"W": np.ones(3), "gone": np.ones(1)})
    target: dict[str, Any] = {"W": np.zeros(3), "new": np.zeros(1)}
    before = snapshot_of(target)

    with pytest.raises(RestoreMismatch, match="'gone'"):
        store.load("run", into=target)

    assert_unchanged(target, before)


# --- explicit callables -------------------------------------------------------------


def test_get_and_set_callables_round_trip_through_a_store(tmp_path: Path) -> None:
    live: dict[str, Any] = {"w": np.arange(4.0), "step": 12}
    restored: list[Any] = []
    target = adapt(
        None,
        get=lambda: ([live["w"], live["step"]], {"note": "x"}),
        set=restored.append,
    )
    store = snapshotd.Store(tmp_path / "store")

    store.commit("cb", target.get_state())
    target.set_state(store.load("cb"))

    ((arrays, extra),) = restored
    assert arrays[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert arrays[1] == 12
    assert extra == {"note": "x"}


def test_get_callable_wins_over_the_object(tmp_path: Path) -> None:
    target = adapt(Model(), get=lambda: {"only": np.ones(1)})

    snapshotd.save(tmp_path / "g.safetensors", target.get_state())

    assert list(snapshotd.load(tmp_path / "g.safetensors")) == ["only"]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: adapt(None, set=lambda state: None), id="set-without-get"),
        pytest.param(lambda: adapt(None), id="nothing"),
        pytest.param(lambda: adapt(Model(), rename={"W": "weights"}), id="rename-on-object"),
        pytest.param(
            lambda: adapt(None, get=lambda: {"a": 1}).set_state({"a": 1}), id="get-only-set"
        ),
    ],
)
def test_impossible_targets_are_usage_errors(make: Callable[[], Any]) -> None:
    with pytest.raises(UsageError):
        make()


# --- which arrays share memory ------------------------------------------------------


def test_arrays_that_own_their_memory_never_overlap() -> None:
    assert overlapping([np.zeros(3), np.zeros(3), np.zeros(0)]) == set()


def test_one_array_twice_overlaps_itself() -> None:
    w = np.zeros(3)
    assert overlapping([np.ones(2), w, w]) == {1, 2}


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        (lambda f: [f[:5], f[5:]], set()),
        (lambda f: [f[:6], f[5:]], {0, 1}),
        (lambda f: [f[2:4], f, f[8:]], {0, 1, 2}),
        (lambda f: [f[:3], f[3:6], f[4:5]], {1, 2}),
        (lambda f: [f[::-1][5:], f[5:]], set()),
        (lambda f: [f[::-1][:6], f[:5]], {0, 1}),
        (lambda f: [f[::2], f[1::2]], {0, 1}),
        (lambda f: [f.reshape(2, 5)[:, :2], f[2:3]], {0, 1}),
        (lambda f: [f[:0], f[:0], f[3:4]], set()),
    ],
    ids=[
        "adjacent",
        "one-shared-element",
        "inside-another",
        "only-the-overlapping-pair",
        "reversed-adjacent",
        "reversed-overlapping",
        "interleaved-spans-meet",
        "strided-rows-span",
        "empty-views",
    ],
)
def test_views_overlap_where_their_spans_meet(
    cut: Callable[[Array], list[Array]], expected: set[int]
) -> None:
    assert overlapping(cut(np.zeros(10))) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), st.booleans()), max_size=8))
def test_overlapping_agrees_with_numpys_byte_bounds(
    cuts: list[tuple[int, int, bool]],
) -> None:
    flat = np.zeros(40)
    arrays = [(flat[::-1] if flip else flat)[min(a, b) : max(a, b)] for a, b, flip in cuts]
    bounds = [byte_bounds(a) for a in arrays]
    expected = {
        i
        for i, (low, high) in enumerate(bounds)
        if high > low
        and any(j != i and hi > lo and lo < high and low < hi for j, (lo, hi) in enumerate(bounds))
    }
    assert overlapping(arrays) == expected


def test_a_dict_with_tied_entries_gets_each_stored_value() -> None:
    """One array under two names, stored untied: the second fill overwrote the first, so
    the first takes its stored array; the second stays the shared one."""
    tied = np.zeros(3)
    target = {"emb": tied, "out": tied}

    adapt(target).set_state({"emb": np.full(3, 1.0), "out": np.full(3, 2.0)})

    assert target["emb"].tolist() == [1.0] * 3
    assert target["out"] is tied
    assert tied.tolist() == [2.0] * 3


def test_a_dict_with_nan_values_is_filled_in_place() -> None:
    """NaN != NaN, yet the same bytes: the check after filling compares bytes."""
    weights = np.zeros(2)
    target = {"w": weights}

    adapt(target).set_state({"w": np.array([np.nan, 1.0])})

    assert target["w"] is weights
    assert np.isnan(weights[0])

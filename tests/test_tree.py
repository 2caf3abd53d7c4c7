"""State trees: flatten/unflatten, and the same trees through snapshotd.save/load and Store.

Every round trip is checked bit for bit: container types, dict key order and key types,
array dtypes, shapes and bytes (NaN payloads included), and the exact type of every leaf.
"""

from __future__ import annotations

import enum
import json
import math
import struct
import tempfile
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load_file

import snapshotd
from snapshotd import tree
from snapshotd.errors import StateError

Array = npt.NDArray[Any]

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]
SHAPES: list[tuple[int, ...]] = [(), (0,), (0, 3), (1,), (3, 4, 5)]
LAYOUTS = ["contiguous", "strided", "transposed", "big-endian", "big-endian-strided"]


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "0d"


# --- helpers ------------------------------------------------------------------------


def random_values(dtype: str, shape: tuple[int, ...], seed: int = 0) -> Array:
    """Arbitrary bit patterns (NaN payloads, infinities, subnormals) of ``dtype``."""
    rng = np.random.default_rng(seed)
    size = math.prod(shape)
    if dtype == "bool":
        return rng.integers(0, 2, size=size, dtype=np.uint8).astype(bool).reshape(shape)
    raw = rng.integers(0, 256, size=size * np.dtype(dtype).itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def arrange(values: Array, layout: str) -> Array:
    """``values`` laid out in memory as ``layout`` says (same logical contents)."""
    dtype, shape = values.dtype, values.shape
    if layout == "contiguous":
        return values.copy()
    if layout in ("strided", "big-endian-strided"):
        if layout == "big-endian-strided":
            dtype = dtype.newbyteorder(">")
        if not shape:  # a 0-d view into the middle of a larger buffer
            out = np.zeros(3, dtype)[1, ...]
        else:
            out = np.zeros((*shape[:-1], 2 * shape[-1]), dtype)[..., ::2]
    elif layout == "transposed":
        if len(shape) >= 2:
            out = np.zeros(shape[::-1], dtype).T
        elif len(shape) == 1:  # a negative-stride view
            out = np.zeros(shape, dtype)[::-1]
        else:
            out = np.zeros(2, dtype)[-1, ...]
    elif layout == "big-endian":
        return values.astype(dtype.newbyteorder(">"))
    else:
        raise AssertionError(layout)
    out[...] = values
    if layout != "big-endian" and values.size > 1 and len(shape) > 0 and shape[-1] > 1:
        assert not out.flags.c_contiguous, "the test meant to build a non-contiguous view"
    return out


def le_bytes(array: Array) -> bytes:
    """The logical contents of ``array`` as little-endian, C-order bytes."""
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def float_bits(value: float) -> bytes:
    return struct.pack("<d", value)


def assert_identical(expected: Any, actual: Any, where: str = "state") -> None:
    """Exact equality of two state trees: types, key order, bits."""
    if isinstance(expected, np.ndarray):
        assert type(actual) is np.ndarray, f"{where}: {type(actual)} is not an ndarray"
        assert actual.dtype == np.dtype(expected.dtype.name), f"{where}: dtype {actual.dtype}"
        assert actual.dtype.isnative, f"{where}: restored dtype is not native"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape}"
        assert le_bytes(actual) == le_bytes(expected), f"{where}: bytes differ"
        return
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, np.generic):
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype}"
        assert np.asarray(actual).tobytes() == np.asarray(expected).tobytes(), where
    elif isinstance(expected, float):
        assert float_bits(actual) == float_bits(expected), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, tuple | list):
        assert len(actual) == len(expected), f"{where}: length {len(actual)}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_identical(e, a, f"{where}[{i}]")
    elif isinstance(expected, dict):
        keys = [(type(k), k) for k in actual]
        assert keys == [(type(k), k) for k in expected], f"{where}: keys {keys}"
        for key, value in expected.items():
            assert_identical(value, actual[key], f"{where}[{key!r}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def attempt(action: Callable[[], Any]) -> tuple[Any, StateError | None]:
    """Run ``action``; return its result, or the StateError it raised."""
    try:
        return action(), None
    except StateError as exc:
        return None, exc


def via_memory(state: Any) -> Any:
    flat = tree.flatten(state)
    return tree.unflatten(flat.structure, flat.arrays)


def via_save(state: Any, directory: Path) -> Any:
    path = directory / "state.safetensors"
    snapshotd.save(path, state)
    return snapshotd.load(path)


def via_store(state: Any, directory: Path) -> Any:
    store = snapshotd.Store(directory / "store")
    store.commit("run", state)
    return store.load("run")


Trip = Callable[[Any, Path], Any]
TRIPS: list[Any] = [
    pytest.param(lambda state, _: via_memory(state), id="memory"),
    pytest.param(via_save, id="save"),
    pytest.param(via_store, id="store"),
]
FILE_TRIPS: list[Any] = TRIPS[1:]


# --- arrays: every dtype x shape x memory layout ------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flatten_gives_contiguous_little_endian_tensors(
    dtype: str, shape: tuple[int, ...], layout: str
) -> None:
    values = random_values(dtype, shape)

    flat = tree.flatten({"x": arrange(values, layout)})

    (tensor,) = flat.arrays.values()
    assert tensor.flags.c_contiguous
    assert tensor.dtype.byteorder in "<|" or (tensor.dtype.isnative and np.little_endian)
    assert tensor.shape == shape
    assert le_bytes(tensor) == le_bytes(values)
    assert_identical({"x": values}, tree.unflatten(flat.structure, flat.arrays))


@pytest.mark.parametrize("trip", FILE_TRIPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_shape_and_layout_round_trips_bit_exact_through_a_file(
    tmp_path: Path, dtype: str, trip: Trip
) -> None:
    # One file per dtype holds every shape x layout (and each twice, nested), to keep the
    # number of fsyncs down; a failure names the entry, e.g. state['3x4x5-strided'].
    expected: dict[str, Any] = {}
    state: dict[str, Any] = {}
    for seed, (shape, layout) in enumerate((s, lay) for s in SHAPES for lay in LAYOUTS):
        key = f"{shape_id(shape)}-{layout}"
        values = random_values(dtype, shape, seed)
        array = arrange(values, layout)
        expected[key], state[key] = values, array
        expected[key + "-nested"], state[key + "-nested"] = [(values,)], [(array,)]

    assert_identical(expected, trip(state, tmp_path))


# --- containers and plain scalars ---------------------------------------------------

NESTED: Any = {
    "z": (np.arange(3, dtype=np.int16), [1, (2.5, "x")], ()),
    0: [],
    "0": {},
    "a": [{"k": (None,)}, ([],)],
    -7: {"deep": {"er": [[[(True,)]]]}},
    "b": {2: "int key", "2": "str key", 1: "one"},
}


@pytest.mark.parametrize("trip", TRIPS)
def test_nested_containers_keep_types_key_order_and_key_types(tmp_path: Path, trip: Trip) -> None:
    restored = trip(NESTED, tmp_path)

    assert_identical(NESTED, restored)
    assert list(restored) == ["z", 0, "0", "a", -7, "b"]
    assert type(restored["z"]) is tuple
    assert type(restored["a"]) is list
    assert type(restored["a"][1][0]) is list


SCALARS: list[Any] = [
    pytest.param(0, id="int-zero"),
    pytest.param(-1, id="int-negative"),
    pytest.param(2**63, id="int-2**63"),
    pytest.param(2**64 + 1, id="int-2**64+1"),
    pytest.param(-(2**63) - 1, id="int-below-int64"),
    pytest.param(3**500, id="int-huge"),
    pytest.param(-(10**300), id="int-huge-negative"),
    pytest.param(1.5, id="float"),
    pytest.param(0.1, id="float-0.1"),
    pytest.param(-0.0, id="float-negative-zero"),
    pytest.param(0.0, id="float-zero"),
    pytest.param(math.inf, id="float-inf"),
    pytest.param(-math.inf, id="float-minus-inf"),
    pytest.param(math.nan, id="float-nan"),
    pytest.param(-math.nan, id="float-nan-sign-bit"),
    pytest.param(5e-324, id="float-subnormal"),
    pytest.param(1.7976931348623157e308, id="float-max"),
    pytest.param("", id="str-empty"),
    pytest.param("ünïcødé ✓ 🐍 日本語", id="str-unicode"),
    pytest.param('quote " backslash \\ nul \x00 newline \n', id="str-escapes"),
    pytest.param("\udcff", id="str-lone-surrogate"),
    pytest.param(True, id="bool-true"),
    pytest.param(False, id="bool-false"),
    pytest.param(None, id="none"),
]


@pytest.mark.parametrize("trip", TRIPS)
@pytest.mark.parametrize("value", SCALARS)
def test_plain_scalar_round_trips_exactly(tmp_path: Path, value: Any, trip: Trip) -> None:
    restored = trip({"v": value, "in": [value, (value,)]}, tmp_path)

    assert_identical({"v": value, "in": [value, (value,)]}, restored)


@pytest.mark.parametrize("trip", FILE_TRIPS)
def test_int_too_long_for_json_round_trips_or_is_refused_with_its_path(
    tmp_path: Path, trip: Trip
) -> None:
    big = 10**5000  # more digits than Python's default int/str conversion limit
    restored, refusal = attempt(lambda: trip({"big": big}, tmp_path))

    if refusal is not None:
        assert refusal.path == "state['big']"
    else:
        assert restored == {"big": big}


NUMPY_SCALARS: list[Any] = [
    pytest.param(np.bool_(True), id="bool"),
    pytest.param(np.int8(-128), id="int8"),
    pytest.param(np.int16(-2), id="int16"),
    pytest.param(np.int32(2**31 - 1), id="int32"),
    pytest.param(np.int64(-(2**63)), id="int64"),
    pytest.param(np.uint8(255), id="uint8"),
    pytest.param(np.uint16(65535), id="uint16"),
    pytest.param(np.uint32(7), id="uint32"),
    pytest.param(np.uint64(2**64 - 1), id="uint64"),
    pytest.param(np.float16(0.1), id="float16"),
    pytest.param(np.float32(-0.0), id="float32"),
    pytest.param(np.float64(0.1), id="float64"),
    pytest.param(np.complex64(1 - 2j), id="complex64"),
    pytest.param(np.complex128(complex(math.inf, -0.0)), id="complex128"),
]


@pytest.mark.parametrize("trip", TRIPS)
@pytest.mark.parametrize("value", NUMPY_SCALARS)
def test_numpy_scalar_comes_back_as_numpy_scalar_of_same_dtype(
    tmp_path: Path, value: np.generic, trip: Trip
) -> None:
    restored = trip({"s": value}, tmp_path)["s"]

    assert type(restored) is type(value)
    assert restored.dtype == value.dtype
    assert np.asarray(restored).tobytes() == np.asarray(value).tobytes()


# None as the whole state is left out: save/commit refuse it on purpose ("nothing to snapshot").
TOP_LEVEL: list[Any] = [
    pytest.param(np.arange(6.0).reshape(2, 3), id="ndarray"),
    pytest.param(np.float32(2.5), id="numpy-scalar"),
    pytest.param(42, id="int"),
    pytest.param("text", id="str"),
]


@pytest.mark.parametrize("trip", TRIPS)
@pytest.mark.parametrize("state", TOP_LEVEL)
def test_a_single_leaf_is_a_whole_state(tmp_path: Path, state: Any, trip: Trip) -> None:
    assert_identical(state, trip(state, tmp_path))


# --- refusals, with the path named --------------------------------------------------

Point = namedtuple("Point", "x y")


class Custom:
    pass


class MyList(list[int]):
    pass


LONGDOUBLE_IS_EXTENDED = np.dtype(np.longdouble).itemsize > 8

REFUSED: list[Any] = [
    pytest.param(np.zeros(2, object), "dtype object", id="object-array"),
    pytest.param(np.zeros(2, [("a", "<i4"), ("b", "<f8")]), "not supported", id="structured"),
    pytest.param(np.zeros(2, "V8"), "not supported", id="void"),
    pytest.param(np.array(["ab", "c"]), "<U2", id="str-array"),
    pytest.param(np.array([b"ab"]), "not supported", id="bytes-array"),
    pytest.param(np.zeros(2, "datetime64[s]"), "datetime64", id="datetime64-array"),
    pytest.param(np.zeros(2, "timedelta64[s]"), "timedelta64", id="timedelta64-array"),
    pytest.param(np.datetime64("2020-01-01"), "datetime64", id="datetime64-scalar"),
    pytest.param(
        np.zeros(2, np.longdouble),
        "extended precision",
        id="longdouble-array",
        marks=pytest.mark.skipif(not LONGDOUBLE_IS_EXTENDED, reason="longdouble is float64"),
    ),
    pytest.param(
        np.longdouble(1),
        "extended precision",
        id="longdouble-scalar",
        marks=pytest.mark.skipif(not LONGDOUBLE_IS_EXTENDED, reason="longdouble is float64"),
    ),
    pytest.param(
        np.zeros(2, np.clongdouble),
        "extended precision",
        id="clongdouble-array",
        marks=pytest.mark.skipif(not LONGDOUBLE_IS_EXTENDED, reason="longdouble is float64"),
    ),
    pytest.param(np.ma.masked_array([1.0, 2.0], mask=[False, True]), "masked", id="masked-array"),
    pytest.param({1, 2}, "set", id="set"),
    pytest.param(frozenset({1}), "frozenset", id="frozenset"),
    pytest.param(Custom(), "Custom", id="custom-object"),
    pytest.param(b"bytes", "bytes", id="bytes"),
    pytest.param(bytearray(b"x"), "bytearray", id="bytearray"),
    pytest.param(1 + 2j, "complex", id="python-complex"),
    pytest.param(Point(1, 2), "Point", id="namedtuple"),
    pytest.param(MyList([1]), "MyList", id="list-subclass"),
]


@pytest.mark.parametrize(("value", "problem"), REFUSED)
def test_unsupported_value_is_refused_with_its_path(value: Any, problem: str) -> None:
    state = {"opt": [0, {"k": 1}, value]}

    with pytest.raises(StateError) as info:
        tree.flatten(state)

    assert info.value.path == "state['opt'][2]"
    assert str(info.value).startswith("state['opt'][2]: ")
    assert problem in info.value.problem


@pytest.mark.parametrize(
    ("state", "path", "problem"),
    [
        pytest.param({"opt": {(1, 2): 0}}, "state['opt'][(1, 2)]", "tuple", id="tuple-key"),
        pytest.param({"opt": {True: 0}}, "state['opt'][True]", "bool", id="bool-key"),
        pytest.param({"opt": {1.5: 0}}, "state['opt'][1.5]", "float", id="float-key"),
        pytest.param({"opt": {None: 0}}, "state['opt'][None]", "NoneType", id="none-key"),
        pytest.param({"opt": {b"k": 0}}, "state['opt'][b'k']", "bytes", id="bytes-key"),
        pytest.param(
            [{"a": (0, {"b": {1}})}], "state[0]['a'][1]['b']", "set", id="deep-mixed-path"
        ),
        pytest.param({3: [{"x": Custom()}]}, "state[3][0]['x']", "Custom", id="int-key-path"),
        pytest.param(({"\n": {2}},), "state[0]['\\n']", "set", id="key-repr-escaped"),
    ],
)
def test_refusal_names_the_exact_path(state: Any, path: str, problem: str) -> None:
    with pytest.raises(StateError) as info:
        tree.flatten(state)

    assert info.value.path == path
    assert str(info.value) == f"{path}: {info.value.problem}"
    assert problem in info.value.problem


@pytest.mark.parametrize(
    "state",
    [
        pytest.param({1, 2}, id="set"),
        pytest.param(b"raw", id="bytes"),
        pytest.param(frozenset({1}), id="frozenset"),
        pytest.param(1 + 2j, id="complex"),
    ],
)
@pytest.mark.parametrize("trip", FILE_TRIPS)
def test_unsupported_whole_state_is_refused(tmp_path: Path, state: Any, trip: Trip) -> None:
    with pytest.raises(StateError) as info:
        trip(state, tmp_path)

    assert info.value.path == "state"


def test_a_cycle_is_refused_not_a_recursion_error() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)

    with pytest.raises(StateError, match="nested deeper"):
        tree.flatten({"c": cycle})


@pytest.mark.parametrize("trip", TRIPS)
def test_deep_but_allowed_nesting_round_trips(tmp_path: Path, trip: Trip) -> None:
    state: Any = np.arange(2)
    for depth in range(200):
        state = [state] if depth % 3 == 0 else ((state,) if depth % 3 == 1 else {depth: state})

    assert_identical(state, trip(state, tmp_path))


# --- restored arrays ----------------------------------------------------------------


def _check_ordinary_and_independent(first: Any, second: Any) -> None:
    for array in (first["a"], first["again"], first["b"]):
        assert type(array) is np.ndarray
        assert array.flags.writeable
        assert array.flags.aligned
    first["a"][:] = -1.0
    first["b"][:] = 9

    assert first["again"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert second["a"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert second["again"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert second["b"].tolist() == [0, 1, 2]


def _shared_state() -> dict[str, Any]:
    shared = np.arange(4.0)
    return {"a": shared, "again": shared, "b": np.arange(3, dtype=np.int8), "c": np.float32(1)}


def test_arrays_loaded_from_a_file_are_ordinary_independent_and_writable(tmp_path: Path) -> None:
    state = _shared_state()
    snapshotd.save(tmp_path / "s.safetensors", state)
    first = snapshotd.load(tmp_path / "s.safetensors")
    second = snapshotd.load(tmp_path / "s.safetensors")

    _check_ordinary_and_independent(first, second)
    assert state["a"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_arrays_loaded_from_a_store_are_ordinary_independent_and_writable(tmp_path: Path) -> None:
    state = _shared_state()
    store = snapshotd.Store(tmp_path / "store")
    store.commit("run", state)
    first = store.load("run")
    second = store.load("run")

    _check_ordinary_and_independent(first, second)
    assert state["a"].tolist() == [0.0, 1.0, 2.0, 3.0]


# --- tensor names -------------------------------------------------------------------

AWKWARD_KEYS: Any = {
    "a/b": np.array([1]),
    "a": {"b": np.array([2])},
    "%": np.array([3]),
    "%25": np.array([4]),
    "a%2Fb": np.array([5]),
    "": np.array([6]),
    "__metadata__": np.array([7]),
    0: np.array([8]),
    "0": np.array([9]),
    "0~2": np.array([10]),
    "x": {"": {"": np.array([11])}},
    "sp ace/ü": np.array([12]),
    '"quote': np.array([13]),
}


@pytest.mark.parametrize("trip", TRIPS)
def test_awkward_keys_get_distinct_tensor_names_and_round_trip(tmp_path: Path, trip: Trip) -> None:
    flat = tree.flatten(AWKWARD_KEYS)
    assert len(flat.arrays) == 13
    assert "__metadata__" not in flat.arrays

    assert_identical(AWKWARD_KEYS, trip(AWKWARD_KEYS, tmp_path))


@pytest.mark.parametrize("trip", FILE_TRIPS)
def test_key_that_is_not_utf8_encodable_round_trips_or_is_refused_with_its_path(
    tmp_path: Path, trip: Trip
) -> None:
    state = {"ok": 1, "\udcff": np.arange(2)}  # a lone surrogate, as os.fsdecode can produce
    restored, refusal = attempt(lambda: trip(state, tmp_path))

    if refusal is not None:
        assert refusal.path == "state['\\udcff']"
    else:
        assert_identical(state, restored)


def test_safetensors_sees_every_awkwardly_named_tensor(tmp_path: Path) -> None:
    snapshotd.save(tmp_path / "k.safetensors", AWKWARD_KEYS)
    flat = tree.flatten(AWKWARD_KEYS)

    tensors = load_file(str(tmp_path / "k.safetensors"))

    assert set(tensors) == set(flat.arrays)
    assert sorted(int(t[0]) for t in tensors.values()) == list(range(1, 14))


# --- property: random trees ---------------------------------------------------------

ST_DTYPES = st.sampled_from(DTYPES).map(np.dtype)


def _vary_layout(array: Array, how: int) -> Array:
    if how == 1:
        return array.astype(array.dtype.newbyteorder(">"))
    if how == 2:
        return np.asfortranarray(array)  # same values, transposed memory for 2+ dims
    if how == 3 and array.ndim >= 1:
        return array[::-1].copy()[::-1]  # same values, negative strides
    return array


ARRAYS = st.builds(
    _vary_layout,
    hnp.arrays(ST_DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)),
    st.integers(0, 3),
)
# float64 numpy scalars are left out here: test_numpy_scalar_comes_back_... covers them.
NUMPY_SCALAR_LEAVES = hnp.arrays(ST_DTYPES.filter(lambda d: d != np.float64), shape=()).map(
    lambda a: a[()]
)
KEYS = (
    st.sampled_from(["", "/", "%", "__metadata__", "0", "a/b", "a%2Fb"])
    | st.text(max_size=4)
    | st.integers(-3, 3)
)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.just(math.nan)
    | st.text(max_size=8)
    | ARRAYS
    | NUMPY_SCALAR_LEAVES
)
TREES = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(KEYS, children, max_size=4)
    ),
    max_leaves=16,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES)
def test_random_trees_round_trip_in_memory(state: Any) -> None:
    assert_identical(state, via_memory(state))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES)
def test_random_trees_round_trip_through_a_file(state: Any) -> None:
    # Wrapped in a list: a bare leaf as the whole state is test_a_single_leaf_is_a_whole_state.
    with tempfile.TemporaryDirectory() as directory:
        assert_identical([state], via_save([state], Path(directory)))


def test_check_structure_returns_the_tensor_names_in_tree_order() -> None:
    flat = tree.flatten(
        {"w": np.zeros(2), "opt": [np.ones(1), {"m": np.int8(3), "lr": 0.1}], "t": (np.zeros(0),)}
    )

    assert tree.check_structure(flat.structure) == list(flat.arrays)


@pytest.mark.parametrize(
    "structure",
    [
        {"set": []},
        {"d": [["k", {"zz": 1}]]},
        {"l": [{"a": 3}]},
        {"d": [["k", {"a": "x", "s": "y"}]]},
        {"t": "not a list"},
        {"d": [[True, {"a": "x"}]]},
        {"fb": "nothex!!nothex!!"},
        [1, 2],
    ],
)
def test_check_structure_raises_value_error_for_anything_it_does_not_write(
    structure: Any,
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (the message varies by node)
        tree.check_structure(structure)


# --- Skeleton: the same tree taken again in bulk ------------------------------------


def _skeleton_of(state: Any) -> tree.Skeleton:
    return tree.Skeleton(tree.flatten(state))


def _assert_taken_as_flatten_would(state: Any, leaves: list[Array]) -> None:
    """``leaves`` are what flatten gives for ``state``, up to byte order and memory order."""
    flat = tree.flatten(state)
    assert len(leaves) == len(flat.arrays)
    for leaf, (name, array) in zip(leaves, flat.arrays.items(), strict=True):
        assert type(leaf) is np.ndarray, name
        assert leaf.shape == array.shape, name
        assert leaf.dtype.newbyteorder("<") == array.dtype, name
        assert le_bytes(leaf) == le_bytes(array), name


def test_skeleton_takes_the_same_tree_in_flatten_order_without_copying() -> None:
    state: dict[str, Any] = {
        "w": np.arange(6.0).reshape(2, 3),
        "opt": [np.ones(2, np.float32), {"m": np.int8(3), "lr": 0.5, "on": True}],
        "t": (np.zeros(0), None, "tag", 7, -0.0, math.nan),
    }
    skeleton = _skeleton_of(state)
    state["w"] += 1  # new values, same tree
    state["opt"][1]["m"] = np.int8(9)  # a numpy scalar is data, not structure

    taken = skeleton.take(state)

    assert taken is not None
    leaves, structure = taken
    _assert_taken_as_flatten_would(state, leaves)
    assert leaves[0] is state["w"]
    assert structure is skeleton.structure, "no scalar changed: the very same structure"
    assert structure == tree.flatten(state).structure


def test_skeleton_of_a_dict_of_arrays_takes_them_as_they_are() -> None:
    state = {f"p{i}": np.full(3, i, np.float32) for i in range(100)}
    taken = _skeleton_of(state).take(state)
    assert taken is not None
    assert all(leaf is array for leaf, array in zip(taken[0], state.values(), strict=True))


def _rekey(state: dict[Any, Any], old: Any, new: Any) -> None:
    """Replace key ``old`` by ``new`` in place, keeping the key order."""
    items = [(new if k == old and type(k) is type(old) else k, v) for k, v in state.items()]
    state.clear()
    state.update(items)


SKELETON_BASE: dict[Any, Any] = {
    "w": np.zeros(3),
    "seq": [np.zeros(1), np.zeros(1)],
    "pair": (np.zeros(1), 1),
    1: {"x": np.zeros(2)},
    "lr": 0.0,
    "flag": False,
    "name": "a",
    "none": None,
    "s": np.float32(1.0),
}


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: s.update(extra=np.zeros(1)), id="key added"),
        pytest.param(lambda s: s.pop("name"), id="key removed"),
        pytest.param(lambda s: s.update(w=s.pop("w")), id="keys reordered"),
        pytest.param(lambda s: _rekey(s, 1, "1"), id="int key became str"),
        pytest.param(lambda s: _rekey(s, 1, True), id="int key became bool"),
        pytest.param(lambda s: _rekey(s, 1, 1.0), id="int key became float"),
        pytest.param(lambda s: s["seq"].append(np.zeros(1)), id="array list grew"),
        pytest.param(lambda s: s["seq"].pop(), id="array list shrank"),
        pytest.param(lambda s: s.update(seq=tuple(s["seq"])), id="list became tuple"),
        pytest.param(lambda s: s.update(pair=list(s["pair"])), id="tuple became list"),
        pytest.param(lambda s: s.update(pair=(s["pair"][0], True)), id="1 became True"),
        pytest.param(lambda s: s.update(lr=0), id="float became int"),
        pytest.param(lambda s: s.update(flag=0), id="False became 0"),
        pytest.param(lambda s: s.update(none=np.zeros(1)), id="None became an array"),
        pytest.param(lambda s: s.update(w=1.5), id="array became a float"),
        pytest.param(lambda s: s.update(w=np.float64(1.5)), id="array became a numpy scalar"),
        pytest.param(lambda s: s.update(s=np.ones(())), id="numpy scalar became an array"),
        pytest.param(lambda s: s.update(w=np.ma.masked_array(s["w"])), id="array subclass"),
        pytest.param(lambda s: s.update({1: [s[1]["x"]]}), id="dict became list"),
    ],
)
def test_skeleton_refuses_a_different_tree(change: Callable[[dict[Any, Any]], Any]) -> None:
    state = {k: v.copy() if isinstance(v, dict | list) else v for k, v in SKELETON_BASE.items()}
    skeleton = _skeleton_of(state)
    change(state)
    assert skeleton.take(state) is None


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: s.update(pair=(s["pair"][0], 2)), id="int changed"),
        pytest.param(lambda s: s.update(lr=-0.0), id="0.0 became -0.0"),
        pytest.param(lambda s: s.update(lr=math.nan), id="0.0 became NaN"),
        pytest.param(lambda s: s.update(name="b"), id="str changed"),
        pytest.param(lambda s: s.update(flag=True), id="bool changed"),
        pytest.param(
            lambda s: s.update(lr=2.5, name="c", pair=(s["pair"][0], 7)), id="three changed"
        ),
        pytest.param(lambda s: s[1].update(x=np.ones(2)), id="only an array"),
    ],
)
def test_skeleton_takes_new_scalar_values_into_a_new_structure(
    change: Callable[[dict[Any, Any]], Any],
) -> None:
    state = {k: v.copy() if isinstance(v, dict | list) else v for k, v in SKELETON_BASE.items()}
    skeleton = _skeleton_of(state)
    before = json.dumps(skeleton.structure)
    change(state)

    taken = skeleton.take(state)

    assert taken is not None
    leaves, structure = taken
    flat = tree.flatten(state)
    assert structure == flat.structure
    assert skeleton.kinds == flat.kinds
    _assert_taken_as_flatten_would(state, leaves)
    assert json.dumps(skeleton.structure) == before, "the skeleton's structure was modified"


def test_skeleton_refuses_an_int_too_big_to_store() -> None:
    state = {"n": 1, "w": np.zeros(1)}
    skeleton = _skeleton_of(state)
    state["n"] = 1 << 20_000
    assert skeleton.take(state) is None


def test_skeleton_of_a_dict_with_subclassed_keys_always_defers_to_flatten() -> None:
    class Key(str):
        __slots__ = ()

    state = {Key("a"): np.zeros(1)}
    assert _skeleton_of(state).take(state) is None


def _with_new_leaves(state: Any, seed: int) -> Any:
    """``state`` with every array replaced by different values of its dtype and shape,
    and every plain scalar but None by another value of its type."""
    if isinstance(state, np.ndarray):
        return random_values(state.dtype.name, state.shape, seed)
    if isinstance(state, dict):
        return {k: _with_new_leaves(v, seed + i) for i, (k, v) in enumerate(state.items())}
    if isinstance(state, tuple | list):
        return type(state)(_with_new_leaves(v, seed + i) for i, v in enumerate(state))
    if type(state) is bool:
        return not state
    if type(state) is int:
        return state + seed + 1
    if type(state) is float:
        return [-state, math.nan, 0.5 * seed][seed % 3]
    if type(state) is str:
        return state + str(seed)
    return state


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES, TREES, st.integers(0, 2), st.integers(0, 5))
def test_skeleton_takes_a_tree_only_as_flatten_would(
    first: Any, other: Any, how: int, seed: int
) -> None:
    # The property that lets the client skip flatten: whatever Skeleton.take accepts,
    # flatten gives the same structure, kinds and names, and the same arrays.
    skeleton = _skeleton_of(first)
    second = [first, _with_new_leaves(first, seed), other][how]

    taken = skeleton.take(second)

    if how < 2:
        assert taken is not None, "the same tree must be taken in bulk"
    if taken is not None:
        leaves, structure = taken
        again = tree.flatten(second)
        assert structure == again.structure
        assert skeleton.kinds == again.kinds
        _assert_taken_as_flatten_would(second, leaves)


@pytest.mark.parametrize(
    ("state", "names"),
    [
        ({"": {"x": np.zeros(1, np.uint16)}}, ["/x"]),
        ({"": np.zeros(1, np.uint16)}, ["state"]),
        ({"": [np.zeros(1, np.uint16)]}, ["/0"]),
        ([np.zeros(1, np.uint16)], ["0"]),
    ],
)
def test_tensor_names_do_not_depend_on_dtypes_seen_before(
    state: Any, names: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first array of a dtype takes the general path, later ones a fast path: both
    # must name a tensor by its whole path ("state" when that path is empty).
    monkeypatch.setattr(tree, "_SWAP", {})
    first = tree.flatten(state)
    again = tree.flatten(state)
    assert list(first.arrays) == names
    assert list(again.arrays) == names


class Mode(enum.StrEnum):
    TRAIN = "train"
    EVAL = "eval"


def test_skeleton_keeps_a_str_subclass_value_as_flatten_does() -> None:
    state: dict[str, Any] = {"w": np.zeros(2), "mode": Mode.TRAIN}
    skeleton = _skeleton_of(state)
    for mode in (Mode.TRAIN, Mode.EVAL):
        state["mode"] = mode
        taken = skeleton.take(state)
        assert taken is not None
        assert taken[1] == tree.flatten(state).structure
    state["mode"] = "eval"  # a plain str where the subclass was: another tree
    assert skeleton.take(state) is None


def test_skeleton_patches_many_changed_scalars_under_shared_containers() -> None:
    # A per-parameter optimiser state: every entry's step changes at every snapshot.
    state: dict[int, Any] = {
        i: {"step": 0, "m": np.zeros(2), "lr": [0.1, 0.2]} for i in range(2000)
    }
    skeleton = _skeleton_of(state)
    before = json.dumps(skeleton.structure)
    for entry in state.values():
        entry["step"] += 1
        entry["lr"][1] = -0.0
    state[7]["lr"][0] = math.inf

    taken = skeleton.take(state)

    assert taken is not None
    assert taken[1] == tree.flatten(state).structure
    assert json.dumps(skeleton.structure) == before

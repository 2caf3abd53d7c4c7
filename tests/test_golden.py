"""The golden file of format snapshotd/1 must load, bit-exact, forever."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

import snapshotd
from snapshotd import snapshot
from tests.golden.make_golden import CREATED, GOLDEN, expected_state


def _assert_same(actual: Any, expected: Any) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, np.ndarray | np.generic):
        assert actual.dtype == expected.dtype
        assert np.array_equal(actual, expected)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, tuple | list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_same(a, e)
    else:
        assert actual == expected


def test_golden_file_loads_bit_exact() -> None:
    _assert_same(snapshotd.load(GOLDEN), expected_state())


def test_golden_header_fields() -> None:
    meta = snapshot.read(GOLDEN).header.meta
    assert (meta.name, meta.version, meta.step, meta.safe_point) == ("golden", 1, 1234, True)
    assert meta.created == CREATED
    assert dict(meta.user) == {"purpose": "format-v1 golden file"}


def test_golden_file_loads_from_a_store(tmp_path: Path) -> None:
    (tmp_path / "golden").mkdir()
    shutil.copyfile(GOLDEN, tmp_path / "golden" / "v000001.safetensors")
    store = snapshotd.Store(tmp_path)
    _assert_same(store.load("golden"), expected_state())
    assert [v.version for v in store.versions("golden")] == [1]


def test_golden_file_opens_in_the_safetensors_package() -> None:
    tensors = safetensors.numpy.load_file(str(GOLDEN))
    np.testing.assert_array_equal(tensors["W"], expected_state()["W"])
    pairs = tensors["c128"]
    assert pairs.dtype == np.float64
    assert pairs.shape == (1, 2, 2)
    raw = GOLDEN.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["snapshotd.format"] == "snapshotd/1"

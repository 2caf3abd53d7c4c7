"""The file format: a safetensors file, byte for byte, plus snapshotd's metadata and digests.

The checks here read the bytes themselves (length prefix, JSON header, data section) and
re-derive the digests with xxhash, so they do not trust the code under test; forged
headers are re-signed with the documented header-digest rule so that each rejection test
reaches the check it is about.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import snapshotd
from snapshotd import format as fmt
from snapshotd import snapshot
from snapshotd.errors import SnapshotCorrupt

Array = npt.NDArray[Any]
Document = dict[str, Any]

DIGEST_KEY = b'"snapshotd.header_digest":"'
STORED_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}
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


# --- helpers ------------------------------------------------------------------------


def mixed_state() -> dict[str, Any]:
    """Every dtype, odd sizes and small item sizes first, to make misalignment likely."""
    rng = np.random.default_rng(7)
    state: dict[str, Any] = {}
    for i, dtype in enumerate(DTYPES):
        for shape in [(), (0,), (0, 3), (1,), (3,), (2, 3, 5)]:
            size = math.prod(shape) * np.dtype(dtype).itemsize
            raw = rng.integers(0, 256, size=size, dtype=np.uint8)
            values = raw.view(np.uint8).astype(bool) if dtype == "bool" else raw.view(dtype)
            state[f"{i:02d}-{dtype}-{'x'.join(map(str, shape)) or '0d'}"] = values.reshape(shape)
    state["scalar-c128"] = np.complex128(1 + 2j)
    state["scalar-u8"] = np.uint8(3)
    return state


def split(blob: bytes) -> tuple[Document, bytes]:
    """The parsed header JSON and the data section of a file."""
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def sign(document: Document) -> bytes:
    """A header region for ``document``, signed with the documented header-digest rule."""
    document["__metadata__"]["snapshotd.header_digest"] = "0" * 32
    text = json.dumps(document, separators=(",", ":")).encode()
    return sign_text(text)


def sign_text(text: bytes) -> bytes:
    padding = -(8 + len(text)) % 64
    region = bytearray(struct.pack("<Q", len(text) + padding) + text + b" " * padding)
    at = region.index(DIGEST_KEY) + len(DIGEST_KEY)
    region[at : at + 32] = xxhash.xxh3_128_hexdigest(bytes(region)).encode()
    return bytes(region)


@pytest.fixture(scope="module")
def good_blob(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small valid snapshot: a float64 [3] tensor 'a' and an int32 [2] tensor 'b'."""
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    snapshotd.save(path, {"a": np.arange(3.0), "b": np.arange(2, dtype=np.int32)})
    return path.read_bytes()


def decode(blob: bytes) -> fmt.Header:
    return fmt.decode_header(blob, len(blob), "the-file")


# --- safetensors compatibility ------------------------------------------------------


def test_safetensors_reads_every_tensor_with_the_same_values(tmp_path: Path) -> None:
    state = mixed_state()
    path = tmp_path / "mixed.safetensors"
    snapshotd.save(path, state)

    tensors = load_file(str(path))

    assert set(tensors) == set(state)
    for name, value in state.items():
        expected = np.asarray(value)
        got = tensors[name]
        if expected.dtype == np.complex128:
            assert got.dtype == np.float64, name
            assert got.shape == (*expected.shape, 2), name
            assert got[..., 0].tobytes() == expected.real.tobytes(), name
            assert got[..., 1].tobytes() == expected.imag.tobytes(), name
        else:
            assert got.dtype == expected.dtype, name
            assert got.shape == expected.shape, name
            assert got.tobytes() == expected.tobytes(), name


def test_complex64_is_a_native_safetensors_dtype(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    snapshotd.save(path, {"c": np.array([1 + 2j, -3j], np.complex64)})

    document, _ = split(path.read_bytes())

    assert document["c"]["dtype"] == "C64"
    assert document["c"]["shape"] == [2]
    assert load_file(str(path))["c"].dtype == np.complex64


def test_complex128_is_float64_pairs_and_recorded_in_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    snapshotd.save(path, {"c": np.zeros((2, 3), np.complex128), "f": np.zeros(2)})

    document, _ = split(path.read_bytes())

    assert document["c"]["dtype"] == "F64"
    assert document["c"]["shape"] == [2, 3, 2]
    assert json.loads(document["__metadata__"]["snapshotd.dtypes"]) == {"c": "complex128"}


def test_safetensors_sees_the_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    snapshotd.save(path, {"a": np.zeros(1)}, step=3, metadata={"k": "v"})

    with safe_open(str(path), framework="np") as opened:
        metadata = opened.metadata()

    assert metadata["snapshotd.format"] == "snapshotd/1"
    assert metadata["snapshotd.step"] == "3"
    assert json.loads(metadata["snapshotd.user"]) == {"k": "v"}


# --- layout -------------------------------------------------------------------------


def test_layout_is_aligned_contiguous_and_ends_at_the_last_tensor(tmp_path: Path) -> None:
    path = tmp_path / "mixed.safetensors"
    snapshotd.save(path, mixed_state())
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    document, data = split(blob)
    header_text = blob[8 : 8 + length]

    assert (8 + length) % 64 == 0, "the data section starts on a 64-byte boundary"
    assert json.loads(header_text) == document
    spans = sorted(
        (entry["data_offsets"][0], entry["data_offsets"][1], name, entry)
        for name, entry in document.items()
        if name != "__metadata__"
    )
    offset = 0
    for begin, end, name, entry in spans:
        itemsize = STORED_ITEMSIZE[entry["dtype"]]
        assert begin == offset, f"{name}: gap or overlap at {offset}"
        assert begin % min(itemsize, 8) == 0, f"{name} at {begin} is not aligned"
        assert (8 + length + begin) % min(itemsize, 8) == 0, f"{name}: file offset unaligned"
        assert end - begin == math.prod(entry["shape"]) * itemsize, name
        offset = end
    assert len(data) == offset, "the file ends exactly at the last tensor"
    assert len(blob) == 8 + length + offset


def test_header_is_padded_with_spaces_only(good_blob: bytes) -> None:
    blob = good_blob
    (length,) = struct.unpack("<Q", blob[:8])
    text = blob[8 : 8 + length]

    stripped = text.rstrip(b" ")

    assert json.loads(stripped) == json.loads(text)
    assert stripped.endswith(b"}")
    assert len(text) - len(stripped) < 64


# --- metadata -----------------------------------------------------------------------

METADATA_KEYS = {
    "snapshotd.format",
    "snapshotd.name",
    "snapshotd.version",
    "snapshotd.step",
    "snapshotd.created",
    "snapshotd.safe_point",
    "snapshotd.tree",
    "snapshotd.digest",
    "snapshotd.digests",
    "snapshotd.dtypes",
    "snapshotd.user",
    "snapshotd.header_digest",
}


def test_header_metadata_has_the_documented_keys_and_values(tmp_path: Path) -> None:
    store = snapshotd.Store(tmp_path / "store")
    created = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    state = {"w": np.arange(4.0), "c": np.ones(2, np.complex128), "n": 5, "s": np.int16(2)}
    version = store.commit(
        "exp-1", state, step=17, metadata={"k": "v", "ü": "x"}, safe_point=True, created=created
    )
    blob = (tmp_path / "store" / "exp-1" / "v000001.safetensors").read_bytes()
    document, data = split(blob)
    meta = document["__metadata__"]

    assert set(meta) == METADATA_KEYS
    assert all(isinstance(value, str) for value in meta.values())
    assert meta["snapshotd.format"] == "snapshotd/1"
    assert meta["snapshotd.name"] == "exp-1"
    assert meta["snapshotd.version"] == str(version) == "1"
    assert meta["snapshotd.step"] == "17"
    assert meta["snapshotd.created"] == "2024-01-02T01:04:05.678901Z"
    assert meta["snapshotd.safe_point"] == "true"
    assert meta["snapshotd.digest"] == "xxh3-128"
    assert json.loads(meta["snapshotd.user"]) == {"k": "v", "ü": "x"}
    assert json.loads(meta["snapshotd.dtypes"]) == {"c": "complex128"}
    tree = json.loads(meta["snapshotd.tree"])
    assert [key for key, _ in tree["d"]] == ["w", "c", "n", "s"]
    digests = json.loads(meta["snapshotd.digests"])
    tensors = {name: entry for name, entry in document.items() if name != "__metadata__"}
    assert set(digests) == set(tensors) == {"w", "c", "s"}
    for name, entry in tensors.items():
        begin, end = entry["data_offsets"]
        assert digests[name] == xxhash.xxh3_128_hexdigest(data[begin:end]), name
    assert re.fullmatch(r"[0-9a-f]{32}", meta["snapshotd.header_digest"])


def test_created_is_utc_with_a_z_suffix_for_save(tmp_path: Path) -> None:
    before = datetime.now(UTC)
    snapshotd.save(tmp_path / "m.safetensors", {"a": np.zeros(1)})
    after = datetime.now(UTC)

    meta = split((tmp_path / "m.safetensors").read_bytes())[0]["__metadata__"]

    text = meta["snapshotd.created"]
    assert text.endswith("Z")
    created = datetime.fromisoformat(text)
    assert created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= created <= after + timedelta(seconds=1)
    assert meta["snapshotd.name"] == "m"
    assert meta["snapshotd.step"] == ""
    assert meta["snapshotd.safe_point"] == ""


def test_header_digest_follows_the_documented_rule(good_blob: bytes) -> None:
    blob = good_blob
    (length,) = struct.unpack("<Q", blob[:8])
    region = bytearray(blob[: 8 + length])
    at = region.index(DIGEST_KEY) + len(DIGEST_KEY)
    stored = bytes(region[at : at + 32])

    region[at : at + 32] = b"0" * 32

    assert xxhash.xxh3_128_hexdigest(bytes(region)).encode() == stored


def test_decoded_header_gives_back_the_meta(tmp_path: Path) -> None:
    store = snapshotd.Store(tmp_path / "store")
    created = datetime(2030, 5, 6, 7, 8, 9, 10, tzinfo=UTC)
    store.commit("r", {"a": np.zeros(3)}, step=4, safe_point=False, created=created)
    blob = (tmp_path / "store" / "r" / "v000001.safetensors").read_bytes()

    header = decode(blob)

    assert header.meta.name == "r"
    assert header.meta.version == 1
    assert header.meta.step == 4
    assert header.meta.created == created
    assert header.meta.safe_point is False
    assert dict(header.meta.user) == {}
    assert header.data_start % 64 == 0
    assert header.file_size == len(blob)


# --- every byte is covered ----------------------------------------------------------


def test_flipping_any_byte_of_the_file_is_detected(tmp_path: Path, good_blob: bytes) -> None:
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(good_blob)

    undetected = []
    fd = os.open(path, os.O_RDWR)
    try:
        for at in range(len(good_blob)):
            for mask in (0x01, 0x80):
                os.pwrite(fd, bytes([good_blob[at] ^ mask]), at)
                try:
                    snapshotd.load(path)
                except SnapshotCorrupt:
                    pass
                else:
                    undetected.append((at, mask))
                os.pwrite(fd, good_blob[at : at + 1], at)
    finally:
        os.close(fd)

    assert undetected == []
    assert snapshotd.load(path)["a"].tolist() == [0.0, 1.0, 2.0]


# --- decode_header rejections -------------------------------------------------------


def _forged(change: Callable[[Document], None]) -> Callable[[bytes], bytes]:
    def build(blob: bytes) -> bytes:
        document, data = split(blob)
        change(document)
        return sign(document) + data

    return build


def _set_meta(key: str, value: str) -> Callable[[Document], None]:
    return lambda document: document["__metadata__"].update({"snapshotd." + key: value})


def _set_entry(name: str, **fields: Any) -> Callable[[Document], None]:
    return lambda document: document[name].update(fields)


def _gap(blob: bytes) -> bytes:
    # 'b' moves 8 bytes further and the data section grows by 8 zero bytes before it: the
    # file size matches the layout, so only the gap itself is wrong.
    document, data = split(blob)
    document["b"]["data_offsets"] = [32, 40]
    return sign(document) + data[:24] + bytes(8) + data[24:]


def _overlap(blob: bytes) -> bytes:
    document, data = split(blob)
    document["b"]["data_offsets"] = [16, 24]
    return sign(document) + data[:24]


def _not_json(blob: bytes) -> bytes:
    text = b'{"__metadata__":{"snapshotd.header_digest":"' + b"0" * 32 + b'"}, oops'
    return sign_text(text)


def _not_utf8(blob: bytes) -> bytes:
    text = b'{"__metadata__":{"snapshotd.header_digest":"' + b"0" * 32 + b'","x":"\xff\xfe"}}'
    return sign_text(text)


def _header_digest_wrong(blob: bytes) -> bytes:
    document, data = split(blob)
    region = bytearray(sign(document))
    at = region.index(b'"snapshotd.name":"') + len(b'"snapshotd.name":"')
    region[at] ^= 0x01  # still valid JSON, changed after signing
    return bytes(region) + data


def _tree_names_ghost(document: Document) -> None:
    document["__metadata__"]["snapshotd.tree"] = json.dumps(
        {"d": [["a", {"a": "a"}], ["b", {"a": "b"}], ["c", {"a": "ghost"}]]}
    )


def _tree_unknown_node(document: Document) -> None:
    document["__metadata__"]["snapshotd.tree"] = json.dumps(
        {"d": [["a", {"a": "a"}], ["b", {"a": "b"}], ["x", {"set": []}]]}
    )


def _tree_misses_a_tensor(document: Document) -> None:
    document["__metadata__"]["snapshotd.tree"] = json.dumps({"d": [["a", {"a": "a"}]]})


def _digests_miss_a_tensor(document: Document) -> None:
    digests = json.loads(document["__metadata__"]["snapshotd.digests"])
    del digests["b"]
    document["__metadata__"]["snapshotd.digests"] = json.dumps(digests)


def _no_metadata(document: Document) -> None:
    document["__metadata__"] = {"snapshotd.header_digest": "0" * 32}


REJECTED: list[Any] = [
    pytest.param(lambda blob: blob[:5], "shorter than the 8-byte prefix", id="shorter-than-prefix"),
    pytest.param(
        lambda blob: struct.pack("<Q", 2**64 - 1) + blob[8:], "exceeds", id="length-u64-max"
    ),
    pytest.param(
        lambda blob: struct.pack("<Q", fmt.MAX_HEADER_BYTES + 1) + blob[8:],
        "exceeds",
        id="length-over-limit",
    ),
    pytest.param(
        lambda blob: struct.pack("<Q", len(blob)) + blob[8:], "past the end", id="length-past-eof"
    ),
    pytest.param(_not_json, "not JSON", id="not-json"),
    pytest.param(_not_utf8, "not JSON", id="not-utf8"),
    pytest.param(_header_digest_wrong, "header digest mismatch", id="header-digest-mismatch"),
    pytest.param(_forged(_set_meta("format", "snapshotd/2")), "unknown format", id="format"),
    pytest.param(_forged(_set_meta("digest", "sha256")), "unknown digest", id="digest-algorithm"),
    pytest.param(_gap, "gap", id="gap-between-tensors"),
    pytest.param(_overlap, "overlaps", id="overlapping-tensors"),
    pytest.param(lambda blob: blob + b"\0", "header describes", id="trailing-byte"),
    pytest.param(lambda blob: blob[:-1], "header describes", id="truncated-data"),
    pytest.param(_forged(_set_entry("a", shape=[4])), "do not fit its shape", id="shape-offsets"),
    pytest.param(_forged(_set_entry("a", shape=[-3])), "invalid shape", id="negative-dim"),
    pytest.param(
        _forged(_set_entry("a", shape=[-1, -3])), "invalid shape", id="negative-dims-product"
    ),
    pytest.param(_forged(_set_entry("a", dtype="F8_E4M3")), "F8_E4M3", id="unknown-dtype"),
    pytest.param(_forged(_set_entry("a", shape=[3.0])), "invalid shape", id="float-dim"),
    pytest.param(_forged(_set_entry("a", shape=["3"])), "invalid shape", id="string-dim"),
    pytest.param(_forged(_set_entry("a", shape=[[3]])), "malformed", id="list-dim"),
    pytest.param(_forged(_set_entry("a", shape=[1] * 65)), "invalid shape", id="65-dims"),
    pytest.param(
        _forged(_set_entry("a", data_offsets=[0.0, 24.0])), "integers", id="float-offsets"
    ),
    pytest.param(_forged(_set_entry("a", data_offsets=[0, 8, 24])), "malformed", id="3-offsets"),
    pytest.param(_forged(_tree_unknown_node), "unknown structure node", id="tree-unknown-node"),
    pytest.param(_forged(_set_entry("a", data_offsets=[-24, 0])), "offsets", id="negative-offset"),
    pytest.param(_forged(_tree_names_ghost), "tree", id="tree-names-missing-tensor"),
    pytest.param(_forged(_tree_misses_a_tensor), "tree", id="tree-omits-a-tensor"),
    pytest.param(_forged(_digests_miss_a_tensor), "digests", id="digest-missing"),
    pytest.param(_forged(_no_metadata), "malformed", id="no-snapshotd-metadata"),
    pytest.param(
        _forged(_set_meta("created", "2024-01-01T00:00:00")), "timezone", id="naive-created"
    ),
]


@pytest.mark.parametrize(("damage", "reason"), REJECTED)
def test_decode_header_rejects(
    good_blob: bytes, damage: Callable[[bytes], bytes], reason: str
) -> None:
    blob = damage(good_blob)

    with pytest.raises(SnapshotCorrupt) as info:
        decode(blob)

    assert reason in info.value.reason
    assert info.value.path == "the-file"


@pytest.mark.parametrize(("damage", "reason"), REJECTED)
def test_load_rejects_the_same_files(
    tmp_path: Path, good_blob: bytes, damage: Callable[[bytes], bytes], reason: str
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(damage(good_blob))

    with pytest.raises(SnapshotCorrupt) as info:
        snapshotd.load(path)

    assert reason in info.value.reason


def test_a_plain_safetensors_file_is_not_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"a": np.zeros(3)}, str(path), metadata={"k": "v"})

    with pytest.raises(SnapshotCorrupt):
        snapshotd.load(path)


def test_an_oversized_header_length_is_refused_without_reading_it(tmp_path: Path) -> None:
    # A sparse file big enough that the length fits inside it: only the limit can stop it.
    path = tmp_path / "huge.safetensors"
    length = fmt.MAX_HEADER_BYTES + 1
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", length))
        stream.truncate(8 + length + 64)

    tracemalloc.start()
    try:
        with pytest.raises(SnapshotCorrupt) as info:
            snapshot.read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert "exceeds" in info.value.reason
    assert peak < 1_000_000, f"{peak} bytes allocated to refuse a header"
    assert os.path.getsize(path) == 8 + length + 64


MALFORMED_TREES: list[Any] = [
    pytest.param({"l": [{"a": "a"}, {"a": "b"}, {"zz": 1}]}, id="unknown-node-tag"),
    pytest.param({"l": [{"a": "a"}, {"a": "b"}, {"f": "not-a-float"}]}, id="bad-float-text"),
    pytest.param({"l": [{"a": "a"}, {"a": "b"}, [1, 2]]}, id="bare-json-list"),
    pytest.param({"l": [{"a": "a"}, {"a": "b"}, 1.5]}, id="bare-json-float"),
    pytest.param({"d": [[[1], {"a": "a"}], ["b", {"a": "b"}]]}, id="list-as-dict-key"),
    pytest.param({"d": [["a", {"a": "a"}, 3], ["b", {"a": "b"}]]}, id="dict-entry-not-a-pair"),
    pytest.param({"t": {"a": "a", "b": "b"}}, id="tuple-body-not-a-list"),
]


@pytest.mark.parametrize("structure", MALFORMED_TREES)
def test_a_malformed_tree_is_corruption_not_a_crash(
    tmp_path: Path, good_blob: bytes, structure: Any
) -> None:
    # The header digest is valid (forged the documented way): the structure itself is
    # not one snapshotd writes, so loading must fail with SnapshotCorrupt, not KeyError.
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_forged(_set_meta("tree", json.dumps(structure)))(good_blob))

    with pytest.raises(SnapshotCorrupt):
        snapshotd.load(path)


def test_forging_helper_reproduces_a_valid_file(tmp_path: Path, good_blob: bytes) -> None:
    # Guards the rejection tests: an unchanged forged file must still be accepted.
    blob = good_blob
    path = tmp_path / "same.safetensors"

    path.write_bytes(_forged(lambda document: None)(blob))

    assert path.read_bytes() == blob
    assert snapshotd.load(path)["a"].tolist() == [0.0, 1.0, 2.0]


def test_digest_of_every_tensor_is_checked_on_load(tmp_path: Path) -> None:
    state: dict[str, Array] = {"x": np.arange(3.0), "y": np.arange(4, dtype=np.int16)}
    path = tmp_path / "d.safetensors"
    snapshotd.save(path, state)
    blob = bytearray(path.read_bytes())
    document, _ = split(bytes(blob))
    data_start = len(blob) - sum(v.nbytes for v in state.values())

    for name in state:
        damaged = bytearray(blob)
        damaged[data_start + document[name]["data_offsets"][1] - 1] ^= 0x10
        path.write_bytes(damaged)
        with pytest.raises(SnapshotCorrupt, match=f"digest mismatch in tensor '{name}'"):
            snapshotd.load(path)


# --- the header template ------------------------------------------------------------


def reference_header(layout: fmt.Layout, meta: fmt.Meta, digests: dict[str, str]) -> bytes:
    """The header region as FORMAT.md describes it, built with plain ``json.dumps``."""

    def compact(value: object) -> str:
        return json.dumps(value, separators=(",", ":"))

    special = {t.name: t.dtype.name for t in layout.tensors if t.dtype.name == "complex128"}
    metadata = {
        "snapshotd.format": "snapshotd/1",
        "snapshotd.name": meta.name,
        "snapshotd.version": str(meta.version),
        "snapshotd.step": "" if meta.step is None else str(meta.step),
        "snapshotd.created": meta.created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "snapshotd.safe_point": {None: "", True: "true", False: "false"}[meta.safe_point],
        "snapshotd.tree": compact(meta.structure),
        "snapshotd.digest": "xxh3-128",
        "snapshotd.digests": compact({name: digests[name] for name in layout.names}),
        "snapshotd.dtypes": compact(special),
        "snapshotd.user": compact(dict(meta.user)),
    }
    document: Document = {"__metadata__": metadata}
    for tensor in layout.tensors:
        code, shape = tensor.stored()
        entry = {"dtype": code, "shape": shape, "data_offsets": [tensor.begin, tensor.end]}
        document[tensor.name] = entry
    return sign(document)


TEMPLATE_STATES: dict[str, Any] = {
    "empty dict": {},
    "one array": {"a": np.zeros(3)},
    "every dtype": mixed_state(),
    "escapes everywhere": {
        'q"uote\\back/slash\u2028é\x00': np.zeros((2, 3), np.complex128),
        "k": [1, 2.5, None, 's"', True, {"z": np.int8(3)}, float("nan")],
        3: np.ones(0, np.bool_),
    },
    "a bare array": np.arange(5),
    "many arrays": {f"p{i}": np.full(3, i, np.float32) for i in range(300)},
}


@pytest.mark.parametrize("key", sorted(TEMPLATE_STATES))
@pytest.mark.parametrize(
    ("step", "safe_point", "user"),
    [(None, None, {}), (5, True, {'a"': "b\u00e9\n"}), (0, False, {"": ""})],
)
def test_a_template_renders_exactly_the_documented_json(
    key: str, step: int | None, safe_point: bool | None, user: dict[str, str]
) -> None:
    flat = snapshotd.tree.flatten(TEMPLATE_STATES[key])
    layout = fmt.Layout.plan(flat.arrays)
    digests = {name: fmt.digest(array) for name, array in flat.arrays.items()}
    created = datetime(2031, 2, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=-5)))
    meta = fmt.Meta(
        name="run-1",
        version=7,
        step=step,
        created=created,
        structure=flat.structure,
        safe_point=safe_point,
        user=user,
    )
    template = fmt.Template(layout, flat.structure, flat.kinds)

    rendered = template.render(meta, [digests[name] for name in layout.names])

    assert rendered == reference_header(layout, meta, digests)
    assert template.length(meta) == len(rendered)
    data_size = layout.data_size
    assert decode(rendered + b"\0" * data_size).meta.structure == flat.structure


def test_a_template_refuses_another_tree_or_a_wrong_digest_count() -> None:
    flat = snapshotd.tree.flatten({"a": np.zeros(2), "b": np.ones(3)})
    layout = fmt.Layout.plan(flat.arrays)
    template = fmt.Template(layout, flat.structure, flat.kinds)
    created = datetime(2031, 1, 1, tzinfo=UTC)
    other = fmt.Meta(name="r", version=1, step=None, created=created, structure={"l": []})
    own = fmt.Meta(name="r", version=1, step=None, created=created, structure=flat.structure)

    with pytest.raises(ValueError, match="structure"):
        template.render(other, ["0" * 32, "1" * 32])
    with pytest.raises(ValueError, match="1 digests for 2 tensors"):
        template.render(own, ["0" * 32])


def test_a_template_fits_only_its_own_layout_object_and_the_same_tree() -> None:
    flat = snapshotd.tree.flatten({"a": np.zeros(2), "n": 1})
    layout = fmt.Layout.plan(flat.arrays)
    template = fmt.Template(layout, flat.structure, flat.kinds)
    again = snapshotd.tree.flatten({"a": np.ones(2), "n": 1})
    as_bool = snapshotd.tree.flatten({"a": np.ones(2), "n": True})

    assert template.fits(layout, flat.structure, None)  # the very same object
    assert template.fits(layout, again.structure, again.kinds)  # an equal tree
    assert not template.fits(layout, again.structure, None)  # equal, but kinds unknown
    assert not template.fits(layout, as_bool.structure, as_bool.kinds)  # 1 == True, yet not
    assert not template.fits(fmt.Layout.plan(again.arrays), again.structure, again.kinds)


@pytest.mark.parametrize("limit", [1, 100, 4096, 10**9])
def test_layout_groups_cover_every_tensor_in_order_within_the_limit(limit: int) -> None:
    rng = np.random.default_rng(limit)
    arrays = {f"t{i}": np.zeros(int(rng.integers(0, 700)), np.uint8) for i in range(300)}
    layout = fmt.Layout.plan(arrays)

    groups = layout.groups(limit)

    assert groups[0][0] == 0
    assert groups[-1][1] == len(layout.tensors)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))
    for begin, end in groups:
        total = sum(layout.sizes[begin:end])
        assert end > begin
        assert total <= limit or end - begin == 1
        if end < len(layout.tensors):  # greedy: the next tensor did not fit
            assert total + layout.sizes[end] > limit
    assert layout.groups(limit) is groups


def test_tensors_bigger_than_a_writeback_unit_are_digested_in_pieces(tmp_path: Path) -> None:
    unit = snapshot.IO_UNIT
    rng = np.random.default_rng(11)
    state = {
        "small": rng.standard_normal(10),
        "big": rng.integers(0, 255, unit * 2 + 12345, dtype=np.uint8),
        "exact": rng.integers(0, 255, unit, dtype=np.uint8),
        "tail": rng.standard_normal(3).astype(np.float32),
    }
    path = tmp_path / "big.safetensors"

    snapshotd.save(path, state)

    document, data = split(path.read_bytes())
    digests = json.loads(document["__metadata__"]["snapshotd.digests"])
    for name, entry in document.items():
        if name != "__metadata__":
            begin, end = entry["data_offsets"]
            assert digests[name] == xxhash.xxh3_128_hexdigest(data[begin:end]), name
    loaded = snapshotd.load(path)
    for name, array in state.items():
        np.testing.assert_array_equal(loaded[name], array)


# --- reading headers: other JSON spellings, and what is reused between reads ---------


def _reordered(document: Document) -> Document:
    """The same header with ``__metadata__`` last, as another safetensors writer may."""
    metadata = document.pop("__metadata__")
    document["__metadata__"] = metadata
    return document


def _spaced_text(document: Document) -> bytes:
    """The same header with JSON whitespace between its members (not after the header
    digest's colon, which the documented digest rule spells without one)."""
    document["__metadata__"]["snapshotd.header_digest"] = "0" * 32
    return json.dumps(document, indent="\t", separators=(",", ":")).encode() + b"\n\r\n"


def _spaced_after_metadata(document: Document) -> bytes:
    """Our member order, with whitespace where the metadata ends and the tensors begin."""
    metadata = document.pop("__metadata__")
    metadata["snapshotd.header_digest"] = "0" * 32
    head = '{"__metadata__":' + json.dumps(metadata, separators=(",", ":"))
    rest = json.dumps(document, separators=(",", ":"))[1:-1]
    return (head + " \n ,\t" + rest + "\n}\r\n").encode()


@pytest.mark.parametrize(
    "respell",
    [
        pytest.param(lambda d: sign(_reordered(d)), id="metadata-last"),
        pytest.param(lambda d: sign_text(_spaced_text(d)), id="whitespace"),
        pytest.param(lambda d: sign_text(_spaced_after_metadata(d)), id="whitespace-inside"),
    ],
)
def test_any_json_spelling_of_a_header_is_read_the_same(
    good_blob: bytes, respell: Callable[[Document], bytes]
) -> None:
    document, data = split(good_blob)
    expected = decode(good_blob)

    header = decode(respell(document) + data)

    assert header.layout == expected.layout
    assert header.meta == expected.meta
    assert header.digests == expected.digests


def test_a_layout_read_before_is_not_reused_when_the_dtypes_differ(tmp_path: Path) -> None:
    """complex128 is stored as float64 pairs: the same tensor entries read as complex128
    with ``snapshotd.dtypes`` naming it, and as float64 pairs without."""
    pairs = np.arange(6.0).reshape(3, 2)
    complex_path = tmp_path / "c.safetensors"
    snapshotd.save(complex_path, {"z": pairs[:, 0] + 1j * pairs[:, 1]})
    float_path = tmp_path / "f.safetensors"
    snapshotd.save(float_path, {"z": pairs})
    complex_entries = split(complex_path.read_bytes())[0]["z"]
    assert complex_entries == split(float_path.read_bytes())[0]["z"]

    for _ in range(2):  # and again, with both layouts remembered
        assert snapshotd.load(complex_path)["z"].dtype == np.complex128
        assert snapshotd.load(float_path)["z"].dtype == np.float64


def test_a_tree_read_before_is_not_shared_with_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    snapshotd.save(path, {"w": np.zeros(2), "opt": {"lr": 0.1, "steps": [1, 2]}})

    first = snapshotd.load(path)
    first["opt"]["steps"].append(3)
    first["opt"]["lr"] = 9.0

    assert snapshotd.load(path)["opt"] == {"lr": 0.1, "steps": [1, 2]}


def _mixed_arrays() -> dict[str, npt.NDArray[Any]]:
    """Arrays whose tree order is not their layout order (item sizes interleaved)."""
    return {
        "i8": np.arange(3, dtype=np.int8),
        "f64": np.arange(2.0),
        "f32": np.arange(4, dtype=np.float32),
        "c128": np.array([1 + 2j]),
        "u8": np.arange(5, dtype=np.uint8),
    }


def test_a_layout_puts_leaves_given_in_tree_order_into_layout_order() -> None:
    arrays = _mixed_arrays()
    layout = fmt.Layout.plan(arrays)
    leaves = list(arrays.values())

    ordered = layout.in_order(leaves)

    assert layout.names != tuple(arrays)  # the case worth testing: a real permutation
    assert [id(a) for a in ordered] == [id(arrays[name]) for name in layout.names]


def test_a_layout_of_one_dtype_keeps_the_leaves_as_given() -> None:
    arrays = {f"p{i}": np.zeros(2, np.float32) for i in range(5)}
    leaves = list(arrays.values())
    assert fmt.Layout.plan(arrays).in_order(leaves) is leaves


@pytest.mark.parametrize(
    ("change", "accepted"),
    [
        (lambda a: a, True),
        (lambda a: [np.ones_like(x) for x in a], True),  # new values
        (lambda a: [np.asfortranarray(x) for x in a], True),  # memory order is the copy's job
        (lambda a: a[:-1], False),  # one short
        (lambda a: [*a[:-1], np.zeros(6, np.uint8)], False),  # another shape
        (lambda a: [*a[:-1], np.zeros((5, 1), np.uint8)], False),  # same size, other shape
        (lambda a: [*a[:-1], np.zeros(5, np.int8)], False),  # another dtype
        (lambda a: [a[0], a[1].astype(">f8"), *a[2:]], False),  # byte order: flatten's job
    ],
)
def test_a_layout_accepts_leaves_only_of_its_planned_shapes_and_dtypes(
    change: Callable[[list[npt.NDArray[Any]]], list[npt.NDArray[Any]]], accepted: bool
) -> None:
    arrays = _mixed_arrays()
    layout = fmt.Layout.plan(arrays)
    assert layout.accepts(change(list(arrays.values()))) is accepted


def test_a_layout_read_back_accepts_no_leaves() -> None:
    arrays = _mixed_arrays()
    planned = fmt.Layout.plan(arrays)
    read_back = fmt.Layout(planned.tensors, planned.data_size)
    assert not read_back.accepts(list(arrays.values()))


@pytest.mark.parametrize(
    ("change", "fits"),
    [
        (lambda a: a, True),
        (lambda a: dict(reversed(a.items())), True),  # another order: matched by name
        (lambda a: {**a, "extra": np.zeros(1)}, False),
        (lambda a: {k: v for k, v in a.items() if k != "f32"}, False),
        (lambda a: {**a, "u8": np.zeros(6, np.uint8)}, False),  # another shape
        (lambda a: {**a, "u8": np.zeros(5, np.int8)}, False),  # another dtype
        (lambda a: {**a, "f64": a["f64"].astype(">f8")}, True),  # byte order: flatten's job
    ],
    ids=["same", "reordered", "extra-name", "missing-name", "shape", "dtype", "byte-order"],
)
def test_a_read_back_layout_orders_only_arrays_that_fit_it_exactly(
    change: Callable[[dict[str, npt.NDArray[Any]]], dict[str, npt.NDArray[Any]]], fits: bool
) -> None:
    planned = fmt.Layout.plan(_mixed_arrays())
    read_back = fmt.Layout(planned.tensors, planned.data_size)
    arrays = change(_mixed_arrays())

    ordered = read_back.ordered(arrays)

    assert read_back.matches(arrays) is fits
    if fits:
        assert ordered is not None
        assert [id(a) for a in ordered] == [id(arrays[n]) for n in read_back.names]
    else:
        assert ordered is None


@settings(max_examples=500, deadline=None)
@given(
    st.text()
    | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F))
    | st.sampled_from(['"', "\\", '\\"', '{"a":"', "\x7f", "\x1f", "/", "\u2028", "\ud800"])
)
def test_a_header_string_is_escaped_exactly_as_json_dumps_would(text: str) -> None:
    assert fmt._literal(text) == json.dumps(text, ensure_ascii=True)
    assert json.loads(fmt._literal(text)) == text


def test_saving_to_one_file_again_reuses_its_template_and_follows_every_change(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ckpt.safetensors"
    states: list[dict[str, Any]] = [
        {"w": np.arange(4.0), "b": np.zeros(2, np.float32), "n": 1},
        {"w": np.arange(4.0) + 1, "b": np.ones(2, np.float32), "n": 1},  # values only
        {"w": np.arange(4.0), "b": np.ones(2, np.float32), "n": True},  # 1 == True, yet not
        {"w": np.arange(5.0), "b": np.ones(2, np.float32), "n": True},  # a shape
        {"w": np.arange(5.0), "c": np.ones(2, np.float32), "n": True},  # a name
        {"w": np.arange(5), "c": np.ones(2, np.float32), "n": True},  # a dtype
    ]
    templates = []
    for state in states:
        snapshotd.save(path, state)
        templates.append(snapshot._saved.get(os.path.abspath(path)))
        loaded = snapshotd.load(path)
        assert list(loaded) == list(state)
        for key, value in state.items():
            if isinstance(value, np.ndarray):
                assert loaded[key].dtype == value.dtype
                np.testing.assert_array_equal(loaded[key], value)
            else:
                assert type(loaded[key]) is type(value)
                assert loaded[key] == value
    assert templates[1] is templates[0], "an unchanged layout and tree reuse the template"
    assert all(a is not b for a, b in itertools.pairwise(templates[1:]))


def test_templates_of_other_trees_on_one_layout_render_their_own_headers() -> None:
    # A layout's header parts are made once and shared by every tree laid out with it
    # (a step counter in the state changes the tree at every snapshot, not the layout).
    layout = fmt.Layout.plan({"w": np.zeros(3), "b": np.zeros(2, np.float32)})
    created = datetime(2031, 1, 1, tzinfo=UTC)
    for step in (1, 2, 10**30):
        structure = {"d": [["w", {"a": "w"}], ["b", {"a": "b"}], ["step", step]]}
        template = fmt.Template(layout, structure, "i")
        meta = fmt.Meta(name="r", version=step % 7, step=None, created=created, structure=structure)
        digests = {name: f"{i:032x}" for i, name in enumerate(layout.names)}

        rendered = template.render(meta, [digests[name] for name in layout.names])

        assert rendered == reference_header(layout, meta, digests)
        assert template.length(meta) == len(rendered)


@pytest.mark.parametrize("limit", [1, 100, 4096, 1 << 20])
def test_runs_within_a_limit_tile_the_tensors_one_dtype_each(limit: int) -> None:
    dtypes = ("float32", "int32", "float64", "bool")
    arrays = {f"a{i}": np.zeros(7 * (i % 13) + 1, dtype=dtypes[i % 4]) for i in range(300)}
    arrays["big"] = np.zeros(300_000, dtype=np.float64)
    layout = fmt.Layout.plan(arrays)
    pieces = layout.runs_within(limit)
    assert [p.first for p in pieces] == [0, *(p.last for p in pieces[:-1])]
    assert pieces[-1].last == len(layout.tensors)
    for piece in pieces:
        members = layout.tensors[piece.first : piece.last]
        assert {t.dtype for t in members} == {piece.dtype}
        assert (piece.begin, piece.end) == (members[0].begin, members[-1].end)
        assert piece.end - piece.begin <= limit or len(members) == 1
    assert layout.runs_within(limit) is pieces, "computed once per limit"

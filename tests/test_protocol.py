"""The wire protocol, sans I/O: messages <-> frames, checked against documented bytes.

h11 style: one table of (message, documented JSON) is checked in both directions, then
streaming (byte at a time, several frames per feed, end of stream), then a table of
inputs every decoder must reject, then what the encoder must refuse, then hypothesis.

The frames here are built with this file's own ``struct`` layout and JSON text, never
with the module's helpers, so the tests pin docs/PROTOCOL.md rather than the code.
Nothing here opens a socket.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotd import protocol
from snapshotd.errors import LocalProtocolError, RemoteProtocolError
from snapshotd.protocol import (
    MAX_BODY,
    MAX_TENSORS,
    NEED_DATA,
    Command,
    Decoder,
    Done,
    Filled,
    Hello,
    Message,
    Push,
    PushDone,
    Reply,
    Skipped,
    SnapshotRequest,
    StateReady,
    TensorEntry,
    TensorTable,
    check_arena,
    encode,
)

Document = dict[str, Any]

#: docs/PROTOCOL.md: magic, u16 version, u16 flags, u32 body length, all little-endian.
HEADER = struct.Struct("<4sHHI")
#: The dtypes that may cross the wire and their item sizes (docs/PROTOCOL.md).
ITEMSIZE = {
    "bool": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
}


def frame(
    body: bytes | str,
    *,
    magic: bytes = b"SNPD",
    version: int = 3,
    flags: int = 0,
    length: int | None = None,
) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    return HEADER.pack(magic, version, flags, len(data) if length is None else length) + data


def doc_frame(document: Document) -> bytes:
    return frame(json.dumps(document, separators=(",", ":")))


def drain(decoder: Decoder) -> list[Message]:
    """Every message the decoder can return now."""
    out: list[Message] = []
    while True:
        message = decoder.next()
        if not isinstance(message, Message):
            assert message is NEED_DATA
            return out
        out.append(message)


def decode_one(data: bytes) -> Message:
    decoder = Decoder()
    decoder.feed(data)
    messages = drain(decoder)
    assert len(messages) == 1
    assert decoder.pending == 0
    return messages[0]


# -- the table: messages and their documented JSON ---------------------------------

MODEL_TABLE = TensorTable(
    (
        TensorEntry("b", "float64", (10,), 0, 80),
        TensorEntry("W", "float32", (784, 10), 80, 31440),
    ),
    31440,
)
MODEL_TENSORS = '[["b","float64",[10],0,80],["W","float32",[784,10],80,31440]]'
MODEL_STRUCTURE: Any = {
    "d": [
        ["W", {"a": "W"}],
        ["b", {"a": "b"}],
        ["lr", {"f": "0.01"}],
        ["epoch", 3],
        ["tag", "run-1"],
        ["frozen", False],
        ["best", None],
    ]
}
MODEL_STRUCTURE_JSON = (
    '{"d":[["W",{"a":"W"}],["b",{"a":"b"}],["lr",{"f":"0.01"}],["epoch",3],'
    '["tag","run-1"],["frozen",false],["best",null]]}'
)
# Entries listed in another order than their offsets; 0-d, empty and 16-byte items.
ODD_TABLE = TensorTable(
    (
        TensorEntry("flag", "bool", (2,), 24, 26),
        TensorEntry("empty", "uint8", (0, 3), 24, 24),
        TensorEntry("z", "complex128", (1,), 8, 24),
        TensorEntry("lr", "float64", (), 0, 8),
    ),
    26,
)
ODD_TENSORS = (
    '[["flag","bool",[2],24,26],["empty","uint8",[0,3],24,24],'
    '["z","complex128",[1],8,24],["lr","float64",[],0,8]]'
)

WIRE_TABLE: list[tuple[str, Message, str]] = [
    (
        "hello-daemon",
        Hello("daemon", "mnist-lr", 4242),
        '{"type":"hello","role":"daemon","name":"mnist-lr","pid":4242}',
    ),
    (
        "hello-experiment",
        Hello("experiment", "mnist-lr", 17),
        '{"type":"hello","role":"experiment","name":"mnist-lr","pid":17}',
    ),
    (
        "hello-cli",
        Hello("cli", "control", 1),
        '{"type":"hello","role":"cli","name":"control","pid":1}',
    ),
    (
        "snapshot",
        SnapshotRequest(7, 60.0),
        '{"type":"snapshot","id":7,"timeout":60.0}',
    ),
    ("snapshot-int-timeout", SnapshotRequest(0, 5), '{"type":"snapshot","id":0,"timeout":5}'),
    (
        "state",
        StateReady(7, 1200, True, MODEL_STRUCTURE, MODEL_TABLE, 1),
        '{"type":"state","id":7,"step":1200,"safe_point":true,"structure":'
        + MODEL_STRUCTURE_JSON
        + ',"description":1,"tensors":'
        + MODEL_TENSORS
        + ',"arena_size":31440}',
    ),
    (
        "state-repeats-its-description",
        StateReady(10, 1300, True, None, None, 1),
        '{"type":"state","id":10,"step":1300,"safe_point":true,"description":1}',
    ),
    (
        "state-no-step-empty",
        StateReady(8, None, False, {"d": []}, TensorTable((), 0), 2),
        '{"type":"state","id":8,"step":null,"safe_point":false,"structure":{"d":[]},'
        '"description":2,"tensors":[],"arena_size":0}',
    ),
    (
        "state-odd-table",
        StateReady(9, -1, True, {"l": [{"a": "lr"}]}, ODD_TABLE, 3),
        '{"type":"state","id":9,"step":-1,"safe_point":true,"structure":{"l":[{"a":"lr"}]},'
        '"description":3,"tensors":' + ODD_TENSORS + ',"arena_size":26}',
    ),
    (
        "state-streamed",
        StateReady(11, 1400, True, None, None, 1, filled=8192),
        '{"type":"state","id":11,"step":1400,"safe_point":true,"description":1,"filled":8192}',
    ),
    ("filled", Filled(11, 31440), '{"type":"filled","id":11,"upto":31440}'),
    (
        "skipped",
        Skipped(7, "no safe point (run.step) came in time"),
        '{"type":"skipped","id":7,"reason":"no safe point (run.step) came in time"}',
    ),
    ("done-version", Done(7, version=42), '{"type":"done","id":7,"version":42,"error":null}'),
    (
        "done-error",
        Done(8, error="disk full"),
        '{"type":"done","id":8,"version":null,"error":"disk full"}',
    ),
    (
        "push",
        Push(3, 42, 1200, MODEL_STRUCTURE, MODEL_TABLE, 60.0),
        '{"type":"push","id":3,"version":42,"step":1200,"structure":'
        + MODEL_STRUCTURE_JSON
        + ',"timeout":60.0,"tensors":'
        + MODEL_TENSORS
        + ',"arena_size":31440}',
    ),
    ("push-done", PushDone(3), '{"type":"push_done","id":3,"error":null}'),
    (
        "push-done-error",
        PushDone(4, "shape differs: W"),
        '{"type":"push_done","id":4,"error":"shape differs: W"}',
    ),
    ("command", Command(1, "store"), '{"type":"command","id":1,"verb":"store","args":{}}'),
    (
        "command-args",
        Command(
            2, "restore", {"name": "mnist-lr", "version": 41, "note": "gr\u00f6\u00dfe \u2713"}
        ),
        '{"type":"command","id":2,"verb":"restore","args":{"name":"mnist-lr","version":41,'
        '"note":"gr\\u00f6\\u00dfe \\u2713"}}',
    ),
    (
        "reply-ok",
        Reply(1, True, "./snapshots"),
        '{"type":"reply","id":1,"ok":true,"result":"./snapshots","error":null,"code":0}',
    ),
    (
        "reply-error",
        Reply(2, False, error="no experiment named 'x' is registered", code=6),
        '{"type":"reply","id":2,"ok":false,"result":null,'
        '"error":"no experiment named \'x\' is registered","code":6}',
    ),
    (
        "reply-structured",
        Reply(3, True, {"experiments": [{"name": "a", "last_version": None}], "pid": 9}),
        '{"type":"reply","id":3,"ok":true,"result":{"experiments":[{"name":"a",'
        '"last_version":null}],"pid":9},"error":null,"code":0}',
    ),
]
WIRE_IDS = [row[0] for row in WIRE_TABLE]


def test_the_table_covers_every_message_type() -> None:
    documented = {type(message) for _name, message, _text in WIRE_TABLE}
    assert documented == set(protocol._TYPES.values())
    assert {cls.TYPE for cls in documented} == {
        "hello",
        "snapshot",
        "state",
        "filled",
        "skipped",
        "done",
        "push",
        "push_done",
        "command",
        "reply",
    }
    assert {cls.TYPE for cls in documented if cls.CARRIES_FD} == {"state", "push"}


@pytest.mark.parametrize(("message", "text"), [row[1:] for row in WIRE_TABLE], ids=WIRE_IDS)
def test_encode_gives_the_documented_frame(message: Message, text: str) -> None:
    data = encode(message)
    magic, version, flags, length = HEADER.unpack_from(data)
    assert (magic, version, flags) == (b"SNPD", 3, 0)
    assert length == len(data) - HEADER.size
    body = data[HEADER.size :]
    assert body.isascii(), "the encoder writes ASCII-only JSON"
    assert json.loads(body) == json.loads(text)


@pytest.mark.parametrize(("message", "text"), [row[1:] for row in WIRE_TABLE], ids=WIRE_IDS)
def test_documented_bytes_decode_to_the_message(message: Message, text: str) -> None:
    decoded = decode_one(frame(text))
    assert type(decoded) is type(message)
    assert decoded == message


@pytest.mark.parametrize("message", [row[1] for row in WIRE_TABLE], ids=WIRE_IDS)
def test_encode_then_decode_gives_the_message(message: Message) -> None:
    assert decode_one(encode(message)) == message


def test_frame_header_bytes_are_pinned() -> None:
    data = encode(Hello("daemon", "a", 1))
    body = b'{"type":"hello","role":"daemon","name":"a","pid":1}'
    assert data[:12] == b"SNPD\x03\x00\x00\x00" + len(body).to_bytes(4, "little")
    assert json.loads(data[12:]) == json.loads(body)


def test_the_documented_example_frame_is_what_is_sent() -> None:
    # docs/PROTOCOL.md shows the daemon's hello byte by byte, for writers of other peers.
    doc = (Path(__file__).parents[1] / "docs" / "PROTOCOL.md").read_text()
    line = next(line for line in doc.splitlines() if line.startswith("53 4E 50 44"))
    header_hex, body = line[: line.index("{")], line[line.index("{") :]
    assert encode(Hello("daemon", "mnist-lr", 4242)) == bytes.fromhex(header_hex) + body.encode()


def test_decoder_accepts_any_key_order_and_whitespace() -> None:
    text = ' {\n "pid": 5 ,\t"name" : "x", "role":"cli" , "type":"hello"}\r\n'
    assert decode_one(frame(text)) == Hello("cli", "x", 5)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"type": "done", "id": 1}, Done(1)),
        ({"type": "push_done", "id": 2}, PushDone(2)),
        ({"type": "command", "id": 3, "verb": "status"}, Command(3, "status")),
        ({"type": "reply", "id": 4, "ok": True}, Reply(4, True)),
    ],
    ids=["done", "push_done", "command", "reply"],
)
def test_optional_fields_take_their_defaults(document: Document, expected: Message) -> None:
    assert decode_one(doc_frame(document)) == expected


def test_wire_dtypes_are_the_documented_ones() -> None:
    assert dict(protocol.DTYPES) == ITEMSIZE
    for name, size in ITEMSIZE.items():
        assert np.dtype(name).itemsize == size


def test_tables_at_the_limits_are_accepted() -> None:
    deep = TensorEntry("deep", "int8", (1,) * protocol.MAX_NDIM, 0, 1)
    zero = TensorEntry("zero", "float64", (0,), 1, 1)
    big = TensorEntry("big", "complex128", (2, 3), 1, 97)
    table = TensorTable((deep, zero, big), 97)
    message = StateReady(1, None, True, None, table)
    assert decode_one(encode(message)) == message


# -- streaming -----------------------------------------------------------------------

ALL_MESSAGES = [row[1] for row in WIRE_TABLE]
STREAM = b"".join(encode(message) for message in ALL_MESSAGES)


def test_byte_at_a_time_gives_the_same_messages() -> None:
    decoder = Decoder()
    got: list[Message] = []
    for i in range(len(STREAM)):
        decoder.feed(STREAM[i : i + 1])
        got.extend(drain(decoder))
    assert got == ALL_MESSAGES
    assert decoder.pending == 0


def test_several_frames_in_one_feed() -> None:
    decoder = Decoder()
    decoder.feed(STREAM)
    assert decoder.pending == len(STREAM)
    assert drain(decoder) == ALL_MESSAGES
    assert decoder.pending == 0
    assert decoder.next() is NEED_DATA


def test_a_message_is_returned_only_when_complete() -> None:
    data = encode(Skipped(1, "late"))
    decoder = Decoder()
    decoder.feed(data[:-1])
    assert decoder.next() is NEED_DATA
    assert decoder.pending == len(data) - 1
    decoder.feed(data[-1:])
    assert decoder.next() == Skipped(1, "late")


def test_close_between_frames_is_clean() -> None:
    decoder = Decoder()
    decoder.feed(encode(Done(1, 2)))
    assert not decoder.eof
    assert decoder.next() == Done(1, 2)
    decoder.feed(b"")
    assert decoder.eof
    assert decoder.next() is NEED_DATA
    assert decoder.next() is NEED_DATA


def test_close_with_messages_buffered_still_delivers_them() -> None:
    decoder = Decoder()
    decoder.feed(encode(Done(1)) + encode(Done(2)))
    decoder.feed(b"")
    assert drain(decoder) == [Done(1), Done(2)]


@pytest.mark.parametrize("cut", [1, 4, 11, 12, 13, -1])
def test_close_inside_a_frame_is_a_protocol_error(cut: int) -> None:
    data = encode(Done(1, 2))
    decoder = Decoder()
    decoder.feed(data[:cut])
    assert decoder.next() is NEED_DATA
    decoder.feed(b"")
    with pytest.raises(RemoteProtocolError, match="closed"):
        decoder.next()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(data[cut:])


# -- what every decoder must reject ---------------------------------------------------

BASES: dict[str, Document] = {
    "hello": {"type": "hello", "role": "daemon", "name": "mnist-lr", "pid": 4242},
    "snapshot": {"type": "snapshot", "id": 7, "timeout": 60.0},
    "state": {
        "type": "state",
        "id": 7,
        "step": 1200,
        "safe_point": True,
        "structure": {"a": "b"},
        "description": 4,
        "tensors": [["b", "float64", [10], 0, 80]],
        "arena_size": 80,
    },
    "skipped": {"type": "skipped", "id": 7, "reason": "late"},
    "done": {"type": "done", "id": 7, "version": 42, "error": None},
    "push": {
        "type": "push",
        "id": 3,
        "version": 42,
        "step": None,
        "structure": {"a": "b"},
        "timeout": 60.0,
        "tensors": [["b", "float64", [10], 0, 80]],
        "arena_size": 80,
    },
    "push_done": {"type": "push_done", "id": 3, "error": None},
    "command": {"type": "command", "id": 1, "verb": "store", "args": {}},
    "reply": {"type": "reply", "id": 1, "ok": True, "result": None, "error": None, "code": 0},
}
OPTIONAL = {
    ("state", "description"),
    ("done", "version"),
    ("done", "error"),
    ("push_done", "error"),
    ("command", "args"),
    ("reply", "result"),
    ("reply", "error"),
    ("reply", "code"),
}
#: Per field, values of the wrong type or out of range.
BAD_VALUES: dict[str, list[Any]] = {
    "id": [True, "7", -1, 1.5, None],
    "pid": [True, "1", 1.5, None],
    "timeout": [0, 0.0, -1, -0.5, True, "60", None, []],
    "safe_point": [1, "true", None],
    "ok": [1, None],
    "role": [1, "root", None],
    "name": [1, None],
    "reason": [1, None],
    "verb": [1, None],
    "version": [True, "1", 1.5],
    "step": [True, "1", 1.5],
    "error": [1, True],
    "args": [[], None, "x"],
    "code": [True, None, "0", 1.5],
    "arena_size": [True, -1, "80", 80.0, None],
    "description": [True, -1, "4", 4.0, None],
}


def with_(kind: str, **changes: Any) -> Document:
    document = dict(BASES[kind])
    document.update(changes)
    return document


def without(kind: str, key: str) -> Document:
    document = dict(BASES[kind])
    del document[key]
    return document


def state_with_table(tensors: Any, arena_size: Any) -> bytes:
    return doc_frame(with_("state", tensors=tensors, arena_size=arena_size))


def _field_rows() -> list[Any]:
    rows: list[Any] = []
    for kind, base in BASES.items():
        for key in base:
            if key != "type" and (kind, key) not in OPTIONAL:
                rows.append(pytest.param(doc_frame(without(kind, key)), id=f"missing-{kind}.{key}"))
        for key in base:
            for i, bad in enumerate(BAD_VALUES.get(key, [])):
                data = doc_frame(with_(kind, **{key: bad}))
                rows.append(pytest.param(data, id=f"bad-{kind}.{key}-{i}-{bad!r}"))
    return rows


def _deep(depth: int) -> bytes:
    return b'{"type":"reply","id":1,"ok":true,"result":' + b"[" * depth + b"]" * depth + b"}"


B80 = ["b", "float64", [10], 0, 80]
REPEAT: Document = {"type": "state", "id": 8, "step": 1300, "safe_point": True, "description": 4}


def without_key(document: Document, key: str) -> Document:
    return {k: v for k, v in document.items() if k != key}


DONE_BODY = b'{"type":"done","id":1}'
REJECTED: list[Any] = [
    # framing (the body is valid: only the header is wrong)
    pytest.param(frame(DONE_BODY, magic=b"SNPX"), id="bad-magic"),
    pytest.param(frame(DONE_BODY, magic=b"snpd"), id="lowercase-magic"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http-request"),
    pytest.param(frame(DONE_BODY, version=0), id="version-0"),
    pytest.param(frame(DONE_BODY, version=2), id="version-2"),
    pytest.param(frame(DONE_BODY, version=4), id="version-4"),
    pytest.param(frame(DONE_BODY, version=0xFFFF), id="version-ffff"),
    pytest.param(frame(DONE_BODY, flags=1), id="flags-1"),
    pytest.param(frame(DONE_BODY, flags=0x8000), id="flags-8000"),
    pytest.param(frame(b"", length=MAX_BODY + 1), id="length-over-limit"),
    pytest.param(frame(b"", length=0xFFFFFFFF), id="length-4GiB"),
    # not JSON
    pytest.param(frame(b""), id="empty-body"),
    pytest.param(frame(b"{"), id="truncated-json"),
    pytest.param(frame(b"\xff\xfe\x00"), id="not-utf8"),
    pytest.param(frame(b'{"type":"done","id":1,}'), id="trailing-comma"),
    pytest.param(frame(b"{'type':'done','id':1}"), id="single-quotes"),
    pytest.param(frame(b'{"type":"done","id":1} x'), id="trailing-garbage"),
    # JSON that is not an object
    pytest.param(frame(b"[]"), id="array"),
    pytest.param(frame(b'"hello"'), id="string"),
    pytest.param(frame(b"1"), id="number"),
    pytest.param(frame(b"null"), id="null"),
    # unknown or missing type
    pytest.param(doc_frame({"id": 1}), id="no-type"),
    pytest.param(doc_frame({"type": "hallo", "id": 1}), id="unknown-type"),
    pytest.param(
        doc_frame({"type": "HELLO", "role": "cli", "name": "x", "pid": 1}), id="type-case"
    ),
    pytest.param(doc_frame({"type": None, "id": 1}), id="type-null"),
    pytest.param(doc_frame({"type": 1, "id": 1}), id="type-int"),
    pytest.param(doc_frame({"type": ["done"], "id": 1}), id="type-list"),
    pytest.param(doc_frame({"type": {"done": 1}, "id": 1}), id="type-object"),
    # unexpected fields
    pytest.param(doc_frame(with_("hello", extra=1)), id="unexpected-hello.extra"),
    pytest.param(doc_frame(with_("snapshot", tensors=[])), id="unexpected-snapshot.tensors"),
    pytest.param(doc_frame(with_("done", TYPE="done")), id="unexpected-done.TYPE"),
    pytest.param(doc_frame(with_("state", table=5)), id="unexpected-state.table"),
    pytest.param(doc_frame(with_("push", table={})), id="unexpected-push.table"),
    *_field_rows(),
    pytest.param(doc_frame(with_("push", version=None)), id="bad-push.version-null"),
    # JSON that the encoder never writes
    pytest.param(frame(b'{"type":"snapshot","id":1,"timeout":Infinity}'), id="timeout-Infinity"),
    pytest.param(frame(b'{"type":"snapshot","id":1,"timeout":NaN}'), id="timeout-NaN"),
    pytest.param(
        frame(b'{"type":"reply","id":1,"ok":true,"result":[NaN,-Infinity]}'), id="result-NaN"
    ),
    pytest.param(frame(_deep(100_000)), id="nested-100000-deep"),
    pytest.param(frame(b'{"type":"done","id":' + b"9" * 5000 + b"}"), id="id-5000-digits"),
    # a state that repeats its description carries its number and nothing else
    pytest.param(doc_frame(REPEAT | {"description": 0}), id="repeat-description-0"),
    pytest.param(doc_frame(without_key(REPEAT, "description")), id="repeat-no-description"),
    pytest.param(doc_frame(REPEAT | {"arena_size": 80}), id="repeat-with-arena_size"),
    pytest.param(doc_frame(REPEAT | {"structure": {"a": "b"}}), id="repeat-with-structure"),
    pytest.param(doc_frame(REPEAT | {"structure": None}), id="repeat-with-structure-null"),
    pytest.param(doc_frame(REPEAT | {"tensors": [B80]}), id="repeat-with-tensors"),
    # tensor tables: entries
    pytest.param(state_with_table({}, 0), id="tensors-object"),
    pytest.param(state_with_table("", 0), id="tensors-string"),
    pytest.param(state_with_table(None, 0), id="tensors-null"),
    pytest.param(state_with_table([{"name": "b"}], 80), id="entry-object"),
    pytest.param(state_with_table([["b", "float64", [10], 0]], 80), id="entry-4-items"),
    pytest.param(state_with_table([[*B80, 0]], 80), id="entry-6-items"),
    pytest.param(state_with_table([["", "float64", [10], 0, 80]], 80), id="name-empty"),
    pytest.param(state_with_table([[5, "float64", [10], 0, 80]], 80), id="name-int"),
    pytest.param(state_with_table([["b", "object", [10], 0, 80]], 80), id="dtype-object"),
    pytest.param(state_with_table([["b", "O", [10], 0, 80]], 80), id="dtype-O"),
    pytest.param(state_with_table([["b", "float128", [5], 0, 80]], 80), id="dtype-float128"),
    pytest.param(state_with_table([["b", "<f8", [10], 0, 80]], 80), id="dtype-typestr"),
    pytest.param(state_with_table([["b", "bfloat16", [40], 0, 80]], 80), id="dtype-bfloat16"),
    pytest.param(state_with_table([["b", "str", [10], 0, 80]], 80), id="dtype-str"),
    pytest.param(state_with_table([["b", None, [10], 0, 80]], 80), id="dtype-null"),
    pytest.param(state_with_table([["b", ["float64"], [10], 0, 80]], 80), id="dtype-list"),
    pytest.param(state_with_table([["b", "int8", [1] * 65, 0, 1]], 1), id="ndim-65"),
    pytest.param(state_with_table([["b", "int8", [-1], 0, 0]], 0), id="dim-negative"),
    pytest.param(state_with_table([["b", "int8", [-2, -3], 0, 6]], 6), id="dims-negative-pair"),
    pytest.param(state_with_table([["b", "int8", [True], 0, 1]], 1), id="dim-bool"),
    pytest.param(state_with_table([["b", "int8", [1.0], 0, 1]], 1), id="dim-float"),
    pytest.param(state_with_table([["b", "int8", "ab", 0, 2]], 2), id="shape-string"),
    pytest.param(state_with_table([["b", "int8", "", 0, 1]], 1), id="shape-empty-string"),
    pytest.param(state_with_table([["b", "int8", {}, 0, 1]], 1), id="shape-object"),
    pytest.param(state_with_table([["b", "int8", 3, 0, 3]], 3), id="shape-int"),
    pytest.param(state_with_table([["b", "float64", [10], 0, 79]], 80), id="end-short"),
    pytest.param(state_with_table([["b", "float64", [10], 0, 81]], 81), id="end-long"),
    pytest.param(state_with_table([["b", "float64", [10], -8, 72]], 72), id="begin-negative"),
    pytest.param(state_with_table([["b", "int8", [1], True, 2]], 2), id="begin-bool"),
    pytest.param(state_with_table([["b", "int8", [1], 0, True]], 1), id="end-bool"),
    pytest.param(state_with_table([["b", "int8", [1], 0.0, 1]], 1), id="begin-float"),
    pytest.param(state_with_table([["b", "int8", [1], "0", 1]], 1), id="begin-string"),
    pytest.param(state_with_table([["b", "int8", [8], 8, 16]], 16), id="first-not-at-0"),
    pytest.param(
        state_with_table([["a", "int8", [8], 0, 8], ["b", "int8", [8], 16, 24]], 24), id="gap"
    ),
    pytest.param(
        state_with_table([["a", "int8", [8], 0, 8], ["b", "int8", [8], 4, 12]], 12), id="overlap"
    ),
    pytest.param(
        state_with_table([["a", "int8", [8], 0, 8], ["b", "int8", [8], 0, 8]], 8),
        id="same-range",
    ),
    pytest.param(
        state_with_table([["a", "int8", [8], 0, 8], ["b", "int8", [0], 9, 9]], 9),
        id="empty-tensor-past-the-end",
    ),
    pytest.param(state_with_table([B80], 81), id="coverage-short-of-arena"),
    pytest.param(state_with_table([B80], 79), id="coverage-past-arena"),
    pytest.param(state_with_table([], 8), id="no-tensors-nonempty-arena"),
    pytest.param(
        state_with_table([["a", "int8", [8], 0, 8], ["a", "int8", [8], 8, 16]], 16),
        id="repeated-names",
    ),
    pytest.param(
        state_with_table([["a", "int8", [0], 0, 0], ["a", "int8", [0], 0, 0]], 0),
        id="repeated-empty-names",
    ),
]


def test_rejection_bases_are_valid() -> None:
    """Each base document decodes, so each row fails only because of its one change."""
    for kind, document in BASES.items():
        assert type(decode_one(doc_frame(document))) is protocol._TYPES[kind]
    repeat = decode_one(doc_frame(REPEAT))
    assert isinstance(repeat, StateReady)
    assert repeat.repeats
    assert repeat.description == 4
    assert repeat.table is None


@pytest.mark.parametrize("data", REJECTED)
def test_decoder_rejects(data: bytes) -> None:
    decoder = Decoder()
    decoder.feed(data)
    with pytest.raises(RemoteProtocolError):
        drain(decoder)
    # The decoder is dead from now on: it refuses more input and repeats the error.
    with pytest.raises(RemoteProtocolError):
        decoder.feed(encode(Done(1)))
    with pytest.raises(RemoteProtocolError):
        decoder.next()


def test_an_error_after_good_frames_keeps_the_good_ones() -> None:
    decoder = Decoder()
    decoder.feed(encode(Done(1)) + frame(b"{}", magic=b"XXXX") + encode(Done(2)))
    assert decoder.next() == Done(1)
    with pytest.raises(RemoteProtocolError, match="magic"):
        decoder.next()
    with pytest.raises(RemoteProtocolError, match="magic"):
        decoder.next()


@pytest.mark.parametrize("length", [1025, 1 << 20, MAX_BODY + 1, 0xFFFFFFFF])
def test_oversized_body_is_rejected_from_the_header_alone(length: int) -> None:
    decoder = Decoder(max_body=1024)
    header = frame(b"", length=length)
    decoder.feed(header[:11])
    assert decoder.next() is NEED_DATA
    decoder.feed(header[11:])
    # 12 bytes buffered, no body byte sent: the decoder must not wait for (or buffer) it.
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.next()
    assert decoder.pending == 12


def test_default_limit_is_max_body() -> None:
    decoder = Decoder()
    decoder.feed(frame(b"", length=MAX_BODY))
    assert decoder.next() is NEED_DATA  # allowed: waits for the body
    decoder = Decoder()
    decoder.feed(frame(b"", length=MAX_BODY + 1))
    with pytest.raises(RemoteProtocolError):
        decoder.next()


def test_a_body_of_exactly_the_limit_is_accepted() -> None:
    text = '{"type":"done","id":1}'
    decoder = Decoder(max_body=64)
    decoder.feed(frame(text.ljust(64)))
    assert decoder.next() == Done(1)
    decoder = Decoder(max_body=64)
    decoder.feed(frame(text.ljust(65)))
    with pytest.raises(RemoteProtocolError):
        decoder.next()


def _zero_size_entries(count: int) -> list[Any]:
    return [[f"t{i}", "bool", [0], 0, 0] for i in range(count)]


def test_tensor_count_limit_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "MAX_TENSORS", 4)
    assert decode_one(state_with_table(_zero_size_entries(4), 0)).TYPE == "state"
    decoder = Decoder()
    decoder.feed(state_with_table(_zero_size_entries(5), 0))
    with pytest.raises(RemoteProtocolError, match="limit"):
        decoder.next()


def test_tensor_count_is_checked_before_entries_are_built() -> None:
    """MAX_TENSORS + 1 entries (a 2 MB body) are refused for their number alone.

    The entries are not even well formed: a decoder that checks the count first (before
    building a million entry objects, which costs seconds and hundreds of MB from a
    message well under MAX_BODY) reports the limit.
    """
    body = (
        b'{"type":"state","id":1,"step":null,"safe_point":true,"structure":null,"tensors":['
        + b"0," * MAX_TENSORS
        + b'0],"arena_size":0}'
    )
    assert len(body) < MAX_BODY
    decoder = Decoder()
    decoder.feed(frame(body))
    with pytest.raises(RemoteProtocolError, match="limit"):
        decoder.next()


@pytest.mark.parametrize(
    ("real_size", "ok"), [(0, False), (31439, False), (31440, True), (1 << 20, True)]
)
def test_check_arena_compares_with_the_real_size(real_size: int, ok: bool) -> None:
    if ok:
        check_arena(MODEL_TABLE, real_size)
    else:
        with pytest.raises(RemoteProtocolError):
            check_arena(MODEL_TABLE, real_size)


def test_empty_table_fits_an_empty_arena() -> None:
    check_arena(TensorTable((), 0), 0)


# -- what the encoder must refuse -------------------------------------------------------


def _circular() -> Any:
    loop: list[Any] = []
    loop.append(loop)
    return loop


ENCODE_REFUSED: list[Any] = [
    pytest.param(lambda: StateReady(1, None, True, {"f": math.nan}, MODEL_TABLE), id="nan"),
    pytest.param(lambda: Push(1, 1, None, [math.inf], MODEL_TABLE, 1.0), id="inf-in-push"),
    pytest.param(lambda: Reply(1, True, -math.inf), id="-inf-result"),
    pytest.param(lambda: Command(1, "x", {"a": object()}), id="not-json"),
    pytest.param(lambda: Command(1, "x", {"a": b"bytes"}), id="bytes"),
    pytest.param(lambda: Command(1, "x", cast(Any, {(1, 2): 3})), id="tuple-key"),
    pytest.param(lambda: Reply(1, True, _circular()), id="circular"),
    pytest.param(lambda: SnapshotRequest(1, math.inf), id="infinite-timeout"),
    # A body over MAX_BODY: one 64 MiB string is cheap enough to build (~0.1 s).
    pytest.param(lambda: Reply(1, True, "x" * MAX_BODY), id="over-max-body"),
]


@pytest.mark.parametrize("build", ENCODE_REFUSED)
def test_encode_refuses(build: Callable[[], Message]) -> None:
    message = build()
    with pytest.raises(LocalProtocolError):
        encode(message)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: SnapshotRequest(-1, 1.0), id="negative-id"),
        pytest.param(lambda: Done(True), id="bool-id"),
        pytest.param(lambda: Skipped(cast(Any, "7"), "late"), id="string-id"),
        pytest.param(lambda: Hello("cli", "x", True), id="bool-pid"),
        pytest.param(lambda: Reply(1, cast(Any, 1)), id="int-ok"),
    ],
)
def test_encode_refuses_what_the_decoder_rejects(build: Callable[[], Message]) -> None:
    """The encoder must not emit a frame that its own decoder refuses (our bug, not theirs)."""
    message = build()
    decoder = Decoder()
    decoder.feed(frame(json.dumps({"type": message.TYPE, **message.body()})))
    with pytest.raises(RemoteProtocolError):
        decoder.next()
    with pytest.raises(LocalProtocolError):
        encode(message)


@pytest.mark.parametrize(
    "build",
    [
        lambda: TensorTable((TensorEntry("a", "int8", (8,), 0, 8),), 9),
        lambda: TensorTable((TensorEntry("a", "int8", (8,), 1, 9),), 9),
        lambda: TensorTable((TensorEntry("a", "int8", (1,), 0, 1),) * 2, 2),
        lambda: TensorEntry("a", "object", (1,), 0, 8),
        lambda: TensorEntry("a", "int8", (-1,), 0, 0),
        lambda: TensorEntry("a", "int8", (2,), 0, 3),
        lambda: TensorEntry("", "int8", (1,), 0, 1),
        lambda: Hello("root", "x", 1),
        lambda: SnapshotRequest(1, 0),
        lambda: Push(1, 1, None, None, TensorTable((), 0), -1.0),
    ],
    ids=[
        "table-short",
        "table-gap",
        "table-repeat",
        "dtype",
        "dim",
        "size",
        "name",
        "role",
        "timeout",
        "push-timeout",
    ],
)
def test_invalid_messages_cannot_be_built(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match=r"."):
        build()


# -- hypothesis ------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
ids = st.integers(0, 2**63 - 1)
ints = st.integers(-(2**63), 2**63 - 1)
optional_ints = st.none() | ints
timeouts = st.floats(min_value=1e-6, max_value=1e9) | st.integers(1, 10**9)
texts = st.text(max_size=24)


@st.composite
def tables(draw: st.DrawFn) -> TensorTable:
    specs = draw(
        st.lists(
            st.tuples(st.sampled_from(sorted(ITEMSIZE)), st.lists(st.integers(0, 4), max_size=3)),
            max_size=5,
        )
    )
    names = draw(
        st.lists(
            st.text(min_size=1, max_size=8), min_size=len(specs), max_size=len(specs), unique=True
        )
    )
    order: Sequence[int] = draw(st.permutations(range(len(specs))))
    spans: dict[int, tuple[int, int]] = {}
    offset = 0
    for i in order:
        dtype, shape = specs[i]
        size = math.prod(shape) * ITEMSIZE[dtype]
        spans[i] = (offset, offset + size)
        offset += size
    entries = tuple(
        TensorEntry(names[i], specs[i][0], tuple(specs[i][1]), *spans[i]) for i in range(len(specs))
    )
    return TensorTable(entries, offset)


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, st.sampled_from(["daemon", "experiment", "cli"]), texts, ints),
    st.builds(SnapshotRequest, ids, timeouts),
    st.builds(StateReady, ids, optional_ints, st.booleans(), json_values, tables()),
    st.builds(Skipped, ids, texts),
    st.builds(Done, ids, optional_ints, st.none() | texts),
    st.builds(Push, ids, ints, optional_ints, json_values, tables(), timeouts),
    st.builds(PushDone, ids, st.none() | texts),
    st.builds(Command, ids, texts, st.dictionaries(texts, json_values, max_size=4)),
    st.builds(Reply, ids, st.booleans(), json_values, st.none() | texts, ints),
)


@settings(deadline=None)
@given(st.lists(messages, min_size=1, max_size=6), st.data())
def test_random_messages_split_anywhere_decode_to_the_same_sequence(
    sent: list[Message], data: st.DataObject
) -> None:
    stream = b"".join(encode(message) for message in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = Decoder()
    got: list[Message] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        if cut > start:  # an empty feed would mean "closed"
            decoder.feed(stream[start:cut])
            got.extend(drain(decoder))
            start = cut
    assert got == sent
    decoder.feed(b"")
    assert decoder.next() is NEED_DATA


@st.composite
def mutated_documents(draw: st.DrawFn) -> bytes:
    """A valid message's JSON with one field replaced, removed or added."""
    document = json.loads(encode(draw(messages))[HEADER.size :])
    key = draw(st.sampled_from(sorted(document)) | st.text(max_size=6))
    action = draw(st.sampled_from(["replace", "delete"]))
    if action == "delete":
        document.pop(key, None)
    else:
        document[key] = draw(json_values)
    return frame(json.dumps(document))


hostile_inputs = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda body: b"SNPD" + body),
    st.binary(max_size=256).map(frame),
    st.builds(
        frame, st.binary(max_size=64), version=st.integers(0, 0xFFFF), flags=st.integers(0, 3)
    ),
    json_values.map(lambda value: frame(json.dumps(value))),
    mutated_documents(),
)


@settings(deadline=None, max_examples=300)
@given(hostile_inputs, st.booleans())
def test_hostile_bytes_only_ever_raise_remote_protocol_error(data: bytes, close: bool) -> None:
    decoder = Decoder(max_body=4096)
    decoder.feed(data)
    try:
        drain(decoder)
        if close:
            decoder.feed(b"")
            drain(decoder)
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            decoder.next()


class _Canary:
    """Unpickling this creates the file at ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("protocol_number", [0, pickle.HIGHEST_PROTOCOL])
def test_a_pickled_body_is_refused_and_never_unpickled(
    tmp_path: Path, protocol_number: int
) -> None:
    # DESIGN §6: nothing read from a peer is ever unpickled. A frame that is valid but
    # for a pickle as its body is a protocol error, and the pickle's payload never runs.
    canary = tmp_path / "canary"
    body = pickle.dumps(_Canary(canary), protocol=protocol_number)
    decoder = Decoder()
    decoder.feed(frame(body))
    with pytest.raises(RemoteProtocolError):
        drain(decoder)
    assert not canary.exists()
    pickle.loads(body)  # the canary itself works: this test can fail
    assert canary.exists()

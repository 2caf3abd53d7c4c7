"""The wire protocol between experiments, the daemon and the command line: sans-I/O.

This module turns messages into bytes and bytes into messages; it has no sockets, no
threads and no clock (h11's design). The callers own the sockets: ``client`` (experiment
side), ``transport`` (the daemon's side of an experiment socket) and the control plane.

Framing (docs/PROTOCOL.md)::

    b"SNPD" | u16 LE protocol version | u16 LE flags (0) | u32 LE body length | JSON body

The body is one JSON object with a ``"type"``. Messages that hand over shared memory
(:class:`StateReady`, :class:`Push`) travel with exactly one file descriptor, passed
with ``SCM_RIGHTS`` on the frame's first byte; the I/O layer pairs it with the message.
Nothing is ever pickled.

Limits are checked before anything is allocated or waited for: the body length before
the body is buffered; the tensor count, dimensions, dtypes and offsets before the daemon
maps the descriptor; and :func:`check_arena` compares the layout with the real size of
the shared memory. A violation raises :class:`RemoteProtocolError` on the receiving side
(drop the peer) and :class:`LocalProtocolError` when we are about to send it (our bug).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from snapshotd import collector
from snapshotd.errors import LocalProtocolError, RemoteProtocolError
from snapshotd.recent import Recent

__all__ = [
    "MAGIC",
    "MAX_BODY",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Command",
    "Decoder",
    "Done",
    "Filled",
    "Hello",
    "Message",
    "Push",
    "PushDone",
    "Reply",
    "Skipped",
    "SnapshotRequest",
    "StateReady",
    "TensorEntry",
    "TensorTable",
    "check_arena",
    "encode",
]

MAGIC = b"SNPD"
#: 3: ``state`` may come before its arena is filled, and ``filled`` says how far it is
#: (PROTOCOL.md, section 9).
PROTOCOL_VERSION = 3
_FRAME = struct.Struct("<4sHHI")
#: Largest JSON body accepted (a 20,000-array state header is about 3 MB).
MAX_BODY = 64 << 20
MAX_TENSORS = 1_000_000
MAX_NDIM = 64
#: Longest timeout a message may carry, in seconds (about 31 years).
MAX_TIMEOUT = 1e9
#: The dtypes that may cross the wire (the store's allow-list, by numpy name).
DTYPES: Mapping[str, int] = {
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


class _Need:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`Decoder.next` when a whole frame has not arrived yet.
NEED_DATA = _Need()


@dataclass(frozen=True)
class TensorEntry:
    """One array in a shared-memory arena: ``[begin, end)`` bytes, C order, little-endian."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("tensor name must be a non-empty string")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not allowed")
        if len(self.shape) > MAX_NDIM or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in self.shape
        ):
            raise ValueError(f"tensor {self.name!r} has an invalid shape {self.shape!r}")
        if self.begin < 0 or self.end - self.begin != math.prod(self.shape) * DTYPES[self.dtype]:
            raise ValueError(f"tensor {self.name!r}: [{self.begin}, {self.end}) does not fit")

    def to_json(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.begin, self.end]

    @classmethod
    def from_json(cls, item: Any) -> TensorEntry:
        if not isinstance(item, list) or len(item) != 5 or not isinstance(item[2], list):
            raise ValueError(
                f"a tensor entry is [name, dtype, [shape], begin, end], not {item!r:.60}"
            )
        name, dtype, shape, begin, end = item
        return cls(name, dtype, tuple(shape), _int(begin), _int(end))


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _check_layout(tensors: Sequence[TensorEntry], arena_size: int) -> None:
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"{len(tensors)} tensors exceed the limit of {MAX_TENSORS}")
    offset = 0
    for tensor in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if tensor.begin != offset:
            raise ValueError(f"tensor {tensor.name!r} leaves a gap or overlaps at {offset}")
        offset = tensor.end
    if offset != arena_size:
        raise ValueError(f"tensors cover {offset} bytes, the arena is {arena_size}")
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError("tensor names repeat")


@dataclass(frozen=True)
class TensorTable:
    """The layout of an arena: validated once on construction, its JSON encoded once.

    An experiment sends the same table with every snapshot until its shapes change, so
    the table is built (and checked, and encoded) once per layout, not per snapshot.
    """

    entries: tuple[TensorEntry, ...]
    size: int

    def __post_init__(self) -> None:
        _check_layout(self.entries, self.size)

    @functools.cached_property
    def json(self) -> str:
        return json.dumps([e.to_json() for e in self.entries], separators=(",", ":"))


def check_arena(table: TensorTable, real_size: int) -> None:
    """Check a layout against the real size of the shared memory it describes.

    Raises:
        RemoteProtocolError: the memory is smaller than the layout claims.
    """
    if real_size < table.size:
        raise RemoteProtocolError(
            f"the shared memory is {real_size} bytes, the message claims {table.size}"
        )


# -- messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """Base of every message; ``TYPE`` is its ``"type"`` on the wire."""

    TYPE: ClassVar[str] = ""
    #: True for messages that carry exactly one file descriptor.
    CARRIES_FD: ClassVar[bool] = False

    def body(self) -> dict[str, Any]:
        """The JSON fields, except the pre-encoded ones of :meth:`raw`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "table"}

    def raw(self) -> dict[str, str]:
        """Fields already encoded as JSON text, spliced in by :func:`encode`."""
        return {}


@dataclass(frozen=True)
class Hello(Message):
    """First message in each direction: who is speaking."""

    TYPE: ClassVar[str] = "hello"
    role: str
    name: str
    pid: int

    def __post_init__(self) -> None:
        if self.role not in ("daemon", "experiment", "cli"):
            raise ValueError(f"unknown role {self.role!r}")


@dataclass(frozen=True)
class SnapshotRequest(Message):
    """Daemon -> experiment: copy your state at the next safe point within ``timeout`` s."""

    TYPE: ClassVar[str] = "snapshot"
    id: int
    timeout: float

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")


@dataclass(frozen=True)
class StateReady(Message):
    """Experiment -> daemon: the state is in the attached shared memory (one fd).

    The structure and the table together are the state's *description*, numbered by the
    experiment (``description``). A description is sent in full the first time on a
    connection and whenever the tree or the layout changes; after that, a ``state``
    that only repeats ``description`` (``table`` None, no structure) means "the same
    as the one you have": the 3 MB description of a 20,000-array state is then neither
    encoded nor parsed nor checked again for every snapshot.

    ``filled`` (bytes from the arena's start) is set when the state is sent before the
    arena is filled: the rest follows in :class:`Filled` messages, so the daemon can
    write the first bytes while the experiment still copies the last. ``None``: all
    of it is there.
    """

    TYPE: ClassVar[str] = "state"
    CARRIES_FD: ClassVar[bool] = True
    id: int
    step: int | None
    safe_point: bool
    structure: Any
    table: TensorTable | None
    description: int = 0
    filled: int | None = None

    def __post_init__(self) -> None:
        if self.table is None and (self.structure is not None or self.description < 1):
            raise ValueError("a repeated description is a number >= 1 and nothing else")
        if self.table is not None and self.filled is not None and self.filled > self.table.size:
            raise ValueError(f"filled {self.filled} is past the arena's {self.table.size} bytes")

    @property
    def repeats(self) -> bool:
        """True when this message refers to the description sent before."""
        return self.table is None

    def body(self) -> dict[str, Any]:
        body = super().body()
        if self.repeats:
            del body["structure"]
        if self.filled is None:
            del body["filled"]
        return body

    def raw(self) -> dict[str, str]:
        return {} if self.table is None else _table_fields(self.table)


@dataclass(frozen=True)
class Filled(Message):
    """Experiment -> daemon: the arena of state ``id`` holds the state up to byte ``upto``.

    Follows a ``state`` that came with ``filled`` set, in increasing ``upto``, until
    ``upto`` is the arena's size. A ``skipped`` with the same id instead withdraws the
    state: the copy failed, and the daemon abandons what it has written of it.
    """

    TYPE: ClassVar[str] = "filled"
    id: int
    upto: int


@dataclass(frozen=True)
class Skipped(Message):
    """Experiment -> daemon: no safe point came in time (or the state could not be copied)."""

    TYPE: ClassVar[str] = "skipped"
    id: int
    reason: str


@dataclass(frozen=True)
class Done(Message):
    """Daemon -> experiment: finished with the shared memory; ``version`` or ``error``."""

    TYPE: ClassVar[str] = "done"
    id: int
    version: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Push(Message):
    """Daemon -> experiment: restore this state at the next safe point (one fd attached)."""

    TYPE: ClassVar[str] = "push"
    CARRIES_FD: ClassVar[bool] = True
    id: int
    version: int
    step: int | None
    structure: Any
    table: TensorTable
    timeout: float

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")
        if not isinstance(self.version, int) or isinstance(self.version, bool):
            raise ValueError("push.version must be a whole number")

    def raw(self) -> dict[str, str]:
        return _table_fields(self.table)


def _table_fields(table: TensorTable) -> dict[str, str]:
    # On the wire a table is two plain fields: "tensors" (a list) and "arena_size".
    return {"tensors": table.json, "arena_size": str(table.size)}


@dataclass(frozen=True)
class PushDone(Message):
    """Experiment -> daemon: the pushed state was applied (or why not)."""

    TYPE: ClassVar[str] = "push_done"
    id: int
    error: str | None = None


@dataclass(frozen=True)
class Command(Message):
    """Control plane request: ``verb`` with JSON ``args`` (CLI or experiment -> daemon)."""

    TYPE: ClassVar[str] = "command"
    id: int
    verb: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply(Message):
    """Control plane answer to the :class:`Command` with the same ``id``."""

    TYPE: ClassVar[str] = "reply"
    id: int
    ok: bool
    result: Any = None
    error: str | None = None
    code: int = 0


_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        SnapshotRequest,
        StateReady,
        Filled,
        Skipped,
        Done,
        Push,
        PushDone,
        Command,
        Reply,
    )
}


def _build(cls: type[Message], body: dict[str, Any]) -> Message:
    names = {f.name for f in fields(cls)}
    if "table" in body:
        raise ValueError("unexpected field 'table'")
    if cls is StateReady and not body.keys() & {"structure", "tensors", "arena_size"}:
        body = {**body, "structure": None, "table": None}  # repeats its description
    elif "table" in names:
        body = dict(body)
        body["table"] = _table_from(body.pop("tensors"), body.pop("arena_size"))
    if not names >= body.keys():
        raise ValueError(f"unexpected fields {sorted(body.keys() - names)}")
    _check_types(cls, body)
    return cls(**body)


def _table_from(tensors: Any, arena_size: Any) -> TensorTable:
    # Check the count before building anything: a million entries cost seconds and memory.
    if not isinstance(tensors, list):
        raise ValueError("tensors must be a list")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"{len(tensors)} tensors exceed the limit of {MAX_TENSORS}")
    size = _int(arena_size)
    # An experiment sends the same table with every snapshot until its shapes change:
    # comparing the decoded lists (in C) is far cheaper than validating 20,000 entries
    # again, and the same table object lets the receiver reuse what it derived from it.
    known = _recent_tables.get(size)
    if known is not None and known[0] == tensors:
        return known[1]
    table = TensorTable(tuple(TensorEntry.from_json(t) for t in tensors), size)
    _recent_tables.put(size, (tensors, table))
    return table


#: arena size -> (the decoded "tensors" list, its validated table), the latest few.
_recent_tables: Recent[int, tuple[list[Any], TensorTable]] = Recent(64)


_SCALAR_CHECKS: dict[str, Callable[[Any], bool]] = {
    "id": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "description": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "pid": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "version": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    "step": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
    "arena_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "upto": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    # Absent when the arena is filled whole; never null on the wire.
    "filled": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "timeout": lambda v: (
        isinstance(v, int | float) and not isinstance(v, bool) and v <= MAX_TIMEOUT
    ),
    "safe_point": lambda v: isinstance(v, bool),
    "ok": lambda v: isinstance(v, bool),
    "role": lambda v: isinstance(v, str),
    "name": lambda v: isinstance(v, str),
    "reason": lambda v: isinstance(v, str),
    "verb": lambda v: isinstance(v, str),
    "error": lambda v: v is None or isinstance(v, str),
    "args": lambda v: isinstance(v, dict),
    "code": lambda v: isinstance(v, int) and not isinstance(v, bool),
}


def _check_types(cls: type[Message], body: Mapping[str, Any]) -> None:
    for key, value in body.items():
        check = _SCALAR_CHECKS.get(key)
        if check is not None and not check(value):
            raise ValueError(f"{cls.TYPE}.{key} has a bad value {value!r:.60}")


# -- bytes <-> messages --------------------------------------------------------------


def encode(message: Message) -> bytes:
    """One frame for ``message``.

    Raises:
        LocalProtocolError: the message cannot be encoded within the limits.
    """
    try:
        text = json.dumps(
            {"type": message.TYPE, **message.body()},
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {message.TYPE}: {exc}") from exc
    try:
        _check_types(type(message), message.body())
    except ValueError as exc:
        raise LocalProtocolError(str(exc)) from exc
    raw = message.raw()
    if raw:
        text = text[:-1] + "".join(f',"{key}":{value}' for key, value in raw.items()) + "}"
    body = text.encode()
    if len(body) > MAX_BODY:
        raise LocalProtocolError(f"{message.TYPE} body of {len(body)} bytes exceeds {MAX_BODY}")
    return _FRAME.pack(MAGIC, PROTOCOL_VERSION, 0, len(body)) + body


class Decoder:
    """Bytes in, messages out. After a protocol error it refuses further input.

    Feed what arrived with :meth:`feed`, then call :meth:`next` until it returns
    :data:`NEED_DATA`. ``feed(b"")`` means the peer closed the connection: a frame cut
    short is then a :class:`RemoteProtocolError`; a clean close between frames is not.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._buffer = bytearray()
        self._max_body = max_body
        self._closed = False
        self._failed: RemoteProtocolError | None = None

    @property
    def eof(self) -> bool:
        """``feed(b"")`` was called: the peer closed its side."""
        return self._closed

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        if not data:
            self._closed = True
        self._buffer += data

    def next(self) -> Message | _Need:
        """The next complete message, or :data:`NEED_DATA`."""
        if self._failed is not None:
            raise self._failed
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._failed = exc
            raise

    def _next(self) -> Message | _Need:
        if len(self._buffer) < _FRAME.size:
            return self._need()
        length = self._frame_length()
        if len(self._buffer) < _FRAME.size + length:
            return self._need()
        body = bytes(self._buffer[_FRAME.size : _FRAME.size + length])
        del self._buffer[: _FRAME.size + length]
        return _parse_body(body)

    def _need(self) -> _Need:
        if self._closed and self._buffer:
            raise RemoteProtocolError(
                f"connection closed inside a frame ({len(self._buffer)} bytes)"
            )
        return NEED_DATA

    def _frame_length(self) -> int:
        magic, version, flags, length = _FRAME.unpack_from(self._buffer)
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad magic {bytes(magic)!r}: not a snapshotd peer")
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})"
            )
        if flags != 0:
            raise RemoteProtocolError(f"unknown frame flags {flags:#x}")
        if length > self._max_body:
            raise RemoteProtocolError(f"frame body of {length} bytes exceeds {self._max_body}")
        return int(length)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key is repeated")
    return document


#: A body this long makes enough objects to be worth holding the collector off for (a
#: full description of many arrays). Smaller ones are not: the collector's switch is the
#: whole process's, and an experiment's service thread decodes them while the user's
#: own code runs.
_MANY_NODES = 64 << 10


def _parse_body(body: bytes) -> Message:
    try:
        # UTF-8 only (json.loads would also take UTF-16/32 bytes); no NaN or Infinity;
        # no repeated keys (JSON says the last one wins, which hides mistakes).
        with collector.paused() if len(body) >= _MANY_NODES else contextlib.nullcontext():
            document = json.loads(
                body.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_keys
            )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise RemoteProtocolError(f"frame body is not JSON: {exc}") from exc
    kind = document.get("type") if isinstance(document, dict) else None
    if not isinstance(kind, str) or kind not in _TYPES:
        raise RemoteProtocolError(f"unknown message {str(document)[:80]!r}")
    cls = _TYPES[document.pop("type")]
    try:
        return _build(cls, document)
    except (TypeError, ValueError, KeyError) as exc:
        raise RemoteProtocolError(f"malformed {cls.TYPE} message: {exc}") from exc

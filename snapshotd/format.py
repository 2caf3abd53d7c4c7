"""The snapshot file format: the safetensors layout plus snapshotd's metadata and digests.

A snapshot file is, byte for byte, a safetensors file (docs/FORMAT.md has the full
description, enough to write a reader in another language)::

    u64 little-endian N | N bytes of JSON header, space-padded | data section

- The header maps each tensor name to ``dtype``, ``shape`` and ``data_offsets`` (relative
  to the data section) and holds ``__metadata__`` (str -> str) with our fields, all under
  the ``snapshotd.`` prefix.
- Padding puts the data section on a 64-byte boundary; tensors are ordered by item size,
  largest first, so every tensor is naturally aligned; they are contiguous and the file
  ends exactly at the last one (safetensors readers reject gaps and trailing bytes).
- ``complex128`` has no safetensors dtype: it is stored as ``F64`` with a trailing
  dimension of 2 and its real dtype is recorded in ``snapshotd.dtypes``.
- Every tensor has an xxh3-128 digest; the header has one too, computed over the whole
  header region with the digest's own 32 hex digits replaced by zeros. So every byte of
  the file is covered: the length prefix and the header by the header digest, the data
  by the tensor digests, the file size by the layout.

This module is pure: it plans layouts, encodes and decodes headers and computes digests
over buffers it is given. Reading and writing files is the store's job.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import operator
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import numpy as np
import xxhash

from snapshotd.errors import SnapshotCorrupt
from snapshotd.recent import Recent
from snapshotd.tree import Structure, check_structure, refers_to_exactly, same_tree

__all__ = [
    "DIGEST_ALGORITHM",
    "FORMAT",
    "Digester",
    "Header",
    "Layout",
    "Meta",
    "Template",
    "Tensor",
    "decode_header",
    "digest",
    "digester",
    "header_length",
]

FORMAT = "snapshotd/1"
DIGEST_ALGORITHM = "xxh3-128"
ALIGN = 64
#: Refuse headers longer than this before allocating for them (safetensors uses 100 MB too).
MAX_HEADER_BYTES = 100_000_000
MAX_NDIM = 64
_PREFIX = "snapshotd."
_HEADER_DIGEST_KEY = _PREFIX + "header_digest"
_ZERO_DIGEST = "0" * 32
_DIGEST_FIELD = f'"{_HEADER_DIGEST_KEY}":"'.encode()

_SAFETENSORS_DTYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
}
_FROM_SAFETENSORS = {
    code: np.dtype(name).newbyteorder("<") for name, code in _SAFETENSORS_DTYPES.items()
}
#: Logical dtypes stored as another safetensors dtype with a trailing dimension of 2.
_AS_PAIRS = {"complex128": "F64"}


#: xxh3-128 of a bytes-like object (any contiguous buffer), as 32 hex digits. The C
#: function itself, not a wrapper: a state of 20,000 arrays calls it 20,000 times.
digest: Callable[[Any], str] = xxhash.xxh3_128_hexdigest


def digester() -> Digester:
    """A streaming :func:`digest`: ``update`` with the pieces in order, then ``hexdigest``."""
    return xxhash.xxh3_128()


class Digester(Protocol):
    def update(self, buffer: Any, /) -> None: ...
    def hexdigest(self) -> str: ...


class Tensor(NamedTuple):
    """One tensor of a layout: its logical dtype and shape and where its bytes lie.

    ``begin``/``end`` are offsets into the data section. A named tuple rather than a
    frozen dataclass: reading the header of a 20,000-array state makes 20,000 of them,
    and a tuple is made in half the time.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def stored(self) -> tuple[str, list[int]]:
        """The safetensors ``dtype`` code and ``shape`` this tensor is written with."""
        code, paired = _code(self.dtype)
        return code, [*self.shape, 2] if paired else list(self.shape)


@dataclass(frozen=True, slots=True)
class DtypeRun:
    """Consecutive tensors of one dtype: ``[begin, end)`` of the data section holds them
    back to back, so they can be copied there in one call."""

    dtype: np.dtype[Any]
    begin: int
    end: int
    #: The tensors' indexes in the layout: ``first`` to ``last - 1``.
    first: int
    last: int


@functools.lru_cache(maxsize=64)
def _code(dtype: np.dtype[Any]) -> tuple[str, bool]:
    """safetensors code of a dtype, and whether it is stored as pairs (cached: ``dtype.name``
    is slow and a state may hold tens of thousands of arrays)."""
    name = dtype.name
    if name in _AS_PAIRS:
        return _AS_PAIRS[name], True
    return _SAFETENSORS_DTYPES[name], False


@functools.lru_cache(maxsize=64)
def _little(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder("<")


@dataclass(frozen=True)
class Layout:
    """Where every tensor lies in the data section; computed once per set of shapes."""

    tensors: tuple[Tensor, ...]
    data_size: int
    #: The planned arrays' names, shapes and dtypes in their own order, for a cheap
    #: :meth:`matches` (None for a layout read from a file or a message).
    source: tuple[tuple[str, ...], list[tuple[int, ...]], list[np.dtype[Any]]] | None = field(
        default=None, compare=False, repr=False
    )

    @classmethod
    def plan(cls, arrays: Mapping[str, np.ndarray[Any, Any]]) -> Layout:
        """Order tensors by item size (largest first, tree order within) and lay them out."""
        order = sorted(arrays.items(), key=lambda item: -_alignment(item[1].dtype))
        tensors, offset = [], 0
        for name, array in order:
            nbytes = array.nbytes
            tensors.append(Tensor(name, _little(array.dtype), array.shape, offset, offset + nbytes))
            offset += nbytes
        return cls(tuple(tensors), offset, _signature(arrays))

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """Tensor names in layout order."""
        return tuple(t.name for t in self.tensors)

    @functools.cached_property
    def runs(self) -> tuple[DtypeRun, ...]:
        """Maximal stretches of consecutive tensors with one dtype, in layout order."""
        runs, first = [], 0
        for dtype, group in itertools.groupby(self.tensors, key=lambda t: t.dtype):
            members = list(group)
            last = first + len(members)
            runs.append(DtypeRun(dtype, members[0].begin, members[-1].end, first, last))
            first = last
        return tuple(runs)

    def runs_within(self, limit: int) -> tuple[DtypeRun, ...]:
        """:attr:`runs` cut where the :meth:`groups` of ``limit`` start too: pieces of
        one dtype and at most ``limit`` bytes, or a tensor bigger than ``limit`` on its
        own (computed once per limit)."""
        known = self._cut_runs.get(limit)
        if known is None:
            starts = {begin for begin, _end in self.groups(limit)} | {r.first for r in self.runs}
            bounds = [*sorted(starts), len(self.tensors)]
            known = self._cut_runs[limit] = tuple(
                DtypeRun(
                    self.tensors[first].dtype,
                    self.tensors[first].begin,
                    self.tensors[last - 1].end,
                    first,
                    last,
                )
                for first, last in itertools.pairwise(bounds)
            )
        return known

    @functools.cached_property
    def _cut_runs(self) -> dict[int, tuple[DtypeRun, ...]]:
        return {}

    def groups(self, limit: int) -> tuple[tuple[int, int], ...]:
        """Index ranges ``[begin, end)`` of consecutive tensors of at most ``limit`` bytes
        together; a tensor bigger than ``limit`` is a group of its own (computed once per
        limit)."""
        known = self._groups.get(limit)
        if known is None:
            known = self._groups[limit] = self._plan_groups(limit)
        return known

    @functools.cached_property
    def _groups(self) -> dict[int, tuple[tuple[int, int], ...]]:
        return {}

    def _plan_groups(self, limit: int) -> tuple[tuple[int, int], ...]:
        groups, begin, total = [], 0, 0
        for index, size in enumerate(self.sizes):
            if index > begin and total + size > limit:
                groups.append((begin, index))
                begin, total = index, 0
            total += size
        if begin < len(self.sizes):
            groups.append((begin, len(self.sizes)))
        return tuple(groups)

    @functools.cached_property
    def slices(self) -> tuple[slice, ...]:
        """Each tensor's ``slice`` of the data section, in layout order."""
        return tuple(slice(t.begin, t.end) for t in self.tensors)

    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        """Each tensor's byte size, in layout order."""
        return tuple(t.end - t.begin for t in self.tensors)

    @functools.cached_property
    def entries_json(self) -> str:
        """The header's tensor entries as JSON members (``"name":{...},...``), built once."""
        members = []
        for tensor in self.tensors:
            code, shape = tensor.stored()
            dims = ",".join(map(str, shape))
            members.append(
                f'{_literal(tensor.name)}:{{"dtype":"{code}","shape":[{dims}],'
                f'"data_offsets":[{tensor.begin},{tensor.end}]}}'
            )
        return ",".join(members)

    @functools.cached_property
    def header_parts(self) -> HeaderParts:
        """The parts of a header that depend on this layout alone (see ``Template``)."""
        return HeaderParts.of(self)

    def views(self, buffer: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
        """Typed views of ``buffer`` (uint8, the data section) per tensor; no copy."""
        # One constructor call per tensor (slice, view and reshape were three).
        return {
            t.name: np.ndarray(t.shape, t.dtype, buffer=buffer, offset=t.begin)
            for t in self.tensors
        }

    def matches(self, arrays: Mapping[str, np.ndarray[Any, Any]]) -> bool:
        """True when ``arrays`` has exactly these names, dtypes and shapes."""
        if self.source is not None:
            # Same names in the same order, then the same shapes and dtypes: list
            # comparisons instead of a Python loop over every tensor.
            return tuple(arrays) == self.source[0] and self.accepts(list(arrays.values()))
        return self.ordered(arrays) is not None

    def ordered(
        self, arrays: Mapping[str, np.ndarray[Any, Any]]
    ) -> list[np.ndarray[Any, Any]] | None:
        """``arrays`` in layout order when they have exactly these names, dtypes and
        shapes, else None."""
        if len(arrays) != len(self.tensors):
            return None
        try:
            ordered = [arrays[name] for name in self.names]
        except KeyError:
            return None
        shapes, dtypes = self._shapes_and_dtypes
        if [a.shape for a in ordered] != shapes or [_little(a.dtype) for a in ordered] != dtypes:
            return None
        return ordered

    @functools.cached_property
    def _shapes_and_dtypes(self) -> tuple[list[tuple[int, ...]], list[np.dtype[Any]]]:
        return [t.shape for t in self.tensors], [t.dtype for t in self.tensors]

    def accepts(self, leaves: Sequence[np.ndarray[Any, Any]]) -> bool:
        """True when ``leaves``, the arrays of a tree that names its tensors as the one
        planned (see ``tree.Skeleton``), in its order, have the planned shapes and dtypes."""
        if self.source is None:
            return False
        _, shapes, dtypes = self.source
        return (
            len(leaves) == len(shapes)
            and [a.shape for a in leaves] == shapes
            and [a.dtype for a in leaves] == dtypes
        )

    def in_order(self, leaves: Sequence[np.ndarray[Any, Any]]) -> Sequence[np.ndarray[Any, Any]]:
        """The planned arrays (``leaves``, in their own order) in layout order."""
        if self._from_source is None:
            return leaves
        return operator.itemgetter(*self._from_source)(leaves)  # type: ignore[no-any-return]

    @functools.cached_property
    def _from_source(self) -> tuple[int, ...] | None:
        """Where each tensor of the layout is in the planned arrays' order (None: the
        same order, as for a state of one dtype)."""
        if self.source is None:
            raise ValueError("a layout read back from a file has no planned order")
        position = {name: index for index, name in enumerate(self.source[0])}
        order = tuple(position[name] for name in self.names)
        return None if order == tuple(range(len(order))) else order


def _signature(
    arrays: Mapping[str, np.ndarray[Any, Any]],
) -> tuple[tuple[str, ...], list[tuple[int, ...]], list[np.dtype[Any]]]:
    values = arrays.values()
    return tuple(arrays), [a.shape for a in values], [a.dtype for a in values]


def _alignment(dtype: np.dtype[Any]) -> int:
    # complex128 is stored as pairs of float64: 8-byte alignment is all it needs.
    return min(dtype.itemsize, 8)


@dataclass(frozen=True, kw_only=True)
class Meta:
    """What a snapshot says about itself, besides its tensors."""

    name: str
    version: int
    step: int | None
    created: datetime
    structure: Structure
    safe_point: bool | None = None
    user: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.created.tzinfo is None:
            raise ValueError("Meta.created must be timezone-aware")


@dataclass(frozen=True)
class Header:
    """A decoded, validated header."""

    layout: Layout
    meta: Meta
    digests: Mapping[str, str]
    data_start: int

    @property
    def file_size(self) -> int:
        return self.data_start + self.layout.data_size

    @property
    def ordered_digests(self) -> list[str]:
        """The digests in the layout's order, to compare with those found in one list
        comparison (or a slice of one)."""
        return [self.digests[name] for name in self.layout.names]


class Template:
    """A header with its per-snapshot fields left open, prepared once per layout and tree.

    An experiment's state usually keeps its shapes and its tree from one snapshot to the
    next, and for a state of many small arrays the tree, the tensor entries and the names
    in the digest map are most of the header (3 MB for 20,000 arrays). They are escaped
    and joined once here; :meth:`render` then only fills in the name, version, step, time,
    safe point, user metadata and the digests. The bytes are exactly those of encoding
    the documented JSON object with :func:`json.dumps` (compact, ASCII), tested so.
    """

    __slots__ = (
        "_closing",
        "_digest_keys",
        "_dtypes",
        "_fixed_length",
        "_tree",
        "kinds",
        "layout",
        "structure",
    )

    def __init__(self, layout: Layout, structure: Structure, kinds: str | None = None) -> None:
        self.layout = layout
        self.structure = structure
        self.kinds = kinds
        self._tree = _literal(_compact(structure)).encode()
        # The parts that depend on the layout alone are the layout's (made once per
        # layout): a tree that changes under the same shapes, a step counter in the
        # state, costs only its own JSON.
        parts = layout.header_parts
        self._dtypes = parts.dtypes
        self._digest_keys = parts.digest_keys
        self._closing = parts.closing
        self._fixed_length = (
            len(self._tree) + len(_MIDDLE) + parts.digests_length + 32 + len(parts.closing)
        )

    def fits(self, layout: Layout, structure: Structure, kinds: str | None) -> bool:
        """True when this template describes ``layout`` and ``structure``.

        The layout must be the same object (layouts are reused while the shapes stay);
        the structure the same tree (:func:`snapshotd.tree.same_tree`).
        """
        return layout is self.layout and same_tree(self.structure, self.kinds, structure, kinds)

    def length(self, meta: Meta) -> int:
        """The length of the header region :meth:`render` gives for ``meta`` (any digests)."""
        head, tail = self._around(meta)
        return _region_length(len(head) + self._fixed_length + len(tail))

    def render(self, meta: Meta, digests: Sequence[str]) -> bytes:
        """The complete header region: length prefix, JSON, padding to the 64-byte boundary.

        ``digests`` are the tensors' digests in layout order; ``meta.structure`` must be
        this template's structure.
        """
        if meta.structure is not self.structure:
            raise ValueError("the header's structure is not the template's")
        if len(digests) != len(self._digest_keys):
            raise ValueError(f"{len(digests)} digests for {len(self._digest_keys)} tensors")
        head, tail = self._around(meta)
        parts = [
            b"",  # the length prefix, below
            head,
            self._tree,
            _MIDDLE,
            self._digests(digests).encode("ascii"),
            tail,
            _ZERO_DIGEST.encode(),  # the header digest: zeros while it is computed
            self._closing,
        ]
        text = sum(map(len, parts))
        region = _region_length(text)
        parts[0] = struct.pack("<Q", region - 8)
        parts.append(b" " * (region - 8 - text))
        # The header digest is computed over the parts, then put in place of its zeros:
        # the 3 MB header of 20,000 arrays is then joined once, with no copy in between.
        stream = digester()
        for part in parts:
            stream.update(part)
        parts[6] = stream.hexdigest().encode()
        return b"".join(parts)

    def _around(self, meta: Meta) -> tuple[bytes, bytes]:
        """The metadata before the tree, and from the digests' end to the header digest."""
        fields = (
            ("format", _literal(FORMAT)),
            ("name", _literal(meta.name)),
            ("version", _literal(str(meta.version))),
            ("step", _literal("" if meta.step is None else str(meta.step))),
            ("created", _literal(_timestamp(meta.created))),
            ("safe_point", _literal({None: "", True: "true", False: "false"}[meta.safe_point])),
        )
        head = ",".join(f'"{_PREFIX}{key}":{value}' for key, value in fields)
        user = _literal(_compact(dict(meta.user)))
        tail = (
            f',"{_PREFIX}dtypes":{self._dtypes},"{_PREFIX}user":{user},"{_PREFIX}header_digest":"'
        )
        return f'{{"__metadata__":{{{head},"{_PREFIX}tree":'.encode(), tail.encode()

    def _digests(self, digests: Sequence[str]) -> str:
        if not digests:
            return _EMPTY_DIGESTS
        # Digests are hex digits: nothing in them needs escaping.
        parts = itertools.chain.from_iterable(zip(self._digest_keys, digests, strict=True))
        return '"' + "".join(parts) + _DIGESTS_END


def _region_length(text: int) -> int:
    """The header region's size for a JSON text of ``text`` bytes: prefix plus padding."""
    return 8 + text + (-(8 + text) % ALIGN)


def _timestamp(created: datetime) -> str:
    return created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _literal(text: str) -> str:
    """``text`` as a JSON string literal (ASCII, as every string of the header).

    Exactly what ``json.dumps(text, ensure_ascii=True)`` gives. Printable ASCII, the
    usual tensor name, needs only ``\\`` and ``"`` escaped, done here without the
    encoder's call overhead: a header of 20,000 tensors escapes 60,000 such strings.
    """
    if text.isascii() and text.isprintable():
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return json.dumps(text, ensure_ascii=True)


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


_MIDDLE = f',"{_PREFIX}digest":{_literal(DIGEST_ALGORITHM)},"{_PREFIX}digests":'.encode()
#: The digest map {"name":"digest",...} is a JSON text inside a JSON string.
_EMPTY_DIGESTS = _literal("{}")
_DIGESTS_END = _literal('"}')[1:-1] + '"'


@dataclass(frozen=True)
class HeaderParts:
    """The parts of a header that depend on its layout alone, escaped once per layout."""

    #: Each name's part of the digest map ({"name":" or ","name":"), escaped twice: the
    #: map is a JSON text inside a JSON string.
    digest_keys: tuple[str, ...]
    #: The length of the digest map's string with every digest (32 digits) in it.
    digests_length: int
    #: ``dtypes`` metadata: the logical dtypes stored as pairs.
    dtypes: str
    #: After the header digest's 32 digits: the end of the metadata, then the tensors.
    closing: bytes

    @classmethod
    def of(cls, layout: Layout) -> HeaderParts:
        keys = tuple(
            _literal(("{" if i == 0 else '",') + _literal(name) + ':"')[1:-1]
            for i, name in enumerate(layout.names)
        )
        digests_length = (
            1 + sum(map(len, keys)) + 32 * len(keys) + len(_DIGESTS_END)
            if keys
            else len(_EMPTY_DIGESTS)
        )
        dtypes = _literal(
            _compact({t.name: t.dtype.name for t in layout.tensors if _code(t.dtype)[1]})
        )
        entries = layout.entries_json
        closing = ('"}' + ("," + entries if entries else "") + "}").encode()
        return cls(keys, digests_length, dtypes, closing)


def header_length(prefix: bytes, file_size: int, source: str) -> int:
    """Validate the 8-byte length prefix against the file size and the limit."""
    if len(prefix) < 8:
        raise SnapshotCorrupt(source, f"file is {file_size} bytes, shorter than the 8-byte prefix")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise SnapshotCorrupt(
            source, f"header length {length} exceeds {MAX_HEADER_BYTES}{_what_else(prefix)}"
        )
    if 8 + length > file_size:
        raise SnapshotCorrupt(
            source, f"header length {length} runs past the end of the file{_what_else(prefix)}"
        )
    return int(length)


#: The first bytes of files that are mistaken for snapshots most often.
_OTHER_FORMATS = ((b"PK\x03\x04", "a zip archive (.npz)"), (b"\x93NUMPY", "a .npy file"))


def _what_else(prefix: bytes) -> str:
    """What a file whose length prefix makes no sense is, as far as its first bytes say."""
    for magic, kind in _OTHER_FORMATS:
        if prefix.startswith(magic):
            return f": this is {kind}, not a safetensors file"
    return ": not a safetensors file, or a damaged one"


def decode_header(region: bytes, file_size: int, source: str) -> Header:
    """Parse and validate a header region (prefix included) of a file of ``file_size`` bytes.

    Raises:
        SnapshotCorrupt: any inconsistency, with the reason; never a bare ValueError.
    """
    length = header_length(region, file_size, source)
    region = region[: 8 + length]
    _check_header_digest(region, source)
    try:
        metadata, entries = _split(region[8:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotCorrupt(source, f"header is not JSON: {exc}") from exc
    try:
        header = _build_header(metadata, entries, 8 + length)
    except _NotJSON as exc:
        raise SnapshotCorrupt(source, f"header is not JSON: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotCorrupt(source, f"header is malformed: {exc!r}") from exc
    if header.file_size != file_size:
        raise SnapshotCorrupt(
            source, f"file is {file_size} bytes, the header describes {header.file_size}"
        )
    return header


def _check_header_digest(region: bytes, source: str) -> None:
    if region.count(_DIGEST_FIELD) != 1:
        raise SnapshotCorrupt(source, "header has no single snapshotd.header_digest field")
    at = region.index(_DIGEST_FIELD) + len(_DIGEST_FIELD)
    stored = region[at : at + 32]
    zeroed = region[:at] + _ZERO_DIGEST.encode() + region[at + 32 :]
    if digest(zeroed).encode() != stored:
        raise SnapshotCorrupt(source, "header digest mismatch")


def _split(text: str) -> tuple[Any, str | dict[str, Any]]:
    """The header JSON as its ``__metadata__`` value and the tensor entries.

    A snapshotd writer puts ``__metadata__`` first; then the tensor entries are returned
    as their JSON text, unparsed, so that a layout already built from the same text is
    reused (listing or verifying the versions of a 20,000-array run reads the same 3 MB
    of entries again and again). Any other order is parsed as a whole.
    """
    if text.startswith(_METADATA_FIRST):
        metadata, end = _DECODER.raw_decode(text, len(_METADATA_FIRST))
        entries = text[end:].strip(_JSON_SPACE)
        if entries == "}" or (entries.startswith(",") and entries.endswith("}")):
            return metadata, entries
    document = json.loads(text)  # anything else: parsed whole (and refused if not JSON)
    if not isinstance(document, dict):
        raise TypeError("the header is not a JSON object")
    return document.pop("__metadata__"), document


def _build_header(raw: Any, entries: str | dict[str, Any], data_start: int) -> Header:
    meta = {key.removeprefix(_PREFIX): value for key, value in raw.items()}
    if meta["format"] != FORMAT:
        raise ValueError(f"unknown format {meta['format']!r}")
    if meta["digest"] != DIGEST_ALGORITHM:
        raise ValueError(f"unknown digest algorithm {meta['digest']!r}")
    layout = _layout_of(entries, meta["dtypes"])
    digests: dict[str, str] = json.loads(meta["digests"])
    names = {t.name for t in layout.tensors}
    if set(digests) != names:
        raise ValueError("digests do not name exactly the tensors")
    structure, referred = _tree_of(meta["tree"])
    if not refers_to_exactly(referred, names):
        raise ValueError("the tree does not refer to exactly the tensors")
    return Header(layout, _build_meta(meta, structure), digests, data_start)


def _layout_of(entries: str | dict[str, Any], dtypes: str) -> Layout:
    """The layout the tensor entries describe: built once per distinct text."""
    if isinstance(entries, dict):
        return _build_layout(entries, json.loads(dtypes))
    text = entries

    def build() -> Layout:
        # ``,"name":{...},...}`` after the metadata (or just ``}``): one JSON object.
        try:
            document = json.loads("{" + text[1:]) if text != "}" else {}
        except json.JSONDecodeError as exc:
            raise _NotJSON(str(exc)) from exc
        return _build_layout(document, json.loads(dtypes))

    return _recent_layouts.recall((text, dtypes), build, keep=len(text) <= _CACHED_TEXT_LIMIT)


class _NotJSON(Exception):
    """The header's text is not JSON (found after its metadata was split off)."""


def _tree_of(text: str) -> tuple[Structure, list[str]]:
    """The structure in ``snapshotd.tree`` and the tensor names it refers to, checked:
    parsed once per distinct text (versions of a run usually share their tree)."""

    def build() -> tuple[Structure, list[str]]:
        structure = json.loads(text)
        return structure, check_structure(structure)

    return _recent_trees.recall(text, build, keep=len(text) <= _CACHED_TEXT_LIMIT)


_METADATA_FIRST = '{"__metadata__":'
_JSON_SPACE = " \t\n\r"
_DECODER = json.JSONDecoder()
#: Headers bigger than this (hundreds of thousands of tensors) are parsed every time
#: rather than kept: four of them could hold hundreds of MB.
_CACHED_TEXT_LIMIT = 16 << 20
_recent_layouts: Recent[tuple[str, str], Layout] = Recent(4)
_recent_trees: Recent[str, tuple[Structure, list[str]]] = Recent(4)


def _build_layout(document: Mapping[str, Any], special: Mapping[str, str]) -> Layout:
    tensors = sorted(
        (_build_tensor(name, entry, special.get(name)) for name, entry in document.items()),
        key=_BY_OFFSETS,
    )
    offset = 0
    for tensor in tensors:
        if tensor.begin != offset:
            raise ValueError(f"tensor {tensor.name!r} leaves a gap or overlaps at {offset}")
        offset = tensor.end
    return Layout(tuple(tensors), offset)


_BY_OFFSETS = operator.attrgetter("begin", "end")


def _build_tensor(name: str, entry: Mapping[str, Any], logical: str | None) -> Tensor:
    begin, end = entry["data_offsets"]
    if type(begin) is not int or type(end) is not int:
        raise ValueError(f"tensor {name!r}: data_offsets must be integers")
    shape = tuple(entry["shape"])
    if len(shape) > MAX_NDIM or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"tensor {name!r} has an invalid shape {list(shape)}")
    count = math.prod(shape)
    dtype = _FROM_SAFETENSORS[entry["dtype"]]
    if logical is not None:
        if _AS_PAIRS.get(logical) != entry["dtype"] or not shape or shape[-1] != 2:
            raise ValueError(f"tensor {name!r} cannot be {logical}")
        dtype, shape, count = np.dtype(logical).newbyteorder("<"), shape[:-1], count // 2
    if end - begin != count * dtype.itemsize or begin < 0:
        raise ValueError(f"tensor {name!r}: offsets {begin}..{end} do not fit its shape")
    return Tensor(name, dtype, shape, begin, end)


def _build_meta(meta: Mapping[str, str], structure: Structure) -> Meta:
    return Meta(
        name=meta["name"],
        version=int(meta["version"]),
        step=int(meta["step"]) if meta["step"] else None,
        created=datetime.fromisoformat(meta["created"]),
        structure=structure,
        safe_point={"": None, "true": True, "false": False}[meta["safe_point"]],
        user=json.loads(meta["user"]),
    )

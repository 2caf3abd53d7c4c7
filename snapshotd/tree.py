"""State trees: a user's state as flat, named arrays plus a JSON structure, and back.

A *state tree* is what ``__getstate__`` returns: numpy arrays, nested tuples, lists and
dicts (keys ``str`` or ``int``), and plain scalars (``int``, ``float``, ``str``, ``bool``,
``None``, and numpy scalars). :func:`flatten` splits it into

- ``arrays``: an ordered mapping of tensor name -> contiguous little-endian ndarray
  (a view of the caller's array when no conversion is needed: nothing is copied here), and
- ``structure``: a JSON-able description of the tree whose leaves point at tensor names.

:func:`unflatten` is the inverse. Tensor names are the path inside the tree joined by
``/`` with each key percent-escaped (``opt/m/0``), so another tool reading the file sees
meaningful names; the structure refers to names explicitly, so the naming rule is not
part of the format. This module owns the tree <-> flat mapping and the dtype allow-list,
nothing else: no files, no sockets, no clock.

Structure nodes (see docs/FORMAT.md): ``{"a": name}`` array, ``{"s": name}`` numpy scalar
(stored as a 0-d tensor), ``{"t": [...]}`` tuple, ``{"l": [...]}`` list,
``{"d": [[key, node], ...]}`` dict, ``{"f": repr}`` float (exact, inf included),
``{"fb": 16 hex digits}`` a NaN by its IEEE 754 bits (sign and payload kept), and
JSON ``null``/``true``/``false``/integers/strings for the other scalars.
"""

from __future__ import annotations

import functools
import struct
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from snapshotd.errors import StateError

__all__ = [
    "ALLOWED_KINDS",
    "Flat",
    "Skeleton",
    "check_dtype",
    "check_structure",
    "flatten",
    "refers_to_exactly",
    "same_tree",
    "unflatten",
]

#: numpy dtype kinds we store: bool, signed, unsigned, float, complex.
ALLOWED_KINDS = frozenset("biufc")
#: Names a tensor may not take: safetensors reserves ``__metadata__``.
_RESERVED = frozenset({"__metadata__"})
_MAX_DEPTH = 256
#: Python refuses to print integers of more than 4300 digits (about 14,000 bits).
_MAX_INT_BITS = 14_000
_NATIVE_LITTLE = sys.byteorder == "little"

Structure = Any  # JSON-able: dict | list | str | int | bool | None


@dataclass(frozen=True)
class Flat:
    """A flattened state: named arrays (in tree order) and the structure that joins them.

    ``kinds`` lists the tree's ``bool`` and ``int`` leaves in walk order (``"b"``/``"i"``)
    when the tree was flattened here, else None. Python says ``True == 1``, so two equal
    structures are the same tree only if their kinds are equal too: a cache keyed on an
    equal structure (a header template, a description already sent) must compare both.
    """

    arrays: dict[str, np.ndarray[Any, Any]]
    structure: Structure
    kinds: str | None = None


def same_tree(a: Structure, a_kinds: str | None, b: Structure, b_kinds: str | None) -> bool:
    """True when two structures (with their :attr:`Flat.kinds`) are exactly the same tree.

    The same object always is; equal ones only when both kinds are known and equal.
    Comparing in C costs a fraction of encoding the tree again.
    """
    if a is b:
        return True
    return a_kinds is not None and a_kinds == b_kinds and a == b


def check_dtype(dtype: np.dtype[Any], where: str) -> None:
    """Raise :class:`StateError` unless ``dtype`` is on the allow-list."""
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None:
        raise StateError(where, f"dtype {dtype} is not supported (bool, int, uint, float, complex)")
    if (dtype.kind in "fc" and dtype.itemsize > 16) or (dtype.kind == "f" and dtype.itemsize > 8):
        raise StateError(where, f"dtype {dtype} (extended precision) is not portable; use float64")


def flatten(state: object) -> Flat:
    """Split a state tree into named arrays and a structure.

    Raises:
        StateError: for anything that is not an allowed leaf or container; the message
            names the path, e.g. ``state['opt'][2]: object of type set is not supported``.
    """
    flattener = _Flattener()
    structure = flattener.node(state, (), 0)
    return Flat(flattener.arrays, structure, "".join(flattener.kinds))


def unflatten(structure: Structure, arrays: Mapping[str, np.ndarray[Any, Any]]) -> Any:
    """Rebuild the tree described by ``structure`` from ``arrays``.

    Raises:
        KeyError: a leaf names a tensor that is not in ``arrays``.
        ValueError: the structure is not one this module writes.
    """
    if structure is None or isinstance(structure, bool | int | str):
        return structure
    if isinstance(structure, dict) and len(structure) == 1:
        ((tag, body),) = structure.items()
        return _UNFLATTENERS[tag](body, arrays)
    raise ValueError(f"not a structure node: {structure!r:.80}")


def _unflatten_dict(body: Any, arrays: Mapping[str, np.ndarray[Any, Any]]) -> dict[Any, Any]:
    out = {}
    for key, child in body:
        # The common child, an array leaf, without the general dispatch.
        if type(child) is dict and len(child) == 1 and "a" in child:
            out[key] = arrays[child["a"]]
        else:
            out[key] = unflatten(child, arrays)
    return out


def _unflatten_float_bits(body: Any, arrays: Mapping[str, np.ndarray[Any, Any]]) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(body))[0]
    return value


_UNFLATTENERS: dict[str, Any] = {
    "a": lambda body, arrays: arrays[body],
    "s": lambda body, arrays: arrays[body][()],
    "t": lambda body, arrays: tuple(unflatten(child, arrays) for child in body),
    "l": lambda body, arrays: [unflatten(child, arrays) for child in body],
    "d": _unflatten_dict,
    "f": lambda body, arrays: float(body),
    "fb": _unflatten_float_bits,
}


def check_structure(structure: Structure) -> list[str]:
    """Raise ``ValueError`` unless ``structure`` is one this module writes; return the
    tensor names its leaves refer to, in tree order.

    Used on structures read from files and sockets, before :func:`unflatten` trusts them.
    """
    names: list[str] = []
    _check(structure, 0, names)
    return names


def refers_to_exactly(referred: Sequence[str], names: Collection[str]) -> bool:
    """True when a tree's leaves (``referred``, from :func:`check_structure`) name each of
    the unique ``names`` exactly once."""
    return len(referred) == len(names) and set(referred) == set(names)


def _check(node: Structure, depth: int, names: list[str]) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("structure nested too deeply")
    if node is None or isinstance(node, bool | int | str):
        return
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"not a structure node: {node!r:.60}")
    ((tag, body),) = node.items()
    check = _NODE_CHECKS.get(tag)
    if check is None:
        raise ValueError(f"unknown structure node {tag!r:.20}")
    check(body, depth, names)


def _check_children(body: Any, depth: int, names: list[str]) -> None:
    if not isinstance(body, list):
        raise ValueError("a container node needs a list")
    for child in body:
        _check(child, depth + 1, names)


def _check_items(body: Any, depth: int, names: list[str]) -> None:
    if not isinstance(body, list):
        raise ValueError("a dict node needs a list of [key, node] pairs")
    for item in body:
        if not isinstance(item, list) or len(item) != 2:
            raise ValueError("a dict item must be [key, node]")
        key, child = item
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise ValueError(f"a dict key must be a str or an int, not {key!r:.40}")
        # The common child, an array leaf, checked here: 20,000 of them are usual.
        if type(child) is dict and len(child) == 1 and type(child.get("a")) is str:
            names.append(child["a"])
        else:
            _check(child, depth + 1, names)


def _check_name(body: Any, depth: int, names: list[str]) -> None:
    if not isinstance(body, str):
        raise ValueError("an array node needs a tensor name")
    names.append(body)


def _check_float(body: Any, depth: int, names: list[str]) -> None:
    if not isinstance(body, str):
        raise ValueError("a float node needs text")
    float(body)


def _check_float_bits(body: Any, depth: int, names: list[str]) -> None:
    if not isinstance(body, str) or len(body) != 16:
        raise ValueError("a float-bits node needs 16 hex digits")
    bytes.fromhex(body)


_NODE_CHECKS: dict[str, Any] = {
    "a": _check_name,
    "s": _check_name,
    "t": _check_children,
    "l": _check_children,
    "d": _check_items,
    "f": _check_float,
    "fb": _check_float_bits,
}


class _Flattener:
    """Walks one tree; collects arrays under unique names.

    This walk is on the experiment's critical path (it runs inside ``run.step()``), so
    the common cases are tested first by exact type and the human-readable path for an
    error message is only built when there is an error.
    """

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray[Any, Any]] = {}
        self.kinds: list[str] = []

    def node(self, value: object, trail: tuple[Any, ...], depth: int) -> Structure:
        kind = type(value)
        if kind is np.ndarray:
            return {"a": self.array(value, trail)}  # type: ignore[arg-type]
        if kind is dict:
            return {"d": self.items(value, trail, depth)}  # type: ignore[arg-type]
        if kind is tuple or kind is list:
            tag = "t" if kind is tuple else "l"
            return {tag: self.sequence(value, trail, depth)}  # type: ignore[arg-type]
        return self.other(value, trail, depth)

    def other(self, value: object, trail: tuple[Any, ...], depth: int) -> Structure:
        # numpy scalars first: np.float64 is a subclass of float. bool before int: bool is
        # a subclass of int.
        if isinstance(value, np.generic):
            return {"s": self.array(np.asarray(value), trail)}
        if isinstance(value, np.ndarray):
            return {"a": self.array(value, trail)}
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, bool):
            self.kinds.append("b")
            return value
        if isinstance(value, int):
            if value.bit_length() > _MAX_INT_BITS:
                raise StateError(_where(trail), f"integer of {value.bit_length()} bits is too big")
            self.kinds.append("i")
            return int(value)
        if isinstance(value, float):
            return _float_node(float(value))
        if isinstance(value, tuple | list | dict):
            raise StateError(_where(trail), f"{type(value).__name__} (a subclass) is not supported")
        raise StateError(_where(trail), f"object of type {type(value).__name__} is not supported")

    def sequence(
        self, value: tuple[Any, ...] | list[Any], trail: tuple[Any, ...], depth: int
    ) -> list[Structure]:
        if depth >= _MAX_DEPTH:
            raise StateError(_where(trail), f"nested deeper than {_MAX_DEPTH} levels")
        prefix = _prefix(trail)
        out: list[Structure] = []
        for i, item in enumerate(value):
            name = self.plain_array(item, prefix, i) if type(item) is np.ndarray else None
            out.append({"a": name} if name is not None else self.node(item, (*trail, i), depth + 1))
        return out

    def items(self, value: dict[Any, Any], trail: tuple[Any, ...], depth: int) -> list[list[Any]]:
        if depth >= _MAX_DEPTH:
            raise StateError(_where(trail), f"nested deeper than {_MAX_DEPTH} levels")
        out = []
        prefix = _prefix(trail)
        for key, item in value.items():
            if type(key) is not str and (isinstance(key, bool) or not isinstance(key, str | int)):
                raise StateError(
                    _where((*trail, key)), f"dict key of type {type(key).__name__} (use str or int)"
                )
            # The common leaf (an array that needs no conversion) without the general
            # walk: a state of 20,000 arrays spends most of its flatten time here.
            name = self.plain_array(item, prefix, key) if type(item) is np.ndarray else None
            if name is not None:
                out.append([key, {"a": name}])
            else:
                out.append([key, self.node(item, (*trail, key), depth + 1)])
        return out

    def plain_array(self, value: np.ndarray[Any, Any], prefix: str, key: Any) -> str | None:
        """Take a C-contiguous little-endian array of a known dtype under ``prefix`` +
        ``key``; None when it needs the general path (a first dtype, a conversion)."""
        if _SWAP.get(value.dtype, True) or not value.flags.c_contiguous:
            return None
        # The name _name gives the whole path ("state" for an empty one).
        return self.keep(prefix + _component(key) or "state", value)

    def array(self, value: np.ndarray[Any, Any], trail: tuple[Any, ...]) -> str:
        if type(value) is not np.ndarray:
            if isinstance(value, np.ma.MaskedArray):
                raise StateError(
                    _where(trail), "masked arrays are not supported (store data and mask)"
                )
            value = np.asarray(value)
        swap = _SWAP.get(value.dtype)
        if swap is None:
            check_dtype(value.dtype, _where(trail))
            swap = _SWAP[value.dtype] = _needs_swap(value.dtype)
        if swap:
            value = value.astype(value.dtype.newbyteorder("<"))
        elif not value.flags.c_contiguous:
            # A copy in C order (np.ascontiguousarray would turn 0-d into 1-d).
            value = value.copy(order="C")
        return self.keep(_name(trail), value)

    def keep(self, base: str, value: np.ndarray[Any, Any]) -> str:
        """Store ``value`` as ``base``, or ``base~2``, ``base~3``... if that is taken or
        reserved; return the name it got."""
        name, n = base, 1
        while name in self.arrays or name in _RESERVED:
            n += 1
            name = f"{base}~{n}"
        self.arrays[name] = value
        return name


class Skeleton:
    """A flattened tree's containers and scalars, to take the same tree again in bulk.

    :func:`flatten` looks at every leaf from Python, about 0.6 µs an array: 12 ms for a
    state of 20,000, on the experiment's critical path at every snapshot. A state that
    is the same tree as the one flattened (the same container types and lengths, the
    same keys of the same types in the same order, scalars of the same types, an array
    or a numpy scalar wherever there was one) has the same tensor names, so only its
    arrays need taking: :meth:`take` takes them a container at a time (a dict of arrays
    is one ``list(d.values())``). Scalars may have changed (a step counter usually
    has): the structure then gets their new values, in a copy of the containers on
    their way from the root.

    It does not look at the arrays' dtypes, shapes or memory order: the caller checks
    the leaves against its layout, and copies them with a conversion-free cast.
    """

    def __init__(self, flat: Flat) -> None:
        self.structure = flat.structure
        self.kinds = flat.kinds
        self._take = _taker(flat.structure, ())

    def take(self, state: object) -> tuple[list[np.ndarray[Any, Any]], Structure] | None:
        """The arrays of ``state`` in :attr:`Flat.arrays` order (numpy scalars as 0-d
        arrays) and its structure, or None when ``state`` is not the same tree (flatten
        it instead). The structure is :attr:`structure` itself unless a scalar changed;
        the kinds are :attr:`kinds` either way."""
        out: list[Any] = []
        changes: _Changes = []
        if not self._take(state, out, changes):
            return None
        # Exactly ndarray: a subclass (a masked array, a matrix) takes the general path.
        if out and set(map(type, out)) != {np.ndarray}:
            return None
        return out, _patched(self.structure, changes) if changes else self.structure


#: Where a node is in a structure: the keys and indexes that lead to it from the root.
_Path = tuple[str | int, ...]
#: The scalars that changed: where, and their new nodes.
_Changes = list[tuple[_Path, Structure]]
#: Takes the leaves of one node into a list, and notes the scalars that changed; False
#: when the value is not that node.
_Take = Callable[[object, list[Any], _Changes], bool]


def _taker(node: Structure, path: _Path) -> _Take:
    """Compile one structure node (one :func:`flatten` wrote) into its :data:`_Take`."""
    # isinstance: flatten keeps a str subclass (an enum.StrEnum member) as it is.
    if node is None or isinstance(node, bool | int | str):
        return functools.partial(_take_scalar, type(node), node, path)
    ((tag, body),) = node.items()
    if tag == "a":
        return _take_array
    if tag == "s":
        return _take_numpy_scalar
    if tag in ("f", "fb"):
        return functools.partial(_take_float, node, path)
    if tag == "d":
        children = [_taker(child, (*path, tag, i, 1)) for i, (_, child) in enumerate(body)]
    else:
        children = [_taker(child, (*path, tag, i)) for i, child in enumerate(body)]
    only_arrays = all(child is _take_array for child in children)
    if tag == "d":
        keys = tuple(key for key, _ in body)
        if not {type(key) for key in keys} <= {str, int}:
            return _never  # a key of a subclass: flatten converts it, every time
        return functools.partial(_take_dict, keys, None if only_arrays else children)
    kind = tuple if tag == "t" else list
    return functools.partial(_take_sequence, kind, len(children), None if only_arrays else children)


def _take_scalar(
    kind: type,
    recorded: object,
    path: _Path,
    value: object,
    out: list[Any],
    changes: _Changes,
) -> bool:
    if type(value) is not kind:
        return False  # another type is another tree (and True == 1)
    if value != recorded:
        if kind is int and value.bit_length() > _MAX_INT_BITS:  # type: ignore[attr-defined]
            return False  # flatten says why it cannot be stored
        changes.append((path, value))
    return True


def _take_float(
    recorded: Structure,
    path: _Path,
    value: object,
    out: list[Any],
    changes: _Changes,
) -> bool:
    if type(value) is not float:
        return False
    # By the node, not by ==: 0.0 == -0.0, and NaN equals nothing.
    node = _float_node(value)
    if node != recorded:
        changes.append((path, node))
    return True


def _take_array(value: object, out: list[Any], changes: _Changes) -> bool:
    out.append(value)  # its type is checked with all the others, in one go
    return True


def _take_numpy_scalar(value: object, out: list[Any], changes: _Changes) -> bool:
    if not isinstance(value, np.generic):
        return False
    out.append(np.asarray(value))
    return True


def _take_dict(
    keys: tuple[Any, ...],
    children: list[_Take] | None,
    value: object,
    out: list[Any],
    changes: _Changes,
) -> bool:
    # Equal keys of exact str/int types are the same keys: "1" != 1, and a bool or a
    # float that equals an int key has the wrong type.
    if type(value) is not dict or tuple(value) != keys or not set(map(type, value)) <= _KEYS:
        return False
    if children is None:
        out.extend(value.values())
        return True
    return all(
        take(child, out, changes) for take, child in zip(children, value.values(), strict=True)
    )


def _take_sequence(
    kind: type,
    length: int,
    children: list[_Take] | None,
    value: object,
    out: list[Any],
    changes: _Changes,
) -> bool:
    if type(value) is not kind:
        return False
    sequence: Sequence[Any] = value  # type: ignore[assignment]
    if len(sequence) != length:
        return False
    if children is None:
        out.extend(sequence)
        return True
    return all(take(child, out, changes) for take, child in zip(children, sequence, strict=True))


def _never(value: object, out: list[Any], changes: _Changes) -> bool:
    return False


def _patched(structure: Structure, changes: _Changes) -> Structure:
    """``structure`` with each changed scalar's node replaced. Every container on the way
    to a change is copied once (a dict node or a list), however many changes it leads
    to; everything else is shared with ``structure``, which is left as it was."""
    holder: Any = [structure]  # so that the root is copied like any other container
    copies: dict[_Path, Any] = {(): holder}
    for path, new in changes:
        steps = (0, *path)
        parent: Any = holder
        for depth in range(1, len(steps)):
            container = copies.get(steps[:depth])
            if container is None:
                original = parent[steps[depth - 1]]
                container = dict(original) if isinstance(original, dict) else list(original)
                parent[steps[depth - 1]] = container
                copies[steps[:depth]] = container
            parent = container
        parent[steps[-1]] = new
    return holder[0]


_KEYS = frozenset({str, int})


def _float_node(value: float) -> Structure:
    # repr round-trips every float exactly except the sign and payload of a NaN.
    if value != value:
        return {"fb": struct.pack(">d", value).hex()}
    return {"f": repr(value)}


#: dtypes that passed :func:`check_dtype`, each with whether it must be byte-swapped to
#: little-endian (there are only a few dozen possible dtypes).
_SWAP: dict[np.dtype[Any], bool] = {}


def _needs_swap(dtype: np.dtype[Any]) -> bool:
    return dtype.byteorder == ">" or (dtype.byteorder == "=" and not _NATIVE_LITTLE)


@functools.lru_cache(maxsize=1 << 16)
def _name(trail: tuple[Any, ...]) -> str:
    """The tensor name of a path: its components percent-escaped, joined by ``/``."""
    return "/".join(map(_component, trail)) or "state"


@functools.lru_cache(maxsize=1 << 16)
def _prefix(trail: tuple[Any, ...]) -> str:
    """What the names of a container's children start with: its path and a ``/``."""
    return "/".join(map(_component, trail)) + "/" if trail else ""


@functools.lru_cache(maxsize=1 << 16)
def _component(part: Any) -> str:
    """One path component (a dict key or a list index), percent-escaped."""
    # surrogatepass: a str key may hold lone surrogates (from undecodable file names).
    return quote(str(part), safe="", errors="surrogatepass")


def _where(trail: tuple[Any, ...]) -> str:
    """The path of a node as Python would index it: ``state['opt'][2]``."""
    return "state" + "".join(f"[{part!r}]" for part in trail)

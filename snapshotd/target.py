"""Targets: how a user's object gives its state tree and takes one back.

Three kinds of target, all seen through the :class:`Target` protocol:

- an object with the pickle hooks: ``__getstate__()`` gives the tree; ``__setstate__``
  takes it back. As in pickle, an object without ``__setstate__`` has a dict state
  merged into its ``__dict__``, so plain classes work too;
- a ``dict`` of named values: arrays are restored in place where shape and dtype match
  (other references to them see the new values), replaced otherwise, and replaced too
  where another entry is the same array or overlaps it and overwrote it; an optional
  ``rename`` maps stored names to current ones (the tutorial's ``W`` -> ``weights``);
- explicit ``get``/``set`` callables.

Restoring a dict checks every name first and raises :class:`RestoreMismatch` listing all
missing and unexpected names before it changes anything. Pure: no files, no sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from snapshotd.errors import RestoreMismatch, UsageError

__all__ = [
    "CallableTarget",
    "DictTarget",
    "ObjectTarget",
    "Target",
    "adapt",
    "fillable_state",
    "overlapping",
    "state_of",
]


class Target(Protocol):
    """Something whose state can be taken and given back."""

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclass(frozen=True)
class ObjectTarget:
    """An object using the pickle hooks."""

    obj: object

    def get_state(self) -> Any:
        return self.obj.__getstate__()

    def set_state(self, state: Any) -> None:
        setstate = getattr(self.obj, "__setstate__", None)
        if setstate is not None:
            setstate(state)
        elif isinstance(state, dict) and hasattr(self.obj, "__dict__"):
            self.obj.__dict__.update(state)
        else:
            raise UsageError(
                f"{type(self.obj).__name__} has no __setstate__ and its state is not a dict: "
                "define __setstate__ or pass set= to restore it"
            )


@dataclass(frozen=True)
class DictTarget:
    """A dict of named arrays and values, restored in place where shapes match."""

    mapping: dict[Any, Any]
    rename: Mapping[Any, Any] = field(default_factory=dict)

    def get_state(self) -> Any:
        return self.mapping

    def set_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise RestoreMismatch([], [], [f"stored state is a {type(state).__name__}, not a dict"])
        incoming = {self.rename.get(key, key): value for key, value in state.items()}
        if len(incoming) != len(state):
            clashes = sorted(repr(k) for k in state if k in self.rename.values() and k in state)
            raise RestoreMismatch(
                [], [], [f"rename maps two stored names onto {', '.join(clashes)}"]
            )
        missing = sorted(repr(k) for k in self.mapping.keys() - incoming.keys())
        unexpected = sorted(repr(k) for k in incoming.keys() - self.mapping.keys())
        if missing or unexpected:
            raise RestoreMismatch(missing, unexpected, [])
        for key, value in incoming.items():
            self.mapping[key] = _in_place(self.mapping[key], value)
        # Two entries may be one array (tied weights), or views that overlap: then a
        # later fill overwrote an earlier one. Such an entry takes its stored array.
        filled = [key for key, value in incoming.items() if self.mapping[key] is not value]
        if _own_apart([self.mapping[key] for key in filled]):
            return  # no fill can have reached another: no need to read them all again
        for key in filled:
            if not _same_bytes(self.mapping[key], incoming[key]):
                self.mapping[key] = incoming[key]


def _same_bytes(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    """True when ``a`` and ``b`` (same shape and dtype) hold the same bytes (NaN too)."""
    raw = np.dtype(("V", a.dtype.itemsize))
    return bool(np.array_equal(a.view(raw), b.view(raw)))


def overlapping(arrays: Sequence[np.ndarray[Any, Any]]) -> set[int]:
    """The positions in ``arrays`` of those whose span of bytes meets another's.

    For C-contiguous arrays (as a flattened state's are) that is exactly sharing memory:
    filling those in place would let one overwrite another (tied weights are one array
    under two names, and the stored state may hold them untied). Interleaved strided
    views count as meeting.
    """
    if _own_apart(arrays):
        return set()
    spans = sorted((*_span(a), i) for i, a in enumerate(arrays) if a.nbytes)
    shared = set()
    reach = -1  # the furthest end of the spans before this one
    for n, (low, high, i) in enumerate(spans):
        after = spans[n + 1][0] if n + 1 < len(spans) else high
        if low < reach or after < high:
            shared.add(i)
        reach = max(reach, high)
    return shared


def _own_apart(arrays: Sequence[np.ndarray[Any, Any]]) -> bool:
    """True when each of ``arrays`` owns its memory and none is there twice: then no two
    share memory, which is known without looking at a single address."""
    return all(a.base is None for a in arrays) and len({id(a) for a in arrays}) == len(arrays)


def _span(array: np.ndarray[Any, Any]) -> tuple[int, int]:
    """The first byte of ``array`` and one past its last (strides may be negative)."""
    low = high = array.ctypes.data
    for extent, stride in zip(array.shape, array.strides, strict=True):
        reach = (extent - 1) * stride
        low, high = (low + reach, high) if reach < 0 else (low, high + reach)
    return low, high + array.itemsize


def _in_place(current: Any, value: Any) -> Any:
    fits = (
        isinstance(current, np.ndarray)
        and isinstance(value, np.ndarray)
        and current.shape == value.shape
        and current.dtype == value.dtype
        and current.flags.writeable
    )
    if fits:
        np.copyto(current, value)
        return current
    return value


@dataclass(frozen=True)
class CallableTarget:
    """Explicit callables: ``get() -> state`` and ``set(state)``."""

    get: Callable[[], Any]
    set: Callable[[Any], None] | None = None

    def get_state(self) -> Any:
        return self.get()

    def set_state(self, state: Any) -> None:
        if self.set is None:
            raise UsageError("this target has no set= callable, so it cannot be restored")
        self.set(state)


def fillable_state(target: Target) -> Any:
    """The current state of ``target`` whose arrays a restore may fill in place, or None.

    None for a dict, which fills its own arrays only after checking every name (and
    ``rename``) against the stored ones, and for callables without ``set=``, which
    cannot be restored at all: filling first would change them before the refusal.
    """
    if isinstance(target, DictTarget):
        return None
    if isinstance(target, CallableTarget) and target.set is None:
        return None
    return target.get_state()


def state_of(obj: object) -> Any:
    """The state tree to store for ``obj``.

    A value that is already a state tree (an array, a numpy or plain scalar, a tuple, a
    list, a dict, ``None``) is stored as it is; any other object gives its state through
    ``__getstate__``, as pickle would ask it.
    """
    if obj is None or isinstance(obj, _TREE_VALUES):
        return obj
    # Since Python 3.11 every object has __getstate__; only a class's own one, or an
    # instance __dict__, makes it a state holder. Anything else (a set, bytes) is left
    # for flatten() to refuse with its path.
    if type(obj).__getstate__ is not object.__getstate__ or hasattr(obj, "__dict__"):
        return ObjectTarget(obj).get_state()
    return obj


_TREE_VALUES = (np.ndarray, np.generic, tuple, list, dict, bool, int, float, str)


def adapt(
    target: object,
    *,
    get: Callable[[], Any] | None = None,
    set: Callable[[Any], None] | None = None,
    rename: Mapping[Any, Any] | None = None,
) -> Target:
    """Wrap ``target`` (or the ``get``/``set`` callables) as a :class:`Target`.

    Raises:
        UsageError: ``rename`` given for something that is not a dict, or nothing to wrap.
    """
    if get is not None or set is not None:
        if get is None:
            raise UsageError("set= needs a matching get=")
        return CallableTarget(get, set)
    if isinstance(target, dict):
        return DictTarget(target, rename or {})
    if rename:
        raise UsageError("rename= applies to dict targets; objects map names in __setstate__")
    if target is None:
        raise UsageError("nothing to snapshot: pass an object, a dict or get=/set= callables")
    return ObjectTarget(target)

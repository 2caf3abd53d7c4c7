"""Small bounded memos of recently derived values, shared between threads.

Decoding the same description again and again is the common case: a run's versions share
their tensor entries and usually their tree, and an experiment sends the same table until
its shapes change. :class:`Recent` keeps the last few values derived from such inputs.
It holds no lock: each step is one C-level operation of an ``OrderedDict``, so two
threads can at worst both derive a value, or drop one too many (a lost race only costs
the work of deriving it again).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Recent"]

_K = TypeVar("_K")
_V = TypeVar("_V")


class Recent(Generic[_K, _V]):
    """At most ``size`` values by key; the oldest added goes first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: collections.OrderedDict[_K, _V] = collections.OrderedDict()

    def get(self, key: _K) -> _V | None:
        return self._items.get(key)

    def put(self, key: _K, value: _V) -> None:
        while len(self._items) >= self._size:
            try:
                self._items.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                break
        self._items[key] = value

    def recall(self, key: _K, make: Callable[[], _V], *, keep: bool = True) -> _V:
        """The value kept for ``key``, else ``make()`` (kept too if ``keep``)."""
        known = self.get(key)
        if known is not None:
            return known
        value = make()
        if keep:
            self.put(key, value)
        return value

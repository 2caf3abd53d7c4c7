"""Run names: the one rule for what an experiment may be called.

A name becomes a directory in the store and a socket file in the runtime directory, so
it is checked here, once, before it is ever joined to a path.
"""

from __future__ import annotations

import re

from snapshotd.errors import InvalidName

__all__ = ["NAME_PATTERN", "check_name"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid run name, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidName(
            f"invalid run name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name

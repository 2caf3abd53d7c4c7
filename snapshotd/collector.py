"""The cyclic garbage collector, held off while a burst of acyclic objects is made.

Flattening a state of 20,000 arrays, encoding or writing its snapshot, and decoding
its 1-3 MB description each make tens of thousands of short-lived containers (structure
nodes, names, views, parsed JSON). Every allocation threshold crossed on the way starts
a collection pass that scans them all again: measured here, 10-30 ms per flatten and
encode, 7 ms per write of the daemon's tensor views, and 60 ms per decode of a full
description. Nothing made in between is cyclic, so nothing is lost by collecting
afterwards.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["paused"]


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Hold off the cyclic collector for the ``with`` block.

    A program that turned the collector off itself keeps it off. The switch is the
    interpreter's, not the thread's: two threads inside overlapping blocks may turn it
    back on early for each other, which only costs the time a collection takes, and a
    program that turns it off from another thread during a block finds it on again
    after it. So the blocks are kept to the bursts that need them: an experiment's
    snapshot at its safe point, a commit (for a streamed state, waiting for its pieces
    too, which its request's deadline bounds), and the decoding of a large message.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()

"""The registered cases. Importing this package registers all of them.

- :mod:`.limits`: what the machine can do with the same bytes (memcpy, write+fsync,
  cached and cold read);
- :mod:`.peers`: other ways to save and load the same state (pickle, ``np.savez``,
  ``safetensors``);
- :mod:`.ours`: snapshotd itself (``Store.commit``/``Store.load``, ``save``/``load``).

A new module of cases is added to the import list below.
"""

from __future__ import annotations

from benchmarks.cases import limits, ours, peers

__all__ = ["limits", "ours", "peers"]

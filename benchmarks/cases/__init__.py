"""The registered cases. Importing this package registers all of them.

- :mod:`.limits`: what the machine can do with the same bytes (memcpy, write+fsync,
  cached and cold read);
- :mod:`.peers`: other ways to save and load the same state (pickle, ``np.savez``,
  ``safetensors``);
- :mod:`.ours`: snapshotd itself (``Store.commit``/``Store.load``, ``save``/``load``);
- :mod:`.live`: a real experiment process and real daemons (stall, persist, memory, a
  training loop's speed, a fleet of experiments).

A new module of cases is added to the import list below.
"""

from __future__ import annotations

from benchmarks.cases import limits, live, ours, peers

__all__ = ["limits", "live", "ours", "peers"]

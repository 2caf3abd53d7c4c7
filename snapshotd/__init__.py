"""snapshotd: periodic, versioned, crash-safe snapshots of experiments' parameter state.

The experiment-facing API. ``import snapshotd`` loads numpy, xxhash and the standard
library only: never yaml, APScheduler or watchdog (those belong to the daemon).

Without a daemon::

    snapshotd.save("model.safetensors", model)        # one file, atomic, via __getstate__
    snapshotd.load("model.safetensors", into=model)   # via __setstate__
    store = snapshotd.Store("./snapshots")            # the versioned store the daemon writes
    version = store.commit("mnist-lr", state, step=100)
"""

from __future__ import annotations

from snapshotd.errors import (
    CommitFailed,
    ConfigError,
    FallbackWarning,
    InvalidName,
    LocalProtocolError,
    NoGoodSnapshot,
    NoSnapshot,
    ProtocolError,
    RemoteProtocolError,
    RestoreMismatch,
    SnapshotCorrupt,
    SnapshotdError,
    StateError,
    StoreError,
    StoreLocked,
    UsageError,
)
from snapshotd.snapshot import load, save
from snapshotd.store import Check, Store, Version

__all__ = [
    "Check",
    "CommitFailed",
    "ConfigError",
    "FallbackWarning",
    "InvalidName",
    "LocalProtocolError",
    "NoGoodSnapshot",
    "NoSnapshot",
    "ProtocolError",
    "RemoteProtocolError",
    "RestoreMismatch",
    "SnapshotCorrupt",
    "SnapshotdError",
    "StateError",
    "Store",
    "StoreError",
    "StoreLocked",
    "UsageError",
    "Version",
    "load",
    "save",
]
__version__ = "0.1.0"

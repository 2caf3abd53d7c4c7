"""snapshotd: periodic, versioned, crash-safe snapshots of experiments' parameter state.

The experiment-facing API. ``import snapshotd`` loads numpy, xxhash and the standard
library only: never yaml, APScheduler or watchdog (those belong to the daemon).

In a training script::

    run = snapshotd.register("mnist-lr", model, resume=True)
    for step in range(start, steps):
        train(model)
        run.step(step)                                # a safe point for the daemon

Without a daemon::

    snapshotd.save("model.safetensors", model)        # one file, atomic, via __getstate__
    snapshotd.load("model.safetensors", into=model)   # via __setstate__
    store = snapshotd.Store("./snapshots")            # the versioned store the daemon writes
    version = store.commit("mnist-lr", state, step=100)
"""

from __future__ import annotations

from snapshotd.client import Resumed, Run, register
from snapshotd.errors import (
    CommitFailed,
    ConfigError,
    DaemonError,
    FallbackWarning,
    InvalidName,
    LocalProtocolError,
    NoGoodSnapshot,
    NoSnapshot,
    PeerError,
    PeerRefused,
    PeerUnreachable,
    ProtocolError,
    RemoteProtocolError,
    RestoreMismatch,
    SnapshotCorrupt,
    SnapshotdError,
    SnapshotSkipped,
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
    "DaemonError",
    "FallbackWarning",
    "InvalidName",
    "LocalProtocolError",
    "NoGoodSnapshot",
    "NoSnapshot",
    "PeerError",
    "PeerRefused",
    "PeerUnreachable",
    "ProtocolError",
    "RemoteProtocolError",
    "RestoreMismatch",
    "Resumed",
    "Run",
    "SnapshotCorrupt",
    "SnapshotSkipped",
    "SnapshotdError",
    "StateError",
    "Store",
    "StoreError",
    "StoreLocked",
    "UsageError",
    "Version",
    "load",
    "register",
    "save",
]
__version__ = "0.1.0"

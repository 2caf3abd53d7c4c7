"""Noticing change on disk: experiment sockets appearing and vanishing, config edits.

watchdog (inotify) reports the events; a periodic rescan (done by the daemon) backs it
up, because events can be missed and a crashed experiment's socket does not vanish.
Facts about watchdog that shaped this module:

- an exception in a handler silently stops the observer thread, so handlers only set
  flags and call a callback that must not raise, inside a catch-all that logs;
- an editor's atomic save arrives as a *move* onto the config file, not a modification,
  so moves count by their destination path;
- socket files do create events, but a stale socket only "vanishes" when someone
  removes it: staleness is decided by connecting (ECONNREFUSED), not here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

__all__ = ["Watcher"]

log = logging.getLogger("snapshotd.discovery")


_CHANGES = frozenset({"created", "deleted", "modified", "moved", "closed"})


class _Handler(FileSystemEventHandler):
    def __init__(
        self,
        sockets_dir: Path,
        config: Path | None,
        on_sockets: Callable[[], None],
        on_config: Callable[[], None],
    ) -> None:
        self._sockets_dir = os.fspath(sockets_dir)
        self._config = os.fspath(config) if config else None
        self._on_sockets = on_sockets
        self._on_config = on_config

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._route(event)
        except Exception:  # an escaping exception would stop the observer for good
            log.exception("error while handling %s", event)

    def _route(self, event: FileSystemEvent) -> None:
        # Reading a file raises "opened" and "closed_no_write" events: reacting to those
        # would make every config reload trigger the next one.
        if event.event_type not in _CHANGES:
            return
        paths = {_text(event.src_path), _text(getattr(event, "dest_path", ""))}
        if any(p.endswith(".sock") and os.path.dirname(p) == self._sockets_dir for p in paths):
            self._on_sockets()
        if self._config is not None and self._config in paths:
            self._on_config()


def _text(path: str | bytes) -> str:
    return os.fsdecode(path) if path else ""


class Watcher:
    """Watches the experiments directory and the config file until :meth:`stop`."""

    def __init__(
        self,
        sockets_dir: Path,
        config: Path | None,
        on_sockets: Callable[[], None],
        on_config: Callable[[], None],
    ) -> None:
        self._observer = Observer()
        handler = _Handler(sockets_dir, config, on_sockets, on_config)
        self._observer.schedule(handler, os.fspath(sockets_dir), recursive=False)
        if config is not None and config.parent != sockets_dir:
            # Watch the directory: an atomic save replaces the file's inode.
            self._observer.schedule(handler, os.fspath(config.parent), recursive=False)
        self._observer.daemon = True

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=2)

    @property
    def alive(self) -> bool:
        return self._observer.is_alive()

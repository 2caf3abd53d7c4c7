"""systemd's notification protocol, in pure Python: one datagram per state change.

When the daemon runs under a ``Type=notify`` unit, systemd sets ``$NOTIFY_SOCKET`` and
waits for ``READY=1``; ``WATCHDOG=1`` must then arrive within ``WatchdogSec``. Outside
systemd the variable is unset and every call does nothing. The socket may be a path or,
as systemd often uses, an abstract address written with a leading ``@``: it is
systemd's socket, not one of ours, so the no-abstract-sockets rule does not apply.

See sd_notify(3); this follows the dependency-free example in its man page.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    """Sends ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``; silent when it is not set."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and (not pid or pid == str(os.getpid()))
        #: Seconds between the watchdog pings systemd expects, or None.
        self.watchdog_interval = int(usec) / 1e6 if wanted else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **fields: str | int) -> bool:
        """Send ``READY=1`` and friends (``notify(READY=1, STATUS="...")``).

        Returns False when there is no socket or sending failed (never raises: the
        daemon must keep working if systemd goes away).
        """
        if not self._address:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self._address)
                sock.sendall(message)
            except OSError:
                return False
        return True

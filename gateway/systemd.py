"""systemd integration: ``sd_notify`` (READY, STATUS, WATCHDOG, STOPPING) and the watchdog.

Owns the conversation with the service manager. ``sd_notify`` is written by hand: it is one
datagram of ``KEY=VALUE`` lines sent to the unix socket named by ``$NOTIFY_SOCKET`` (a path, or
an abstract name written with a leading ``@``). That is all libsystemd's ``sd_notify`` does for
us, and doing it here avoids a C dependency (python-systemd / libsystemd headers) on the
gateway image. Without ``$NOTIFY_SOCKET`` (not run by systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger("gateway.systemd")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address: str | bytes | None = None
        if addr:
            # "@name" is a socket in the abstract namespace: a leading NUL byte on the wire
            self.address = b"\0" + addr[1:].encode() if addr.startswith("@") else addr
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False if it could not be sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:  # the manager is gone or busy: never fatal for the daemon
            log.debug("sd_notify failed: %s", exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", f"STATUS={status}") if status else self.notify("READY=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}") if status else self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of ``WatchdogSec`` (``$WATCHDOG_USEC``) when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


async def watchdog_loop(notifier: Notifier, interval: float,
                        status: Callable[[], str] | None = None) -> None:
    """Ping from the event loop itself: a blocked or wedged loop stops the pings, and systemd
    restarts the service (``Restart=on-failure``). STATUS rides along with every ping."""
    while True:
        if status is not None:
            notifier.notify("WATCHDOG=1", f"STATUS={status()}")
        else:
            notifier.watchdog()
        await asyncio.sleep(interval)

"""systemd's notification protocol (sd_notify(3)), for `Type=notify` units.

The service manager passes a datagram socket in $NOTIFY_SOCKET (a path, or an
abstract name starting with "@"); the service sends newline-separated
VAR=value assignments to it: READY=1 once every port is bound, RELOADING=1
and READY=1 around a SIGHUP reload, STOPPING=1 at shutdown, STATUS=... for
`systemctl status`, and WATCHDOG=1 at least every $WATCHDOG_USEC
microseconds when the unit sets WatchdogSec (systemd restarts a service
whose pings stop).  Without $NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("bootherd.sdnotify")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the manager's timeout), or None."""
        return self.watchdog_usec / 2e6 if self.enabled and self.watchdog_usec else None

    def send(self, **fields: str | int) -> bool:
        """Send VAR=value lines (keyword names are the variables); True if sent."""
        if not self.address:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode(), self.address)
            return True
        except OSError as e:
            if not self._warned:  # once: the manager may be gone at shutdown
                self._warned = True
                log.warning("sd_notify to %s failed: %s", self.address.replace("\0", "@"),
                            e.strerror)
            return False

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload units match the reload to the request.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

"""UDP replies sent from a native thread, when the extension is built.

On loopback and veth a ``sendto`` carries the packet all the way into the receiver's
socket, so the kernel time of a reply is spent on the caller's thread.  With
:class:`bootherd._udpsend.Sender` the event loop queues its replies and a native thread,
which never takes the GIL, sends them with ``sendmmsg`` on the other core.  Without the
extension (or with ``dhcp.native_send`` / ``tftp.native_send`` false, whose servers then
make no sender) callers send directly, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    from ._udpsend import Sender as _Sender
except ImportError:  # pragma: no cover - the extension was not built
    _Sender = None

available = _Sender is not None


def make_sender(gso: bool = False) -> Any | None:
    """A started-on-demand Sender, or None when the extension is not built.

    With ``gso``, ``send_many`` of equal-sized datagrams to one address (a TFTP window) is
    one UDP GSO buffer: the kernel walks its stack once per window instead of once per
    datagram (``tftp.udp_gso``)."""
    if _Sender is None:
        return None
    return _Sender(gso=gso)


class LoopSender:
    """A Sender fed by one event loop: what the loop queues in an iteration leaves in one
    wake-up of the thread, at the end of that iteration."""

    def __init__(self, sender: Any, loop: asyncio.AbstractEventLoop):
        self.sender = sender
        self._loop = loop
        self._scheduled = False

    @property
    def errors(self) -> int:
        return self.sender.errors

    def send(self, fd: int, data: bytes, addr: tuple[str, int]) -> None:
        self.sender.send(fd, data, addr)
        self._schedule()

    def send_many(self, fd: int, packets: list[bytes], addr: tuple[str, int]) -> None:
        self.sender.send_many(fd, packets, addr)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        self.sender.flush()

    def forget(self, fd: int) -> None:
        """Before fd closes: drop its queued datagrams, wait out a send using it."""
        self.sender.forget(fd)

    def close(self) -> None:
        self.sender.close()

    def stats(self) -> dict[str, int]:
        return self.sender.stats()


def loop_sender(loop: asyncio.AbstractEventLoop, gso: bool = False) -> LoopSender | None:
    """:func:`make_sender` for an event loop; None when the loop sends itself."""
    sender = make_sender(gso)
    return LoopSender(sender, loop) if sender is not None else None

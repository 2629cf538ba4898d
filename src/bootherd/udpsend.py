"""UDP replies sent from a native thread, when the extension is built.

On loopback and veth a ``sendto`` carries the packet all the way into the receiver's
socket, so the kernel time of a reply is spent on the caller's thread.  With
:class:`bootherd._udpsend.Sender` the event loop queues its replies and a native thread,
which never takes the GIL, sends them with ``sendmmsg`` on the other core.  Without the
extension (or with ``BOOTHERD_NATIVE_SEND=0``) callers send directly, as before.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from ._udpsend import Sender as _Sender
except ImportError:  # pragma: no cover - the extension was not built
    _Sender = None

available = _Sender is not None


def make_sender(gso: bool = False) -> Any | None:
    """A started-on-demand Sender, or None when sends stay on the caller's thread.

    With ``gso``, ``send_many`` of equal-sized datagrams to one address (a TFTP window) is
    one UDP GSO buffer: the kernel walks its stack once per window instead of once per
    datagram (``BOOTHERD_UDP_GSO=0`` turns it off)."""
    if _Sender is None or os.environ.get("BOOTHERD_NATIVE_SEND", "1") == "0":
        return None
    return _Sender(gso=gso and os.environ.get("BOOTHERD_UDP_GSO", "1") != "0")

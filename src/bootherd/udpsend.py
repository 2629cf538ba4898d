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


def make_sender(inline_max: int = 0) -> Any | None:
    """A started-on-demand Sender, or None when sends stay on the caller's thread.

    ``flush()`` sends up to ``inline_max`` queued datagrams itself when the thread is idle:
    waking a sleeping thread costs more than one small send."""
    if _Sender is None or os.environ.get("BOOTHERD_NATIVE_SEND", "1") == "0":
        return None
    return _Sender(inline_max=int(os.environ.get("BOOTHERD_SEND_INLINE", inline_max)))

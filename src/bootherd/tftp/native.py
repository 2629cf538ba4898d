"""Established read transfers on a native thread, when the extension is built.

Each block of a ``windowsize 1`` transfer is one trip through the event loop and about
10 µs of Python, which caps a server at well under what a C peer serves.  Once a read
transfer has sent its first window (the options, the OACK and the size probe that ends
there all stay in :class:`~bootherd.tftp.core.ReadTransfer`), the server hands its socket
and bytes to :class:`bootherd._tftpdata.Pump`: one native thread answers the ACKs of every
handed-over transfer, with the same rules as the Python core, and reports each outcome
back through an eventfd.  Without the extension, or with ``BOOTHERD_NATIVE_TFTP=0``,
transfers stay in Python from start to end.
"""

from __future__ import annotations

import os
from typing import Any

from .core import ReadTransfer

try:
    from .._tftpdata import Pump as _Pump
    from .._tftpdata import classify
except ImportError:  # pragma: no cover - the extension was not built
    _Pump = None
    classify = None

available = _Pump is not None

# Outcomes reported by the pump (the order of the C enum).
OK, PEER_ERROR, TIMEOUT, UNEXPECTED, FILE_CHANGED, CANCELLED = range(6)
_OPCODE_NAMES = {1: "Request", 2: "Request", 3: "Data", 6: "OAck"}  # as core's classes


def make_pump(capacity: int) -> Any | None:
    """A pump for up to ``capacity`` transfers, or None when transfers stay in Python."""
    if _Pump is None or os.environ.get("BOOTHERD_NATIVE_TFTP", "1") == "0":
        return None
    return _Pump(capacity=capacity, gso=os.environ.get("BOOTHERD_UDP_GSO", "1") != "0")


def hand_over(pump: Any, fd: int, peer: tuple, xfer: ReadTransfer, buffer, file_fd: int,
              now: float) -> int:  # fmt: skip
    """Give the pump a transfer that has sent its first window; returns its handle.

    Raises ValueError, OverflowError or OSError when the pump cannot take it (the
    transfer then simply stays in Python)."""
    return pump.add(
        fd, peer, buffer, file_fd, xfer.source.size, xfer.blksize, xfer.windowsize,
        xfer.timeout, xfer.max_retries, xfer.acked, xfer.sent, xfer.attempt,
        max(0.0, (xfer.deadline or now) - now),
    )  # fmt: skip


def take_back(xfer: ReadTransfer, outcome: tuple, now: float) -> None:
    """Write what the pump did into ``xfer`` (done, unless the outcome is CANCELLED)."""
    kind, code, message, acked, sent, blocks, nbytes, retx, ago = outcome
    xfer.acked = acked
    xfer.sent = sent
    xfer.blocks_sent += blocks
    xfer.bytes_sent += nbytes
    xfer.retransmissions += retx
    xfer.deadline = None
    when = now - ago
    if kind == OK:
        xfer._finish(when, True)
    elif kind == PEER_ERROR:
        xfer.peer_error = code
        xfer._finish(when, False, f"peer error {code}: {message.decode('utf-8', 'replace')}")
    elif kind == TIMEOUT:
        xfer._finish(when, False, "timeout")
    elif kind == UNEXPECTED:
        xfer._finish(when, False, f"unexpected opcode {_OPCODE_NAMES.get(code, code)}")
    elif kind == FILE_CHANGED:
        xfer._finish(when, False, "file changed during transfer")

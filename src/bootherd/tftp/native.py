"""Established read transfers on a native thread, when the extension is built.

Each block of a ``windowsize 1`` transfer is one trip through the event loop and about
10 µs of Python, which caps a server at well under what a C peer serves.  Once a read
transfer has sent its OACK (the request, its file and its options are decided in Python,
and :class:`~bootherd.tftp.core.ReadTransfer` makes the OACK) or, without options, its
first window, the server hands its socket and bytes to :class:`bootherd._tftpdata.Pump`:
one native thread resends the OACK until ACK 0 and answers the ACKs of every handed-over
transfer, by the same rules as the Python core (the same event vectors test both, through
:class:`bootherd._tftpdata.ReadMachine`), and reports each outcome back through an
eventfd.  Without the extension, or with ``tftp.native_data_path = false``,
transfers stay in Python from start to end.
"""

from __future__ import annotations

from typing import Any

from . import core
from .core import ReadTransfer

try:
    from .. import _tftpdata
except ImportError:  # pragma: no cover - the extension was not built
    _tftpdata = None

available = _tftpdata is not None
classify = _tftpdata.classify if available else None


def make_pump(capacity: int, gso: bool = True) -> Any | None:
    """A pump for up to ``capacity`` transfers (None without the extension); with ``gso``
    a window of several blocks leaves as one UDP GSO buffer."""
    if _tftpdata is None:
        return None
    return _tftpdata.Pump(capacity=capacity, gso=gso)


def hand_over(pump: Any, fd: int, peer: tuple, xfer: ReadTransfer, buffer, file_fd: int,
              now: float) -> int:  # fmt: skip
    """Give the pump a transfer that has sent its OACK or first window; returns its handle.

    Raises ValueError, OverflowError or OSError when the pump cannot take it (the
    transfer then simply stays in Python)."""
    return pump.add(fd, peer, source=buffer, file_fd=file_fd, **xfer.handover(now).as_kwargs())


def progress(outcome: Any, now: float) -> core.Progress:
    """A native Outcome (``bootherd._tftpdata.Outcome``) on the caller's clock ``now``."""
    end = None if outcome.end is None else core.End(outcome.end)
    return core.Progress(
        outcome.acked, outcome.sent, outcome.attempt, outcome.blocks_sent,
        outcome.bytes_sent, outcome.retransmissions, end, outcome.message, outcome.peer_code,
        finished=None if end is None else now - outcome.ended_ago,
        deadline=None if end is not None else now + outcome.remaining,
    )  # fmt: skip

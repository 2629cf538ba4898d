"""UDP receive queues sized for a power-on burst, drained in batches, their drops counted.

10,000 nodes powered on within a second send 10,000 DISCOVERs within a second.  The
kernel's default receive queue (208 KiB) holds a few hundred of them and silently drops
the rest: the firmware waits 4 s, then 8, then 16.  So a listening socket:

- asks for a large receive buffer (:func:`set_rcvbuf`): ``SO_RCVBUFFORCE`` when the
  process has ``CAP_NET_ADMIN`` (root), else ``SO_RCVBUF``, which the kernel caps at
  ``net.core.rmem_max``;
- is read in batches (:func:`recv_batch`): one ``recvmmsg`` per 64 datagrams in the native
  module (``bootherd._udprecv``), each datagram with the kernel's receive time
  (``SO_TIMESTAMPNS``), so a request that waited in the queue is seen as old as it is;
  without the extension, ``recvmsg`` in Python, same results;
- has its drops counted: the kernel counts what it threw away per socket
  (``/proc/net/udp``, column ``drops``) and for the whole host (``/proc/net/snmp``,
  ``Udp: RcvbufErrors`` and ``InErrors``).  :func:`socket_drops` and
  :func:`kernel_udp_counters` read them, for ``/metrics``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from typing import Any

try:
    from ._udprecv import recv_batch as _native_recv_batch
except ImportError:  # pragma: no cover - the extension was not built
    _native_recv_batch = None

log = logging.getLogger("bootherd.udprecv")

available = _native_recv_batch is not None
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
_TIMESPEC = struct.Struct("@qq")

Item = tuple[bytes, tuple, float]  # data, source address, kernel receive time (0: unknown)
# ... and, with pktinfo=True, the datagram's struct in_pktinfo (None when the socket does
# not ask for IP_PKTINFO): the interface and local address a wildcard socket's request
# arrived on.
InfoItem = tuple[bytes, tuple, float, bytes | None]
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def set_rcvbuf(sock: socket.socket, size: int, what: str) -> int:
    """Ask for a ``size``-byte receive buffer (``SO_RCVBUFFORCE`` first, to pass
    ``net.core.rmem_max``); returns the size obtained, and warns naming ``what`` when it
    is smaller than asked (Linux reports twice the value it was given)."""
    force = getattr(socket, "SO_RCVBUFFORCE", 33)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < size:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if got < size:
        log.warning("%s: receive buffer is %d bytes, %d asked; run as root (SO_RCVBUFFORCE) "
                    "or raise net.core.rmem_max", what, got, size)
    return got


def timestamps(sock: socket.socket) -> None:
    """Have the kernel stamp each datagram with its receive time."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def recv_batch(sock: socket.socket, max_count: int, bufsize: int = 2048,
               pktinfo: bool = False) -> list[Any]:
    """Up to ``max_count`` queued datagrams (an empty list when none is queued): Items,
    or with ``pktinfo`` InfoItems."""
    if _native_recv_batch is not None:
        return _native_recv_batch(sock.fileno(), max_count, bufsize, pktinfo)
    out: list[Any] = []
    anc = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(12)
    for _ in range(max_count):
        try:
            data, ancdata, _flags, addr = sock.recvmsg(bufsize, anc)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            if out:
                break
            raise
        ts = 0.0
        info = None
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(raw) >= 16:
                sec, nsec = _TIMESPEC.unpack_from(raw)
                ts = sec + nsec / 1e9
            elif level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(raw) >= 12:
                info = raw[:12]
        out.append((data, addr, ts, info) if pktinfo else (data, addr, ts))
    return out


def socket_drops(sock: socket.socket, proc: str = "/proc/net") -> int | None:
    """Datagrams the kernel dropped for this socket (its receive queue was full), from
    ``/proc/net/udp`` or ``udp6`` by the socket's inode; None when it is not found."""
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return None
    for name in ("udp", "udp6"):
        try:
            with open(os.path.join(proc, name)) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) >= 13 and cols[9] == inode:
                        return int(cols[12])
        except (OSError, StopIteration, ValueError):
            continue
    return None


def kernel_udp_counters(path: str = "/proc/net/snmp") -> dict[str, int]:
    """The host's UDP counters (``InDatagrams``, ``InErrors``, ``RcvbufErrors``, ...)."""
    try:
        with open(path) as f:
            lines = [ln.split() for ln in f if ln.startswith("Udp:")]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    names, values = lines[0][1:], lines[1][1:]
    out = {}
    for k, v in zip(names, values, strict=False):
        with contextlib.suppress(ValueError):
            out[k] = int(v)
    return out

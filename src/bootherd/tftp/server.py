"""Asyncio transport for the sans-IO TFTP core (see :mod:`bootherd.tftp.core`).

One listening socket receives requests; every admitted transfer gets its own UDP socket
(its TID).  Works with the default event loop and with uvloop.  A read transfer that has
sent its first window goes on in the native data path (:mod:`.native`) when it is built.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import inspect
import logging
import os
import socket
import stat as stat_mod
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Self

from ..udpsend import loop_sender
from . import core, native
from .core import (
    ERR_ACCESS,
    ERR_DISK_FULL,
    ERR_FILE_EXISTS,
    ERR_ILLEGAL_OP,
    ERR_NOT_FOUND,
    ERR_OPTIONS,
    ERR_UNDEFINED,
    ERR_UNKNOWN_TID,
    BytesSource,
    MalformedPacket,
    OptionError,
    ReadTransfer,
    Request,
    WriteTransfer,
)

log = logging.getLogger("bootherd.tftp")

LISTEN_RCVBUF = 8 * 2**20  # bytes; 1,000 clients asking at once overflow the 208 KiB default
TRANSFER_RCVBUF = 256 * 2**10
LISTEN_BATCH = 512  # datagrams read from the listen socket per readiness event
TRANSFER_BATCH = 64  # datagrams read from a transfer socket per readiness event
STALE_REQUEST_WINDOW = 2.0  # seconds an identical request after success is a stale copy
QUEUE_WAIT = 1.0  # seconds a request may wait for a free slot before "server busy"
MAX_UPLOAD = 64 * 2**20
MAX_WINDOWSIZE = 64
BUSY_MESSAGE = "server busy, retry"

Resolver = Callable[[str, str], "bytes | None | Awaitable[bytes | None]"]


@dataclass(slots=True)
class TransferStats:
    """Handed to ``on_transfer_done`` once per request that got a transfer socket."""

    client_ip: str
    client_port: int
    path: str
    bytes: int  # payload bytes delivered (read: file bytes acknowledged; write: received)
    blocks: int  # DATA packets sent (read, including retransmissions) or accepted (write)
    retries: int  # retransmitted packets
    duration: float  # seconds
    ok: bool
    error: str | None = None
    direction: str = "read"  # "read" or "write"
    probe: bool = False  # a size probe the client aborted after the OACK (firmware habit)
    options: dict[str, str] = field(default_factory=dict)  # what we acknowledged


@dataclass(slots=True)
class Counters:
    """Cumulative counters (plus the ``active_transfers`` gauge) for export."""

    requests: int = 0
    read_requests: int = 0
    write_requests: int = 0
    duplicate_requests: int = 0  # retransmitted RRQ/WRQ for a live transfer
    superseded: int = 0  # live transfer replaced by a different request from the same TID
    transfers_ok: int = 0
    transfers_failed: int = 0
    probes_aborted: int = 0  # tsize probes aborted by the client (not failures)
    request_errors: int = 0  # requests answered with an ERROR (not found, access, ...)
    busy_rejections: int = 0
    queued: int = 0  # requests that had to wait for a slot
    malformed: int = 0
    unknown_tid: int = 0
    internal_errors: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    blocks_sent: int = 0
    retransmissions: int = 0
    active_transfers: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    native_transfers: int = 0  # reads handed to the native data path after their first window

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _RequestError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- paths


def resolve_in_root(root_real: str, filename: str) -> tuple[str, str]:
    """Map a requested name to a real path inside ``root_real``.

    Returns ``(relative_name, real_path)``.  A leading '/' (or the root's own absolute
    prefix) is relative to the root; ``..`` components, NUL bytes and symlinks leading
    outside are refused with ERROR 2.  Backslashes are treated as '/' (Windows loaders).
    """
    name = filename.replace("\\", "/")
    if "\0" in name:
        raise _RequestError(ERR_ACCESS, "access violation")
    if name.startswith(root_real + "/"):
        name = name[len(root_real) + 1 :]
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise _RequestError(ERR_ACCESS, "access violation")
    if not parts:
        raise _RequestError(ERR_NOT_FOUND, "file not found")
    rel = "/".join(parts)
    real = os.path.realpath(os.path.join(root_real, rel))
    if real != root_real and not real.startswith(root_real + os.sep):
        raise _RequestError(ERR_ACCESS, "access violation")
    return rel, real


# --------------------------------------------------------------------------- file cache


class FileCache:
    """Bounded LRU of whole-file contents keyed by real path.

    An entry is valid only while (st_dev, st_ino, st_size, st_mtime_ns) still match, so
    a file replaced or rewritten on disk is re-read on the next request.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.max_entry = max_bytes // 4
        self.used = 0
        self._entries: collections.OrderedDict[str, tuple[tuple, bytes]] = (
            collections.OrderedDict()
        )

    @staticmethod
    def identity(st: os.stat_result) -> tuple:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self, path: str, st: os.stat_result) -> bytes | None:
        entry = self._entries.get(path)
        if entry is None:
            return None
        if entry[0] != self.identity(st):
            self._drop(path)
            return None
        self._entries.move_to_end(path)
        return entry[1]

    def put(self, path: str, st: os.stat_result, data: bytes) -> None:
        if len(data) > self.max_entry:
            return
        if path in self._entries:
            self._drop(path)
        while self._entries and self.used + len(data) > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[path] = (self.identity(st), data)
        self.used += len(data)

    def _drop(self, path: str) -> None:
        _, data = self._entries.pop(path)
        self.used -= len(data)

    def __len__(self) -> int:
        return len(self._entries)


def _open_checked(path: str, st: os.stat_result) -> int:
    """Open ``path`` read-only and make sure it is the inode we checked (no swap race)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat_mod.S_ISREG(
            fst.st_mode
        ):
            raise _RequestError(ERR_ACCESS, "file changed while opening")
    except BaseException:
        os.close(fd)
        raise
    return fd


class FileChanged(Exception):
    pass


class _FileSource:
    """Lazily loaded file content: nothing is read until the first DATA block is due
    (a tsize probe answered from ``stat`` never touches the file's bytes)."""

    __slots__ = ("_cache", "_counters", "_fd", "_path", "_st", "_view", "size")

    def __init__(self, path: str, st: os.stat_result, cache: FileCache, counters: Counters):
        self._path = path
        self._st = st
        self._cache = cache
        self._counters = counters
        self._view: memoryview | None = None
        self._fd: int | None = None
        self.size = st.st_size

    def read(self, offset: int, n: int) -> bytes | memoryview:
        view = self._view
        if view is not None:
            return view[offset : offset + n]
        if self._fd is not None:
            return self._pread(offset, n)
        data = self._cache.get(self._path, self._st)
        if data is not None:
            self._counters.cache_hits += 1
            self._view = memoryview(data)
            return self._view[offset : offset + n]
        self._counters.cache_misses += 1
        fd = _open_checked(self._path, self._st)
        if self.size <= self._cache.max_entry:
            try:
                chunks = []
                remaining = self.size + 1
                while remaining > 0:
                    chunk = os.read(fd, min(remaining, 1 << 24))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    remaining -= len(chunk)
            finally:
                os.close(fd)
            data = b"".join(chunks)
            if len(data) != self.size:
                raise FileChanged("file changed during transfer")
            self._cache.put(self._path, self._st, data)
            self._view = memoryview(data)
            return self._view[offset : offset + n]
        self._fd = fd
        return self._pread(offset, n)

    def native_source(self) -> tuple[memoryview | None, int]:
        """For the native data path: the bytes, or else the open file to pread."""
        return self._view, -1 if self._view is not None else self._fd

    def _pread(self, offset: int, n: int) -> bytes:
        want = max(0, min(n, self.size - offset))
        data = os.pread(self._fd, want, offset)
        if len(data) != want:
            raise FileChanged("file changed during transfer")
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._view = None


# --------------------------------------------------------------------------- sessions


class _Session:
    """One request from one client TID, from arrival to the end of its transfer."""

    __slots__ = (
        "client",
        "done",
        "fd",
        "native",
        "opts",
        "path",
        "peer_ip",
        "queued_at",
        "raw",
        "request",
        "server",
        "source",
        "started",
        "state",
        "timer",
        "timer_at",
        "transport",
        "upload_target",
        "xfer",
    )  # fmt: skip

    def __init__(self, server: TFTPServer, client: tuple[str, int], raw: bytes, req: Request):
        self.server = server
        self.client = client
        self.peer_ip = client[0]
        self.raw = raw
        self.request = req
        self.path = req.filename
        self.state = "new"  # new -> queued? -> starting -> active -> done
        self.queued_at = 0.0
        self.transport: _TransferSocket | None = None
        self.fd = -1  # the transfer socket's number, for the native sender
        self.native: int | None = None  # handle while the native data path has it
        self.xfer: ReadTransfer | WriteTransfer | None = None
        self.source = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.opts: dict[str, str] = {}
        self.upload_target: str | None = None
        self.done = False
        self.started = 0.0


class _TransferSocket:
    """A transfer's own UDP socket, read from a loop reader callback until it is handed to
    the native data path (or closed)."""

    __slots__ = ("_loop", "_on_readable", "_reading", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, on_readable):
        self._loop = loop
        self.sock = sock
        self._on_readable = on_readable
        self._reading = False
        self.resume()

    def sendto(self, data: bytes, addr) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError as exc:  # full buffer, unreachable: the retransmission timer copes
            log.debug("TFTP send to %s: %s", addr, exc)

    def pause(self) -> None:
        """Stop reading (the native data path reads the socket from now on)."""
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.sock.fileno())

    def resume(self) -> None:
        if not self._reading and self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def close(self) -> None:
        self.pause()
        self.sock.close()

    def is_closing(self) -> bool:
        return self.sock.fileno() < 0


# --------------------------------------------------------------------------- server


class TFTPServer:
    """TFTP server (read requests, optional uploads) on one address/port.

    ``resolver(client_ip, path)`` (sync or async) may return bytes to serve instead of a
    file (per-node content); ``None`` falls through to the filesystem.
    ``on_transfer_done(stats)`` (sync or async) is called once per finished transfer.
    """

    def __init__(
        self,
        address: str,
        port: int,
        root: str,
        *,
        upload_dir: str | None = None,
        max_blksize: int = 1468,
        default_timeout: float = 1.0,
        retries: int = 5,
        max_transfers: int = 4096,
        max_per_client: int = 8,
        cache_bytes: int = 256 * 2**20,
        resolver: Resolver | None = None,
        on_transfer_done: Callable[[TransferStats], object] | None = None,
        queue_wait: float = QUEUE_WAIT,
        max_windowsize: int = MAX_WINDOWSIZE,
        listen_rcvbuf: int = LISTEN_RCVBUF,
        max_upload: int = MAX_UPLOAD,
    ):
        self.address = address
        self.port = port
        self.root = os.path.realpath(root)
        self.upload_dir = os.path.realpath(upload_dir) if upload_dir else None
        self.max_blksize = max(core.MIN_BLKSIZE, min(max_blksize, core.MAX_BLKSIZE))
        self.default_timeout = default_timeout
        self.retries = retries
        self.max_transfers = max_transfers
        self.max_per_client = max_per_client
        self.cache = FileCache(cache_bytes)
        self.resolver = resolver
        self.on_transfer_done = on_transfer_done
        self.queue_wait = queue_wait
        self.max_windowsize = max_windowsize
        self.listen_rcvbuf = listen_rcvbuf
        self.max_upload = max_upload
        self.counters = Counters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen_sock: socket.socket | None = None
        self._recent: dict[tuple[str, int], tuple[bytes, float]] = {}
        self._sessions: dict[tuple[str, int], _Session] = {}
        self._per_client: collections.Counter[str] = collections.Counter()
        self._active = 0
        self._queue: collections.deque[_Session] = collections.deque()
        self._tasks: set[asyncio.Task] = set()
        self._housekeeper: asyncio.Task | None = None
        self._family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.rcvbuf = 0  # effective SO_RCVBUF of the listen socket after start()
        # DATA leaves from a native thread when the extension is built (udpsend.py).
        self.sender = None
        # Established reads go on in the native data path when it is built (native.py).
        self.pump = None
        self._native: dict[int, _Session] = {}
        self._native_seen = (0, 0)  # its (malformed, unknown TID) counts already in ours

    # -- lifecycle
    @property
    def local_address(self) -> tuple[str, int]:
        name = self._listen_sock.getsockname()
        return name[0], name[1]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sender = loop_sender(self._loop, gso=True)
        _raise_nofile_limit(self.max_transfers + 512)
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            self.rcvbuf = _set_rcvbuf(sock, self.listen_rcvbuf)
            sock.bind((self.address, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"TFTP: cannot bind {self.address}:{self.port}: {exc.strerror}"
            ) from exc
        # The listen socket is drained in batches from a reader callback: with one
        # datagram per readiness event (the stock datagram transport), a burst of
        # requests would queue behind the traffic of every running transfer.
        self._listen_sock = sock
        self._loop.add_reader(sock.fileno(), self._on_listen_readable)
        self.pump = native.make_pump(self.max_transfers)
        self._native_seen = (0, 0)
        if self.pump is not None:
            self._loop.add_reader(self.pump.fileno(), self._on_pump_ready)
        self.port = self.local_address[1]
        self._housekeeper = self._loop.create_task(self._housekeeping())
        log.info(
            "TFTP listening on %s:%d root=%s rcvbuf=%d", self.address, self.port, self.root,
            self.rcvbuf,
        )

    async def stop(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
            self._housekeeper = None
        for session in list(self._sessions.values()):
            self._abort(session, "server stopping")
        self._queue.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listen_sock is not None:
            self._loop.remove_reader(self._listen_sock.fileno())
            self._listen_sock.close()
            self._listen_sock = None
        if self.pump is not None:
            self._count_native()
            self._loop.remove_reader(self.pump.fileno())
            self.pump.close()
            self.pump = None
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def active_transfers(self) -> int:
        return self._active

    # -- requests
    def _send_error(self, addr, code: int, message: str) -> None:
        if self._listen_sock is not None:
            try:
                self._listen_sock.sendto(core.encode_error(code, message), addr)
            except OSError as exc:  # full send buffer: the client retries its request
                log.debug("TFTP error to %s not sent: %s", addr, exc)

    def _on_listen_readable(self) -> None:
        sock = self._listen_sock
        if sock is None:
            return
        recv = sock.recvfrom
        for _ in range(LISTEN_BATCH):
            try:
                data, addr = recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("TFTP listen socket: %s", exc)
                return
            try:
                self._on_request(data, addr)
            except Exception:
                self.counters.internal_errors += 1
                log.exception("TFTP request from %s", addr)

    def _on_request(self, data: bytes, addr) -> None:
        counters = self.counters
        try:
            pkt = core.parse_packet(data)
        except MalformedPacket:
            counters.malformed += 1
            return
        client = (addr[0], addr[1])
        if not isinstance(pkt, Request):
            if not isinstance(pkt, core.Error):
                self._send_error(addr, ERR_ILLEGAL_OP, "illegal TFTP operation")
            return
        counters.requests += 1
        existing = self._sessions.get(client)
        if existing is not None:
            if existing.raw == data:
                counters.duplicate_requests += 1
                return
            counters.superseded += 1
            self._abort(existing, "superseded by a new request")
        elif self._recent:
            recent = self._recent.get(client)
            if recent is not None and recent[0] == data and recent[1] > self._loop.time():
                # A retransmitted request that sat in the queue while its transfer ran
                # to completion: starting it again would only time out against a client
                # that is done.  (A deliberate identical re-request is served once the
                # short STALE_REQUEST_WINDOW has passed, i.e. on the client's retry.)
                counters.duplicate_requests += 1
                return
        if pkt.opcode == core.RRQ:
            counters.read_requests += 1
        else:
            counters.write_requests += 1
        if pkt.mode not in ("octet", "netascii"):
            counters.request_errors += 1
            self._send_error(addr, ERR_ILLEGAL_OP, f"unsupported mode {pkt.mode!r}")
            return
        if pkt.opcode == core.WRQ and self.upload_dir is None:
            counters.request_errors += 1
            self._send_error(addr, ERR_ACCESS, "access violation: uploads disabled")
            return
        session = _Session(self, client, bytes(data), pkt)
        self._sessions[client] = session
        if self._can_admit(client[0]):
            self._admit(session)
        elif len(self._queue) < self.max_transfers:
            session.state = "queued"
            session.queued_at = self._loop.time()
            counters.queued += 1
            self._queue.append(session)
        else:
            self._busy(session)

    def _can_admit(self, ip: str) -> bool:
        return self._active < self.max_transfers and self._per_client[ip] < self.max_per_client

    def _busy(self, session: _Session) -> None:
        self.counters.busy_rejections += 1
        session.state = "done"
        session.done = True
        if self._sessions.get(session.client) is session:
            del self._sessions[session.client]
        self._send_error(session.client, ERR_UNDEFINED, BUSY_MESSAGE)

    def _admit(self, session: _Session) -> None:
        session.state = "starting"
        self._active += 1
        self._per_client[session.peer_ip] += 1
        self.counters.active_transfers = self._active
        task = self._loop.create_task(self._start_session(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pump_queue(self) -> None:
        if not self._queue:
            return
        keep: collections.deque[_Session] = collections.deque()
        while self._queue and self._active < self.max_transfers:
            s = self._queue.popleft()
            if s.done:
                continue
            if self._per_client[s.peer_ip] < self.max_per_client:
                self._admit(s)
            else:
                keep.append(s)
        keep.extend(self._queue)
        self._queue = keep

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(min(0.2, self.queue_wait / 2 or 0.2))
            try:
                self._expire_queue()
                self._count_native()
            except Exception:
                log.exception("TFTP housekeeping")

    def _expire_queue(self) -> None:
        if self._recent:
            now = self._loop.time()
            self._recent = {k: v for k, v in self._recent.items() if v[1] > now}
        if not self._queue:
            return
        limit = self._loop.time() - self.queue_wait
        while self._queue and (self._queue[0].done or self._queue[0].queued_at <= limit):
            s = self._queue.popleft()
            if not s.done:
                self._busy(s)

    async def _start_session(self, session: _Session) -> None:
        req = session.request
        try:
            if req.opcode == core.RRQ:
                await self._prepare_read(session)
            else:
                self._prepare_write(session)
        except _RequestError as exc:
            self.counters.request_errors += 1
            self._send_error(session.client, exc.code, exc.message)
            self._release(session)
            return
        except Exception as exc:
            self.counters.internal_errors += 1
            log.exception("TFTP request %r from %s", req.filename, session.client)
            self._send_error(session.client, ERR_UNDEFINED, f"internal error: {exc}")
            self._release(session)
            return
        if session.done:  # superseded or stopped while resolving
            self._close_source(session)
            return
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TRANSFER_RCVBUF)
            sock.bind((self.address, 0))
            transport = _TransferSocket(self._loop, sock, lambda: self._on_readable(session))
        except OSError as exc:
            sock.close()
            self.counters.internal_errors += 1
            log.warning("TFTP: no transfer socket for %s: %s", session.client, exc)
            self._send_error(session.client, ERR_UNDEFINED, BUSY_MESSAGE)
            self._close_source(session)
            self._release(session)
            return
        session.transport = transport
        session.fd = sock.fileno()
        session.state = "active"
        now = self._loop.time()
        session.started = now
        try:
            pkts, deadline = session.xfer.start(now)
        except Exception as exc:  # noqa: BLE001
            self._internal_failure(session, exc)
            return
        self._advance(session, pkts, deadline)

    def _on_readable(self, session: _Session) -> None:
        """Datagrams on a transfer socket that Python still serves."""
        sock = session.transport.sock
        peer = session.client
        for _ in range(TRANSFER_BATCH):
            if session.done or session.native is not None:
                return
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error reported on the socket: the timer copes
                log.debug("transfer socket for %s: %s", peer, exc)
                return
            if addr != peer and addr[:2] != peer:
                self._unknown_tid(session.transport, data, addr)
                continue
            try:
                pkts, deadline = session.xfer.on_packet(data, self._loop.time())
            except MalformedPacket:
                self.counters.malformed += 1
                continue
            except Exception as exc:  # noqa: BLE001 - a bad file must not take the server down
                self._internal_failure(session, exc)
                return
            self._advance(session, pkts, deadline)

    def _advance(self, session: _Session, pkts: list[bytes], deadline: float | None) -> None:
        """Send what an event produced; then end the transfer, hand it to the native data
        path (a read that has sent its first window) or arm its timer."""
        self._send(session, pkts, deadline is None)
        if deadline is None:
            self._finish(session)
        elif self._handed_over(session):
            return
        elif session.timer is None or deadline < session.timer_at:
            self._arm(session, deadline)

    def _handed_over(self, session: _Session) -> bool:
        """Give a read that has sent its first window to the native data path; False if
        there is none, the transfer is not such a read, or the pump cannot take it."""
        xfer = session.xfer
        if self.pump is None or not isinstance(xfer, ReadTransfer) or xfer.sent == 0:
            return False
        buffer, file_fd = xfer.source.native_source()
        session.transport.pause()
        try:
            handle = native.hand_over(self.pump, session.fd, session.client, xfer, buffer,
                                      file_fd, self._loop.time())  # fmt: skip
        except (ValueError, OverflowError, OSError) as exc:
            log.debug("TFTP transfer %s stays in Python: %s", session.client, exc)
            session.transport.resume()
            return False
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        session.native = handle
        self._native[handle] = session
        self.counters.native_transfers += 1
        return True

    def _take_back(self, session: _Session, outcome: tuple | None) -> None:
        """The native data path gave the transfer back (None: it had already ended it
        and reported that; the caller is ending the session anyway)."""
        self._native.pop(session.native, None)
        session.native = None
        if outcome is None:
            return
        native.take_back(session.xfer, outcome, self._loop.time())

    def _count_native(self) -> None:
        """Fold the native data path's datagram counters into ours (housekeeping)."""
        if self.pump is None:
            return
        st = self.pump.stats()
        seen = self._native_seen
        self.counters.malformed += st["malformed"] - seen[0]
        self.counters.unknown_tid += st["unknown_tid"] - seen[1]
        self._native_seen = (st["malformed"], st["unknown_tid"])

    def _on_pump_ready(self) -> None:
        """Transfers the native data path has ended."""
        for handle, outcome in self.pump.collect():
            session = self._native.get(handle)
            if session is None:
                continue
            try:
                self._take_back(session, outcome)
                self._finish(session)
            except Exception:  # the other outcomes of this batch must still be ended
                self.counters.internal_errors += 1
                log.exception("TFTP transfer %s after the native data path", session.client)

    async def _lookup(self, session: _Session, rel: str) -> bytes | None:
        if self.resolver is None:
            return None
        result = self.resolver(session.peer_ip, rel)
        if inspect.isawaitable(result):
            result = await result
        if result is not None and not isinstance(result, (bytes, bytearray, memoryview)):
            raise TypeError(f"resolver returned {type(result).__name__}, not bytes")
        return result

    async def _prepare_read(self, session: _Session) -> None:
        req = session.request
        rel, real = resolve_in_root(self.root, req.filename)
        session.path = rel
        data = await self._lookup(session, rel)
        if session.done:
            return
        if data is not None:
            if req.mode == "netascii":
                data = core.to_netascii(bytes(data))
            source = BytesSource(data)
        else:
            try:
                st = os.stat(real)
            except FileNotFoundError:
                raise _RequestError(ERR_NOT_FOUND, "file not found") from None
            except PermissionError:
                raise _RequestError(ERR_ACCESS, "access violation") from None
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
                    raise _RequestError(ERR_NOT_FOUND, "file not found") from None
                raise
            if not stat_mod.S_ISREG(st.st_mode):
                raise _RequestError(ERR_NOT_FOUND, "file not found")
            if not os.access(real, os.R_OK):
                raise _RequestError(ERR_ACCESS, "access violation")
            source = _FileSource(real, st, self.cache, self.counters)
            if req.mode == "netascii":
                try:
                    raw = bytes(source.read(0, st.st_size))
                finally:
                    source.close()
                source = BytesSource(core.to_netascii(raw))
        session.source = source
        try:
            neg = core.negotiate(
                req.options,
                opcode=core.RRQ,
                max_blksize=self.max_blksize,
                default_timeout=self.default_timeout,
                max_windowsize=self.max_windowsize,
                file_size=source.size,
            )
        except OptionError as exc:
            self._close_source(session)
            raise _RequestError(ERR_OPTIONS, f"option negotiation refused: {exc}") from None
        session.opts = neg.oack
        session.xfer = ReadTransfer(
            source,
            blksize=neg.blksize,
            windowsize=neg.windowsize,
            timeout=neg.timeout,
            retries=self.retries,
            oack=neg.oack or None,
        )

    def _prepare_write(self, session: _Session) -> None:
        req = session.request
        rel, real = resolve_in_root(self.upload_dir, req.filename)
        session.path = rel
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise _RequestError(ERR_ACCESS, "access violation: no such directory")
        if os.path.lexists(real):
            raise _RequestError(ERR_FILE_EXISTS, "file already exists")
        try:
            neg = core.negotiate(
                req.options,
                opcode=core.WRQ,
                max_blksize=self.max_blksize,
                default_timeout=self.default_timeout,
                max_windowsize=self.max_windowsize,
                max_upload=self.max_upload,
            )
        except OptionError as exc:
            code = ERR_DISK_FULL if "upload limit" in str(exc) else ERR_OPTIONS
            raise _RequestError(code, f"option negotiation refused: {exc}") from None
        session.opts = neg.oack
        session.upload_target = real
        session.xfer = WriteTransfer(
            blksize=neg.blksize,
            windowsize=neg.windowsize,
            timeout=neg.timeout,
            retries=self.retries,
            oack=neg.oack or None,
            max_bytes=self.max_upload,
        )

    # -- timers
    def _arm(self, session: _Session, deadline: float) -> None:
        if session.timer is not None:
            session.timer.cancel()
        session.timer_at = deadline
        session.timer = self._loop.call_at(deadline, self._on_timer, session)

    def _on_timer(self, session: _Session) -> None:
        session.timer = None
        if session.done or session.native is not None:
            return
        try:
            pkts, deadline = session.xfer.on_timer(self._loop.time())
        except Exception as exc:  # noqa: BLE001
            self._internal_failure(session, exc)
            return
        self._advance(session, pkts, deadline)

    def _send(self, session: _Session, pkts: list[bytes], last: bool = False) -> None:
        """Queue pkts for the client; ``last`` packets (a final ACK, say) go at once, as
        the socket closes right after them."""
        if not pkts:
            return
        sender = self.sender
        if sender is None or last:
            self._forget_sends(session)
            sendto = session.transport.sendto
            client = session.client
            for p in pkts:
                sendto(p, client)
            return
        sender.send_many(session.fd, pkts, session.client)

    def _forget_sends(self, session: _Session) -> None:
        """Before the transfer socket closes: its queued DATA is moot, and its number may
        be reused at once by a new transfer."""
        if self.sender is not None and session.fd >= 0:
            self.sender.forget(session.fd)

    # -- endings
    def _unknown_tid(self, transport, data: bytes, addr) -> None:
        self.counters.unknown_tid += 1
        if len(data) >= 2 and data[0] == 0 and data[1] == core.ERROR:
            return
        transport.sendto(core.encode_error(ERR_UNKNOWN_TID, "unknown transfer ID"), addr)

    def _internal_failure(self, session: _Session, exc: Exception) -> None:
        if isinstance(exc, FileChanged):
            msg = str(exc)
        else:
            self.counters.internal_errors += 1
            log.exception("TFTP transfer %s %r", session.client, session.path, exc_info=exc)
            msg = f"internal error: {exc}"
        xfer = session.xfer
        if session.transport is not None:
            self._forget_sends(session)
            session.transport.sendto(core.encode_error(ERR_UNDEFINED, msg), session.client)
        if xfer is not None and not xfer.done:
            xfer._finish(self._loop.time(), False, msg)
        self._finish(session)

    def _abort(self, session: _Session, reason: str) -> None:
        """End a session from outside (superseded, server stopping)."""
        if session.done:
            return
        if session.native is not None:
            self._take_back(session, self.pump.cancel(session.native))
        if session.state == "queued":
            session.done = True
            if self._sessions.get(session.client) is session:
                del self._sessions[session.client]
            return
        xfer = session.xfer
        if xfer is not None and not xfer.done:
            xfer._finish(self._loop.time(), False, reason)
        if session.state == "active":
            self._finish(session)
        else:  # still resolving: _start_session sees session.done and cleans up
            self._release(session)

    def _close_source(self, session: _Session) -> None:
        src = session.source
        session.source = None
        if src is not None and hasattr(src, "close"):
            src.close()

    def _release(self, session: _Session) -> None:
        if session.state in ("starting", "active"):
            self._active -= 1
            self._per_client[session.peer_ip] -= 1
            if self._per_client[session.peer_ip] <= 0:
                del self._per_client[session.peer_ip]
            self.counters.active_transfers = self._active
        session.state = "done"
        session.done = True
        if self._sessions.get(session.client) is session:
            del self._sessions[session.client]
        self._pump_queue()

    def _finish(self, session: _Session) -> None:
        if session.done:
            return
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        if session.transport is not None:
            self._forget_sends(session)
            session.transport.close()
        self._close_source(session)
        xfer = session.xfer
        self._release(session)
        if xfer is None:
            return
        stats = self._stats(session, xfer)
        c = self.counters
        c.retransmissions += xfer.retransmissions
        if isinstance(xfer, ReadTransfer):
            c.bytes_sent += xfer.bytes_sent
            c.blocks_sent += xfer.blocks_sent
        else:
            c.bytes_received += xfer.bytes_received
            if xfer.ok:
                self._store_upload(session, xfer, stats)
        if stats.probe:
            c.probes_aborted += 1
        elif stats.ok:
            c.transfers_ok += 1
            self._recent[session.client] = (session.raw, self._loop.time() + STALE_REQUEST_WINDOW)
        else:
            c.transfers_failed += 1
        cb = self.on_transfer_done
        if cb is not None:
            try:
                res = cb(stats)
                if inspect.isawaitable(res):
                    task = self._loop.create_task(res)
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except Exception:
                log.exception("on_transfer_done callback")

    def _stats(self, session: _Session, xfer) -> TransferStats:
        duration = max(0.0, (xfer.finished or self._loop.time()) - (xfer.started or 0.0))
        if not xfer.started:
            duration = 0.0
        if isinstance(xfer, ReadTransfer):
            delivered = min(xfer.acked * xfer.blksize, xfer.source.size)
            if xfer.ok:
                delivered = xfer.source.size
            probe = (
                xfer.sent == 0
                and "tsize" in session.opts
                and (xfer.peer_error is not None or "superseded" in (xfer.error or ""))
            )
            return TransferStats(
                session.peer_ip, session.client[1], session.path, delivered,
                xfer.blocks_sent, xfer.retransmissions, duration, xfer.ok, xfer.error,
                "read", probe, dict(session.opts),
            )  # fmt: skip
        return TransferStats(
            session.peer_ip, session.client[1], session.path, xfer.bytes_received,
            xfer.blocks, xfer.retransmissions, duration, xfer.ok, xfer.error, "write",
            False, dict(session.opts),
        )  # fmt: skip

    def _store_upload(self, session: _Session, xfer: WriteTransfer, stats: TransferStats):
        target = session.upload_target
        data = bytes(xfer.received)
        if session.request.mode == "netascii":
            data = core.from_netascii(data)
        tmp = f"{target}.tftp-{os.getpid()}-{time.monotonic_ns()}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.link(tmp, target)  # fails if the name appeared meanwhile: never overwrite
        except OSError as exc:
            stats.ok = False
            stats.error = f"cannot store upload: {exc}"
            log.warning("TFTP upload %s: %s", target, exc)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _set_rcvbuf(sock: socket.socket, size: int) -> int:
    """Set SO_RCVBUF, using SO_RCVBUFFORCE (CAP_NET_ADMIN) to pass net.core.rmem_max."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    if force is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, force, size)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < size:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if got < size:  # Linux reports twice the requested value
        log.warning(
            "TFTP listen SO_RCVBUF is %d bytes (< %d); raise net.core.rmem_max", got, size
        )
    return got


def _raise_nofile_limit(wanted: int) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - non-Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))

"""Asyncio transport for TFTP: sockets, timers and the native hand-off.

What to do is decided elsewhere: which requests become transfers in the request layer
(:mod:`.sessions`), where their bytes come from in the file store (:mod:`.store`), what
each packet of a transfer means in the core (:mod:`.core`).  This module owns the sockets:
one listening socket receives requests; every admitted transfer gets its own UDP socket
(its TID).  A read transfer that has sent its OACK (or, without options, its first window)
goes on in the native data path (:mod:`.native`) when it is built.  Works with the default
event loop and uvloop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import socket
from collections.abc import Callable
from typing import Self

from ..logs import RateLimited, event
from ..udprecv import recv_batch, set_rcvbuf, socket_drops
from ..udpsend import loop_sender
from . import core, native
from .core import ERR_UNDEFINED, ERR_UNKNOWN_TID, End, MalformedPacket, ReadTransfer, WriteTransfer
from .sessions import (
    Counters,
    Limits,
    RequestError,
    Requests,
    Session,
    State,
    Step,
    TransferStats,
    busy_packet,
)
from .store import FileStore, Resolver

log = logging.getLogger("bootherd.tftp")

LISTEN_RCVBUF = 32 * 2**20  # bytes (tftp.rcvbuf); a burst overflows the 208 KiB default
TRANSFER_RCVBUF = 256 * 2**10
LISTEN_BATCH = 512  # datagrams read from the listen socket per readiness event
TRANSFER_BATCH = 64  # datagrams read from a transfer socket per readiness event
QUEUE_WAIT = 1.0  # seconds a request may wait for a free slot before "server busy"
MAX_UPLOAD = 64 * 2**20
MAX_WINDOWSIZE = 64


class _IO:
    """A session's share of the transport: its socket (read by a loop reader until the
    native data path takes it), its timer, its native handle and its source of bytes."""

    __slots__ = ("fd", "handle", "reading", "sock", "source", "timer", "timer_at",
                 "upload_target")  # fmt: skip

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.fd = -1  # the socket's number, for the native sender and the pump
        self.reading = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.handle: int | None = None  # while the native data path has the transfer
        self.source = None
        self.upload_target: str | None = None


class TFTPServer:
    """TFTP server (read requests, optional uploads) on one address/port.

    ``resolver(client_ip, path)`` (sync or async) may return bytes to serve instead of a
    file (per-node content); ``None`` falls through to the filesystem.
    ``on_transfer_done(stats)`` (sync or async) is called once per finished transfer.
    ``native_send``, ``udp_gso`` and ``native_data_path`` choose the native sending
    thread, GSO windows and the native data path, where the extensions are built.
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
        native_send: bool = True,
        udp_gso: bool = True,
        native_data_path: bool = True,
        log_requests: bool = False,
        bad_input_interval: float = 60.0,
    ):
        # One info line per request (log.requests = ["tftp"]); off, one attribute test.
        self.log_requests = log_requests
        self.bad_input = RateLimited(log, bad_input_interval)
        self.address = address
        self.port = port
        self.counters = Counters()
        self.store = FileStore(root, upload_dir=upload_dir, cache_bytes=cache_bytes,
                               resolver=resolver, counters=self.counters)  # fmt: skip
        self.requests = Requests(
            Limits(
                max_transfers=max_transfers, max_per_client=max_per_client,
                queue_wait=queue_wait,
                max_blksize=max(core.MIN_BLKSIZE, min(max_blksize, core.MAX_BLKSIZE)),
                max_windowsize=max_windowsize, default_timeout=default_timeout,
                retries=retries, max_upload=max_upload, uploads=upload_dir is not None,
            ),
            self.counters,
        )  # fmt: skip
        self.on_transfer_done = on_transfer_done
        self.listen_rcvbuf = listen_rcvbuf
        self.native_send = native_send
        self.udp_gso = udp_gso
        self.native_data_path = native_data_path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen_sock: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._to_prepare: collections.deque[Session] = collections.deque()  # admitted
        self._preparing = False
        self._housekeeper: asyncio.Task | None = None
        self._family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.rcvbuf = 0  # effective SO_RCVBUF of the listen socket after start()
        # DATA leaves from a native thread when the extension is built (udpsend.py).
        self.sender = None
        # Established reads go on in the native data path when it is built (native.py).
        self.pump = None
        self._native: dict[int, Session] = {}  # by pump handle
        self._native_seen = (0, 0)  # its (malformed, unknown TID) counts already in ours

    @property
    def root(self) -> str:
        return self.store.root

    @property
    def cache(self):
        return self.store.cache

    @property
    def active_transfers(self) -> int:
        return self.requests.active

    def listen_drops(self) -> int:
        """Requests the kernel dropped at the listen socket (its receive queue was full)."""
        return socket_drops(self._listen_sock) or 0 if self._listen_sock is not None else 0

    # -- lifecycle
    @property
    def local_address(self) -> tuple[str, int]:
        name = self._listen_sock.getsockname()
        return name[0], name[1]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.native_send:
            self.sender = loop_sender(self._loop, gso=self.udp_gso)
        _raise_nofile_limit(self.requests.limits.max_transfers + 512)
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            self.rcvbuf = set_rcvbuf(sock, self.listen_rcvbuf,
                                     f"TFTP {self.address}:{self.port}")
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
        if self.native_data_path:
            self.pump = native.make_pump(self.requests.limits.max_transfers, gso=self.udp_gso)
        self._native_seen = (0, 0)
        if self.pump is not None:
            self._loop.add_reader(self.pump.fileno(), self._on_pump_ready)
        self.port = self.local_address[1]
        self._housekeeper = self._loop.create_task(self._housekeeping())
        event(log, logging.INFO, "tftp listening", address=f"{self.address}:{self.port}",
              root=self.root, rcvbuf=self.rcvbuf)

    async def stop(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
            self._housekeeper = None
        for session in self.requests.stop():
            self._end(session, End.STOPPING, "server stopping")
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

    # -- requests
    def _send_error(self, addr, packet: bytes) -> None:
        if self._listen_sock is not None:
            try:
                self._listen_sock.sendto(packet, addr)
            except OSError as exc:  # full send buffer: the client retries its request
                log.debug("TFTP error to %s not sent: %s", addr, exc)

    def _on_listen_readable(self) -> None:
        sock = self._listen_sock
        if sock is None:
            return
        try:
            batch = recv_batch(sock, LISTEN_BATCH, 4096)  # requests are < 4 KiB
        except OSError as exc:
            log.debug("TFTP listen socket: %s", exc)
            return
        for data, addr, _ts in batch:
            try:
                self._on_request(data, addr)
            except Exception:
                self.counters.internal_errors += 1
                log.exception("TFTP request from %s", addr)

    def _on_request(self, data: bytes, addr) -> None:
        now = self._loop.time()
        malformed = self.counters.malformed
        arrival = self.requests.receive(data, (addr[0], addr[1]), now)
        if self.counters.malformed != malformed:
            self.bad_input(addr[0], "tftp bad input", what="malformed", remote=addr[0],
                           bytes=len(data))
        if arrival.supersedes is not None:
            self._end(arrival.supersedes, End.SUPERSEDED, "superseded by a new request")
        if arrival.reply is not None:
            if self.log_requests:
                event(log, logging.INFO, "tftp request", remote=addr[0], port=addr[1],
                      outcome="refused", error=_error_text(arrival.reply))
            self._send_error(addr, arrival.reply)
        if arrival.session is not None:
            self._carry_out(self.requests.place(arrival.session, now))

    def _carry_out(self, step: Step) -> None:
        """Answer refused sessions ``busy``; prepare admitted ones."""
        for s in step.refused:
            self._send_error(s.client, busy_packet())
        # Prepared one after the other, not within each other: a refused session frees a
        # slot that admits the next, which may be refused too, and so on down the queue.
        self._to_prepare.extend(step.start)
        if self._preparing:
            return
        self._preparing = True
        try:
            while self._to_prepare:
                self._prepare(self._to_prepare.popleft())
        finally:
            self._preparing = False

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(min(0.2, self.requests.limits.queue_wait / 2 or 0.2))
            try:
                self._carry_out(self.requests.expire(self._loop.time()))
                self._count_native()
            except Exception:
                log.exception("TFTP housekeeping")

    def _prepare(self, session: Session) -> None:
        """An admitted session: its file (or upload target), its transfer, its socket.
        At once, unless the store must wait (an async resolver, a first read on a
        thread): then the rest is a task."""
        io = session.io = _IO()
        req = session.request
        try:
            if session.is_read:
                opened = self.store.open_now(session.peer_ip, req.filename,
                                             netascii=req.mode == "netascii")  # fmt: skip
                if not isinstance(opened, tuple):
                    return self._later(session, opened)
                if self._read_transfer(session, opened):
                    return self._later(session, None)
            else:
                session.path, io.upload_target = self.store.upload_target(req.filename)
                self.requests.write_transfer(session)
        except Exception as exc:  # noqa: BLE001 - every failure is answered (_not_prepared)
            return self._not_prepared(session, exc)
        self._start(session)

    def _read_transfer(self, session: Session, opened) -> bool:
        """The read transfer of an opened file; True if its bytes must be loaded first (a
        plain request, whose DATA 1 is due at once, of a large file not cached)."""
        session.path, session.io.source = opened
        xfer = self.requests.read_transfer(session, session.io.source)
        return xfer.oack is None and self.store.needs_thread(session.io.source)

    def _later(self, session: Session, opening) -> None:
        self._spawn(self._prepare_later(session, opening))

    def _spawn(self, coro) -> None:
        """A task the server keeps until it is done (and cancels at stop)."""
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prepare_later(self, session: Session, opening) -> None:
        """The rest of :meth:`_prepare` once the store has answered (``opening``, None if
        it had) and a first read that must happen before DATA 1 is done."""
        io = session.io
        try:
            if opening is not None:
                opened = await opening
                if session.state is State.ENDED:  # superseded or stopped meanwhile
                    io.source = opened[1]
                    return _close_source(io)
                self._read_transfer(session, opened)
            if session.xfer.oack is None:  # DATA 1 leaves with start(): the bytes are due
                await self.store.load(io.source)
        except Exception as exc:  # noqa: BLE001 - every failure is answered (_not_prepared)
            return self._not_prepared(session, exc)
        if session.state is State.ENDED:
            return _close_source(io)
        self._start(session)

    def _not_prepared(self, session: Session, exc: Exception) -> None:
        """A session whose file or transfer could not be set up: its ERROR."""
        if isinstance(exc, RequestError):
            return self._refuse(session, exc)
        if isinstance(exc, core.SourceChanged):
            return self._refuse(session, RequestError(ERR_UNDEFINED, str(exc)))
        self.counters.internal_errors += 1
        log.error("TFTP request %r from %s", session.request.filename, session.client,
                  exc_info=exc)  # fmt: skip
        self._refuse(session, RequestError(ERR_UNDEFINED, f"internal error: {exc}"))

    def _start(self, session: Session) -> None:
        """A prepared session: its socket (TID), then its first packets."""
        io = session.io
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TRANSFER_RCVBUF)
            sock.bind((self.address, 0))
        except OSError as exc:
            sock.close()
            self.counters.internal_errors += 1
            log.warning("TFTP: no transfer socket for %s: %s", session.client, exc)
            session.xfer = None
            self._end(session)
            self._send_error(session.client, busy_packet())
            return
        io.sock = sock
        io.fd = sock.fileno()
        session.state = State.RUNNING
        try:
            pkts, deadline = session.xfer.start(self._loop.time())
        except Exception as exc:  # noqa: BLE001
            self._internal_failure(session, exc)
            return
        self._advance(session, pkts, deadline)
        if session.state is State.RUNNING:  # not handed over at its OACK: the loop reads
            self._read(session, True)

    def _refuse(self, session: Session, error: RequestError) -> None:
        """A session that gets an ERROR instead of a transfer."""
        _close_source(session.io)
        if session.state is State.ENDED:
            return
        session.xfer = None
        if self.log_requests:
            event(log, logging.INFO, "tftp request", remote=session.client[0],
                  port=session.client[1], file=session.request.filename,
                  op="read" if session.is_read else "write", outcome="refused",
                  code=error.code, error=error.message)
        reply, step = self.requests.refuse(session, error)
        self._send_error(session.client, reply)
        self._carry_out(step)

    # -- transfer sockets
    def _read(self, session: Session, on: bool) -> None:
        """Start or stop reading a transfer socket from the loop (the native data path
        reads it while it has the transfer)."""
        io = session.io
        if on and not io.reading and io.sock is not None and io.sock.fileno() >= 0:
            self._loop.add_reader(io.fd, self._on_readable, session)
            io.reading = True
        elif not on and io.reading:
            io.reading = False
            self._loop.remove_reader(io.fd)

    def _on_readable(self, session: Session) -> None:
        """Datagrams on a transfer socket that Python still serves."""
        io = session.io
        sock = io.sock
        peer = session.client
        xfer = session.xfer
        if (self.pump is not None and isinstance(xfer, ReadTransfer) and xfer.oack_pending
                and self._ack0_queued(session) and self._hand_over_at_ack0(session)):  # fmt: skip
            return
        for _ in range(TRANSFER_BATCH):
            if session.state is not State.RUNNING or not io.reading:
                return
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error reported on the socket: the timer copes
                log.debug("transfer socket for %s: %s", peer, exc)
                return
            if addr != peer and addr[:2] != peer:
                self._unknown_tid(sock, data, addr)
                continue
            xfer = session.xfer
            if (len(data) >= 4 and data[0] == 0 and data[1] == core.ACK
                    and isinstance(xfer, ReadTransfer)
                    and xfer.oack_pending and self.store.needs_thread(io.source)):  # fmt: skip
                # The ACK of the OACK: DATA 1 is due, and a large file is first read on a
                # thread.  The socket waits meanwhile (its datagrams stay queued).
                self._read(session, False)
                self._spawn(self._load_then(session, data))
                return
            self._feed(session, data)

    @staticmethod
    def _ack0_queued(session: Session) -> bool:
        """Is the next datagram on a read's socket its peer's ACK of the OACK?  Peeked:
        it stays queued."""
        try:
            data, addr = session.io.sock.recvfrom(4, socket.MSG_PEEK)
        except OSError:
            return False
        return data == b"\0\4\0\0" and (addr == session.client or addr[:2] == session.client)

    def _hand_over_at_ack0(self, session: Session) -> bool:
        """ACK 0 is queued: DATA 1 is due.  Once the file's bytes are ready (the first read
        of a large one on a thread, the socket unread meanwhile), the transfer goes to the
        native data path with the ACK still queued, for the pump to answer.  False if it
        stays here (the loop then reads the ACK)."""
        io = session.io
        if self.store.needs_thread(io.source):
            self._read(session, False)
            self._spawn(self._load_then(session, None))
            return True
        try:
            if not self.store.ready_unread(io.source):
                self.store.load_now(io.source)
        except (OSError, core.SourceChanged):  # the core meets it again and ends the transfer
            return False
        return self._handed_over(session)

    async def _load_then(self, session: Session, ack: bytes | None) -> None:
        """A large file's first read on a thread, then the ACK of the OACK: fed to the
        core, or (``ack`` None: it is still queued) left to the native data path, which
        the transfer goes to."""
        try:
            await self.store.load(session.io.source)
        except Exception as exc:  # noqa: BLE001
            if session.state is State.RUNNING:
                self._internal_failure(session, exc)
            return
        if session.state is not State.RUNNING:
            return
        if ack is not None:
            self._feed(session, ack)
        elif self._handed_over(session):
            return
        if session.state is State.RUNNING:
            self._read(session, True)

    def _feed(self, session: Session, data: bytes) -> None:
        """One datagram from the transfer's peer, to its core."""
        try:
            pkts, deadline = session.xfer.on_packet(data, self._loop.time())
        except MalformedPacket:
            self.counters.malformed += 1
            return
        except Exception as exc:  # noqa: BLE001 - a bad file must not take the server down
            self._internal_failure(session, exc)
            return
        self._advance(session, pkts, deadline)

    def _advance(self, session: Session, pkts: list[bytes], deadline: float | None) -> None:
        """Send what an event produced; then end the transfer, hand it to the native data
        path (a read that has sent its OACK or first window) or arm its timer."""
        self._send(session, pkts, deadline is None)
        if deadline is None:
            self._end(session)
        elif self._handed_over(session):
            return
        elif session.io.timer is None or deadline < session.io.timer_at:
            self._arm(session, deadline)

    def _handed_over(self, session: Session) -> bool:
        """Give a read to the native data path once its OACK is out (if its bytes are
        ready without reading any: a cached file, say) or its first window; False if
        there is none, the transfer is not such a read, or the pump cannot take it."""
        xfer = session.xfer
        if self.pump is None or not isinstance(xfer, ReadTransfer):
            return False
        io = session.io
        if xfer.sent == 0:  # the OACK: the first read of a file not cached waits for ACK 0
            try:
                if not (xfer.oack_pending and self.store.ready_unread(io.source)):
                    return False
            except (OSError, core.SourceChanged):  # the file's first read will say so
                return False
        buffer, file_fd = io.source.native_source()
        self._read(session, False)
        try:
            handle = native.hand_over(self.pump, io.fd, session.client, xfer, buffer, file_fd,
                                      self._loop.time())  # fmt: skip
        except (ValueError, OverflowError, OSError) as exc:
            log.debug("TFTP transfer %s stays in Python: %s", session.client, exc)
            self._read(session, True)
            return False
        if io.timer is not None:
            io.timer.cancel()
            io.timer = None
        io.handle = handle
        session.state = State.NATIVE
        self._native[handle] = session
        self.counters.native_transfers += 1
        return True

    # -- the native data path
    def _take_back(self, session: Session) -> None:
        """Cancel a transfer in the native data path and adopt what it did."""
        io = session.io
        handle, io.handle = io.handle, None
        self._native.pop(handle, None)
        outcome = self.pump.cancel(handle)
        if outcome is not None:
            session.xfer.adopt(native.progress(outcome, self._loop.time()))

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
        now = self._loop.time()
        for handle, outcome in self.pump.collect():
            session = self._native.pop(handle, None)
            if session is None:
                continue
            try:
                session.io.handle = None
                session.xfer.adopt(native.progress(outcome, now))
                self._end(session)
            except Exception:  # the other outcomes of this batch must still be ended
                self.counters.internal_errors += 1
                log.exception("TFTP transfer %s after the native data path", session.client)

    # -- timers and sends
    def _arm(self, session: Session, deadline: float) -> None:
        io = session.io
        if io.timer is not None:
            io.timer.cancel()
        io.timer_at = deadline
        io.timer = self._loop.call_at(deadline, self._on_timer, session)

    def _on_timer(self, session: Session) -> None:
        session.io.timer = None
        if session.state is not State.RUNNING:
            return
        try:
            pkts, deadline = session.xfer.on_timer(self._loop.time())
        except Exception as exc:  # noqa: BLE001
            self._internal_failure(session, exc)
            return
        self._advance(session, pkts, deadline)

    def _send(self, session: Session, pkts: list[bytes], last: bool = False) -> None:
        """Queue pkts for the client; ``last`` packets (a final ACK, say) go at once, as
        the socket closes right after them."""
        if not pkts:
            return
        sender = self.sender
        io = session.io
        if sender is None or last:
            self._forget_sends(io)
            sendto = io.sock.sendto
            client = session.client
            for p in pkts:
                try:
                    sendto(p, client)
                except OSError as exc:  # full buffer, unreachable: the timer copes
                    log.debug("TFTP send to %s: %s", client, exc)
            return
        sender.send_many(io.fd, pkts, session.client)

    def _forget_sends(self, io: _IO) -> None:
        """Before the transfer socket closes: its queued DATA is moot, and its number may
        be reused at once by a new transfer."""
        if self.sender is not None and io.fd >= 0:
            self.sender.forget(io.fd)

    # -- endings
    def _unknown_tid(self, sock: socket.socket, data: bytes, addr) -> None:
        self.counters.unknown_tid += 1
        if len(data) >= 2 and data[0] == 0 and data[1] == core.ERROR:
            return
        with contextlib.suppress(OSError):
            sock.sendto(core.encode_error(ERR_UNKNOWN_TID, "unknown transfer ID"), addr)

    def _internal_failure(self, session: Session, exc: Exception) -> None:
        if isinstance(exc, core.SourceChanged):
            end, msg = End.FILE_CHANGED, "file changed during transfer"
        else:
            self.counters.internal_errors += 1
            log.exception("TFTP transfer %s %r", session.client, session.path, exc_info=exc)
            end, msg = End.INTERNAL, f"internal error: {exc}"
        io = session.io
        if io.sock is not None:
            self._forget_sends(io)
            with contextlib.suppress(OSError):
                io.sock.sendto(core.encode_error(ERR_UNDEFINED, msg), session.client)
        self._end(session, end, msg)

    def _end(self, session: Session, end: End | None = None, message: str = "") -> None:
        """The one way a session ends: its transfer taken back from the native data path
        and ended (as ``end``, if it still runs), its socket closed, an upload stored, its
        slot freed for the queue, its stats reported."""
        if session.state is State.ENDED:
            return
        io = session.io
        xfer = session.xfer
        if io is not None:
            if io.handle is not None:
                self._take_back(session)
            if io.timer is not None:
                io.timer.cancel()
                io.timer = None
            if io.sock is not None:
                self._read(session, False)
                self._forget_sends(io)
                io.sock.close()
        now = self._loop.time()
        if xfer is not None and end is not None:
            xfer.abandon(now, end, message)
        failure = None
        if isinstance(xfer, WriteTransfer) and xfer.ok:
            try:
                self.store.save_upload(io.upload_target, bytes(xfer.received),
                                       netascii=session.request.mode == "netascii")
            except OSError as exc:
                log.warning("TFTP upload %s: %s", io.upload_target, exc)
                failure = (End.STORE_FAILED, f"cannot store upload: {exc}")
        _close_source(io)
        stats, step = self.requests.end(session, now, failure)
        self._carry_out(step)
        if stats is not None:
            self._report(stats)

    def _report(self, stats: TransferStats) -> None:
        if self.log_requests:
            event(log, logging.INFO, "tftp request", remote=stats.client_ip,
                  port=stats.client_port, file=stats.path, op=stats.direction,
                  outcome="ok" if stats.ok else "probe" if stats.probe else "failed",
                  bytes=stats.bytes, seconds=round(stats.duration, 6),
                  retries=stats.retries, error=stats.error or "")
        cb = self.on_transfer_done
        if cb is None:
            return
        try:
            res = cb(stats)
            if inspect.isawaitable(res):
                self._spawn(res)
        except Exception:
            log.exception("on_transfer_done callback")


def _error_text(packet: bytes) -> str:
    try:
        pkt = core.parse_packet(packet)
    except MalformedPacket:
        return ""
    return getattr(pkt, "message", "")


def _close_source(io: _IO | None) -> None:
    if io is None:
        return
    src, io.source = io.source, None
    if src is not None and hasattr(src, "close"):
        src.close()


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

"""Thin asyncio transports for the imaging cores: the server's sockets and timer, and the
operator's receiver (`bootherd image receive`).

The server has one unicast control socket (JOIN, REQUEST, LEAVE and their answers) and
one socket that sends every session's DATA to the deployment's multicast group, from the
interface that holds ``interface_address``.  Datagrams leave through the native sending
thread (bootherd.udpsend, UDP GSO for runs of equal-sized datagrams) when it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import random
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import udprecv, udpsend
from . import format as fmt
from . import receiver as rc
from . import sessions as sv

log = logging.getLogger("bootherd.imaging")

BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # root may pass rmem_max
RCVBUF = 32 << 20  # ~1.5 s at 100 Mbit/s: room for a receiver starved of CPU
# The server's control socket: a reload of 1,000 nodes JOINs at once, and every receiver
# REQUESTs about twice a second (a default 208 KiB buffer held a few hundred).
CONTROL_RCVBUF = 8 << 20
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_MEMINFO = struct.Struct("9I")  # rmem_alloc, rcvbuf, ..., drops (linux/sock_diag.h)


def socket_fill(sock: socket.socket) -> tuple[int, int]:
    """(percent of the receive buffer in use, datagrams dropped) of a socket; (0, 0) if
    the kernel does not say."""
    try:
        mi = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size))
    except (OSError, struct.error):
        return 0, 0
    return (mi[0] * 100 // mi[1] if mi[1] else 0), mi[8]


class _Control(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]):
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from a receiver that went away


def multicast_sender(interface_address: str, ttl: int, loopback: bool) -> socket.socket:
    """A UDP socket whose multicast leaves through the interface holding the address."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                     socket.inet_aton(interface_address))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1 if loopback else 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.bind((interface_address, 0))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class ImagingServer:
    """The server core on sockets.  ``open_image(name)`` runs in a thread and returns an
    :class:`sessions.ImageSource` or raises LookupError / ImageError with the reason."""

    def __init__(self, core: sv.Server, *, address: str, port: int, interface_address: str,
                 ttl: int = 1, loopback: bool = True,
                 open_image: Callable[[str], sv.ImageSource],
                 on_ended: Callable[[sv.Ended], None] | None = None):
        self.core = core
        self.address = address
        self.port = port
        self.interface_address = interface_address
        self.ttl = ttl
        self.loopback = loopback
        self.open_image = open_image
        self.on_ended = on_ended
        self.control: asyncio.DatagramTransport | None = None
        self.mcast: socket.socket | None = None
        self.sender: udpsend.LoopSender | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._kicked = False
        self.send_errors = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.mcast = multicast_sender(self.interface_address, self.ttl, self.loopback)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udprecv.set_rcvbuf(sock, CONTROL_RCVBUF, f"imaging control {self.address}:{self.port}")
            sock.bind((self.address, self.port))
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Control(self._datagram), sock=sock)
        except OSError as e:
            sock.close()
            self.mcast.close()
            raise OSError(e.errno, f"imaging: cannot bind {self.address}:{self.port}: "
                                   f"{e.strerror}") from None
        self.control = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]
        self.sender = udpsend.loop_sender(loop, gso=True)

    async def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self.control:
            self.control.close()
        if self.sender and self.mcast:
            self.sender.forget(self.mcast.fileno())
            self.sender.close()
        if self.mcast:
            self.mcast.close()
        self._effects(self.core.end_all("server stopping"))
        self.control = self.mcast = self.sender = None

    # -- events

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self._effects(self.core.datagram(time.monotonic(), addr, data))
        self._kick()

    def _kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._poll)

    def _poll(self) -> None:
        self._kicked = False
        if self._timer:
            self._timer.cancel()
            self._timer = None
        if self.control is None:
            return
        now = time.monotonic()
        effects, deadline = self.core.poll(now)
        self._effects(effects)
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, deadline - now), self._poll)

    def _effects(self, effects: list[sv.Effect]) -> None:
        for e in effects:
            if isinstance(e, sv.Send):
                if e.addr[0] == self.core.group:
                    self._multicast(e.packets, e.addr)
                elif self.control is not None:
                    for p in e.packets:
                        self.control.sendto(p, e.addr)
            elif isinstance(e, sv.OpenImage):
                asyncio.ensure_future(self._open(e.image))
            elif isinstance(e, sv.Ended):
                log.info("imaging session ended session=%08x image=%s reason=%s",
                         e.session, e.image, e.reason)
                close = getattr(e.source, "close", None)
                if close:
                    close()
                if self.on_ended:
                    self.on_ended(e)

    async def _open(self, name: str) -> None:
        try:
            source = await asyncio.to_thread(self.open_image, name)
            effects = self.core.opened(time.monotonic(), name, source)
            if name not in self.core.by_image:  # refused (no free port): not kept
                getattr(source, "close", lambda: None)()
            else:
                log.info("imaging session started image=%s", name)
        except (LookupError, fmt.ImageError, OSError) as e:
            msg = e.args[0] if isinstance(e, LookupError) and e.args else str(e)
            effects = self.core.opened(time.monotonic(), name, None,
                                       f"damaged image: {msg}" if isinstance(e, fmt.ImageError)
                                       else str(msg))
        self._effects(effects)
        self._kick()

    def _multicast(self, packets: list[bytes], addr: tuple[str, int]) -> None:
        assert self.mcast is not None
        if self.sender is not None:
            fd = self.mcast.fileno()
            start = 0
            full = len(packets[0])
            for i, p in enumerate(packets):  # GSO runs: equal sizes, a short one ends a run
                if len(p) != full:
                    self.sender.send_many(fd, packets[start:i + 1], addr)
                    start = i + 1
                    if start < len(packets):
                        full = len(packets[start])
            if start < len(packets):
                self.sender.send_many(fd, packets[start:], addr)
            return
        for p in packets:
            try:
                self.mcast.sendto(p, addr)
            except BlockingIOError:
                self.send_errors += 1
            except OSError as e:
                self.send_errors += 1
                if e.errno not in (errno.ENOBUFS, errno.ENETUNREACH):
                    raise


class FileImage:
    """An image file as the server core reads it."""

    def __init__(self, path: str | os.PathLike, header: fmt.Header | None = None):
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.header = header or fmt.read_header(path)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, chunk: int) -> bytes:
        c = self.header.chunks[chunk]
        return os.pread(self.fd, c.stored_len, c.offset)

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------- receiving


def join_group(group: str, port: int, interface_address: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        s.bind((group, port))
        mreq = socket.inet_aton(group) + socket.inet_aton(interface_address)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class DiskWriter:
    """The receiver's output: a regular file (sparse, skipped chunks read as zeros) or a
    block device (skipped chunks zeroed with BLKZEROOUT, or written as zeros)."""

    def __init__(self, path: str, disk_size: int | None = None):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self.block = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        self.size = 0
        if disk_size is not None:
            self.prepare(disk_size)

    def prepare(self, disk_size: int) -> None:
        self.size = disk_size
        if self.block:
            have = os.lseek(self.fd, 0, os.SEEK_END)
            if have < disk_size:
                raise ValueError(f"{self.path}: device has {have} bytes, the image needs {disk_size}")
        else:
            os.ftruncate(self.fd, 0)  # old content must not show through skipped chunks
            os.ftruncate(self.fd, disk_size)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, offset: int, length: int) -> None:
        if not self.block:
            return  # a fresh sparse file already reads as zeros
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        except OSError:
            self.write(offset, bytes(length))

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


@dataclass
class ReceiveResult:
    ok: bool
    message: str
    via: str
    seconds: float
    stats: rc.Stats
    sha256: str


class _Data(asyncio.DatagramProtocol):
    def __init__(self, sink: Callable[[bytes], None]):
        self.sink = sink

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sink(data)


class ReceiveRun:
    """One `bootherd image receive`: the receiver core on sockets, HTTP and a disk."""

    def __init__(self, core: rc.Receiver, *, server: str, port: int, output: str,
                 http_port: int, interface_address: str = "", drop: float = 0.0,
                 report_url: str = "", verify: bool = True,
                 progress: Callable[[rc.Progress], None] | None = None):
        self.core = core
        self.server = server
        self.port = port
        self.output = output
        self.http_port = http_port
        self.interface_address = interface_address
        self.drop = drop
        self.report_url = report_url
        self.verify = verify
        self.progress_cb = progress
        self.rng = random.Random()
        self.done = asyncio.Event()
        self.result: rc.Finished | None = None
        self.disk: DiskWriter | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._control: asyncio.DatagramTransport | None = None
        self._data: asyncio.DatagramTransport | None = None
        self._data_sock: socket.socket | None = None
        self._since_look = 0
        self._http: Any = None
        self._tasks: set[asyncio.Task] = set()
        self._last_report = 0.0
        self._last_progress: rc.Progress | None = None

    async def run(self, timeout: float | None = None) -> ReceiveResult:
        import aiohttp

        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Control(lambda d, a: self._feed(self.core.control, d)),
                remote_addr=(self.server, self.port))
            self._control = transport  # type: ignore[assignment]
            if not self.interface_address:
                self.interface_address = transport.get_extra_info("sockname")[0]
            self._effects(self.core.start(time.monotonic()))
            self._reschedule()
            await asyncio.wait_for(self.done.wait(), timeout)
        finally:
            for t in list(self._tasks):
                t.cancel()
            if self._timer:
                self._timer.cancel()
            if self._control:
                self._control.close()
            if self._data:
                self._data.close()
            await self._http.close()
        res = self.result or rc.Finished(False, "timed out", b"")
        digest = ""
        ok = res.ok
        msg = res.message
        if self.disk is not None:
            await asyncio.to_thread(self.disk.close)
            if ok and self.verify and self.core.header is not None:
                got = await asyncio.to_thread(rc.sha256_of, self.output, self.core.header.disk_size)
                digest = got.hex()
                if got != self.core.header.image_sha256:
                    ok, msg = False, f"written disk SHA-256 {digest} is not the image's"
        await self._report(final=True)
        return ReceiveResult(ok, msg, self.core.via, time.monotonic() - t0, self.core.stats, digest)

    # -- plumbing

    def _feed(self, fn: Callable[[float, bytes], list[rc.Effect]], data: bytes) -> None:
        self._effects(fn(time.monotonic(), data))
        self._reschedule()

    def _on_data(self, data: bytes) -> None:
        if self.drop and self.rng.random() < self.drop:
            return  # injected loss (tests, benches)
        self._since_look += 1
        if self._since_look >= 64 and self._data_sock is not None:
            self._since_look = 0
            self._effects(self.core.note_backlog(time.monotonic(),
                                                 *socket_fill(self._data_sock)))
        self._effects(self.core.data(time.monotonic(), data))
        if self.core.finished is not None or self._timer is None:
            self._reschedule()

    def _reschedule(self) -> None:
        if self._timer:
            self._timer.cancel()
            self._timer = None
        when = self.core.wakeup()
        if when is not None and not self.done.is_set():
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, when - time.monotonic()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        effects, _ = self.core.poll(time.monotonic())
        self._effects(effects)
        self._reschedule()

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None and not self.done.is_set():
            log.error("receiver task failed", exc_info=t.exception())
            self.result = rc.Finished(False, f"internal error: {t.exception()!r}", b"")
            self.done.set()

    def _effects(self, effects: list[rc.Effect]) -> None:
        for e in effects:
            if isinstance(e, rc.Control):
                if self._control is not None:
                    self._control.sendto(e.data)
            elif isinstance(e, rc.Write):
                self._disk().write(e.offset, e.data)
            elif isinstance(e, rc.Zero):
                self._disk().zero(e.offset, e.length)
            elif isinstance(e, rc.Listen):
                self._listen(e)
            elif isinstance(e, rc.FetchIndex):
                self._spawn(self._fetch_index(e.header_len))
            elif isinstance(e, rc.FetchChunks):
                self._spawn(self._fetch_chunks(e.chunks))
            elif isinstance(e, rc.Progress):
                self._progress(e)
            elif isinstance(e, rc.Finished):
                self.result = e
                self.done.set()

    def _disk(self) -> DiskWriter:
        if self.disk is None:
            assert self.core.header is not None
            self.disk = DiskWriter(self.output, self.core.header.disk_size)
        return self.disk

    def _listen(self, e: rc.Listen) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = join_group(e.group, e.port, self.interface_address)
        except OSError as exc:
            log.warning("cannot join %s:%d on %s: %s", e.group, e.port, self.interface_address, exc)
            return  # the core's data timeout falls back to HTTP
        self._data_sock = sock
        self._spawn(self._open_data(loop, sock))

    async def _open_data(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._data, _ = await loop.create_datagram_endpoint(lambda: _Data(self._on_data),
                                                            sock=sock)

    # -- HTTP

    def _url(self) -> str:
        port = self.core.joined.http_port if self.core.joined and self.core.joined.http_port \
            else self.http_port
        return f"http://{self.server}:{port}/images/{self.core.image}"

    async def _get(self, first: int, last: int) -> bytes:
        async with self._http.get(self._url(), headers={"Range": f"bytes={first}-{last}"}) as r:
            if r.status == 503:
                await asyncio.sleep(float(r.headers.get("Retry-After", "2")))
                return await self._get(first, last)
            if r.status != 206:
                raise OSError(f"HTTP {r.status} for {self._url()}")
            return await r.read()

    async def _fetch_index(self, header_len: int) -> None:
        try:
            if not header_len:
                head = await self._get(0, fmt.HEADER_LEN - 1)
                header_len = struct.unpack_from("!I", head, 12)[0] if len(head) >= 16 else 0
                if header_len < fmt.HEADER_LEN:
                    raise OSError("not a bootherd image")
            meta = await self._get(0, header_len - 1)
            effects = self.core.index(time.monotonic(), meta)
        except Exception as e:  # noqa: BLE001 - OSError, timeouts, aiohttp's client errors
            effects = self.core.index(time.monotonic(), None, str(e) or type(e).__name__)
        self._effects(effects)
        self._reschedule()

    async def _fetch_chunks(self, chunks: tuple[int, ...]) -> None:
        h = self.core.header
        assert h is not None
        i = 0
        while i < len(chunks):  # runs of adjacent stored chunks in one ranged GET
            j = i
            while j + 1 < len(chunks) and chunks[j + 1] == chunks[j] + 1 \
                    and h.chunks[chunks[j + 1]].offset + h.chunks[chunks[j + 1]].stored_len \
                    - h.chunks[chunks[i]].offset <= 16 << 20:
                j += 1
            first, last = h.chunks[chunks[i]], h.chunks[chunks[j]]
            i, run = j + 1, chunks[i:j + 1]
            if last.offset + last.stored_len == first.offset:
                for c in run:  # nothing stored (cannot happen: skipped chunks are done)
                    self._effects(self.core.http_chunk(time.monotonic(), c, b""))
                continue
            try:
                blob = await self._get(first.offset, last.offset + last.stored_len - 1)
            except Exception:  # noqa: BLE001 - counted as a failed fetch per chunk
                blob = None
            for c in run:
                ch = h.chunks[c]
                piece = None if blob is None else blob[ch.offset - first.offset:
                                                       ch.offset - first.offset + ch.stored_len]
                self._effects(self.core.http_chunk(time.monotonic(), c, piece))
            if self.done.is_set():
                return

    # -- progress

    def _progress(self, p: rc.Progress) -> None:
        self._last_progress = p
        if self.progress_cb:
            self.progress_cb(p)
        now = time.monotonic()
        if self.report_url and (now - self._last_report >= 2.0 or p.state in ("done", "failed")):
            self._last_report = now
            self._spawn(self._report())

    async def _report(self, final: bool = False) -> None:
        """POST the progress as JSON to the report URL (bootherd's /images/NAME/progress)."""
        p = self._last_progress
        if not self.report_url or p is None or self._http is None or self._http.closed:
            return
        body = {"image": self.core.image, "state": p.state, "done_chunks": p.done,
                "chunks": p.chunks, "bytes_written": p.bytes_written, "via": p.via,
                "receiver": self.core.id}
        if final and self.result is not None:
            body["message"] = self.result.message
        with contextlib.suppress(Exception):
            async with self._http.post(self.report_url, data=json.dumps(body),
                                       headers={"Content-Type": "application/json"}) as r:
                await r.read()


def print_progress(stream: Any = sys.stderr) -> Callable[[rc.Progress], None]:
    last = [0.0, ""]

    def show(p: rc.Progress) -> None:
        now = time.monotonic()
        if p.state == last[1] and now - last[0] < 1.0:
            return
        last[0], last[1] = now, p.state
        pct = 100.0 * p.done / p.chunks if p.chunks else 0.0
        print(f"{p.state}: {p.done}/{p.chunks} chunks ({pct:.0f}%), "
              f"{p.bytes_written >> 20} MiB written via {p.via}", file=stream, flush=True)
    return show

"""File distribution: tarballs, RPMs, kernels, initrds and images over HTTP.

Three pieces, kept apart so each can be tested alone:

- `resolve(root, rel)`: the only way a request path becomes a file path, by
  the confinement rule TFTP follows too (`bootherd.fileroot`).  Nothing outside
  `root` is ever returned (``..``, absolute paths, NUL, symlinks leading out).
- `Admission`: at most N concurrent large transfers; above it the caller
  answers 503 + Retry-After instead of queueing sockets in the kernel.  Small
  files never consult it, so scripts and configs keep flowing during a storm.
- `Hasher`: SHA-256 per file, cached on (path, mtime, size), computed on one
  dedicated thread so hashing a 4 GB image never starves the default executor
  that aiohttp uses to stat and open the files it sends.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import os
import socket
import stat
import threading
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ..fileroot import Refused, confine

log = logging.getLogger("bootherd.web.files")


def resolve(root: Path, rel: str) -> Path:
    """The real path of `rel` inside `root`.

    Raises Refused for escape attempts and FileNotFoundError when there is no
    such regular file.  `rel` is the already percent-decoded path.
    """
    return resolve_stat(root, rel)[0]


@functools.lru_cache(maxsize=64)
def _real_root(root: Path) -> str:
    # Once per root and process: realpath walks from "/" with an lstat per component.
    # A root moved while serving keeps being served where it was; nothing leaves it.
    return os.path.realpath(root)


def resolve_stat(root: Path, rel: str) -> tuple[Path, os.stat_result]:
    """resolve() and the file's stat in one go."""
    real = confine(_real_root(root), rel)  # the rule TFTP follows too
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(rel)
    return Path(real), st


class Admission:
    """Gate for large transfers: `limit` at once, then a short FIFO queue.

    A request that finds every slot busy waits in line (at most `max_queued`
    of them, each at most `queue_timeout` seconds); a freed slot goes straight
    to the head of the line, so the link never idles between transfers.  Past
    the line's length or its time limit the caller answers 503 + Retry-After.
    """

    def __init__(self, limit: int, max_queued: int = 0, queue_timeout: float = 0.0):
        self.limit = limit
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.active = 0
        self.admitted = 0
        self.refused = 0
        self.queued = 0  # requests that had to wait (then admitted or refused)
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """A slot now, or False (never waits)."""
        if self.active >= self.limit or self._waiters:
            self.refused += 1
            return False
        self.active += 1
        self.admitted += 1
        return True

    async def acquire(self) -> bool:
        """A slot now, or after waiting in line; False means answer 503."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            self.admitted += 1
            return True
        if len(self._waiters) >= self.max_queued or self.queue_timeout <= 0:
            self.refused += 1
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(fut)
        self.queued += 1
        timer = loop.call_later(self.queue_timeout, _set_false, fut)
        try:
            ok = await fut
        except asyncio.CancelledError:
            # The slot may have been handed over just before the cancel landed.
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()
            raise
        finally:
            timer.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass
        if not ok:
            self.refused += 1
        return ok

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(True)  # the slot changes hands; active stays
                self.admitted += 1
                return
        self.active -= 1


def _set_false(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


@dataclass(frozen=True, slots=True)
class _Key:
    mtime_ns: int
    size: int


class Hasher:
    """SHA-256 of files under one root, cached on (relpath, mtime, size).

    `lookup(rel)` is synchronous and cheap (one resolve and stat, none when the
    caller has the file's stat): it answers from the cache or schedules the
    computation and returns None, so TMCD can call it on its hot path.
    `digest(rel)` awaits the computation.
    """

    CHUNK = 1 << 20

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, tuple[_Key, str]] = {}
        self._pending: dict[str, Future[str | None]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bootherd-sha256")
        self.computed = 0

    @staticmethod
    def _norm(rel: str) -> str:
        return rel.lstrip("/")

    def _key(self, rel: str) -> tuple[Path, _Key] | None:
        try:
            path, st = resolve_stat(self.root, rel)
        except (OSError, Refused):
            return None
        return path, _Key(st.st_mtime_ns, st.st_size)

    def _known(self, rel: str, key: _Key) -> str | None:
        hit = self._cache.get(rel)
        return hit[1] if hit is not None and hit[0] == key else None

    def cached(self, rel: str) -> str | None:
        """The digest if known and the file unchanged; never schedules work."""
        rel = self._norm(rel)
        k = self._key(rel)
        return self._known(rel, k[1]) if k is not None else None

    def lookup(self, rel: str, st: os.stat_result | None = None) -> str | None:
        """`st`: the file's stat when the caller already resolved it under this root."""
        rel = self._norm(rel)
        if st is None:
            k = self._key(rel)
            if k is None:
                return None
            key = k[1]
        else:
            key = _Key(st.st_mtime_ns, st.st_size)
        hexd = self._known(rel, key)
        if hexd is None:
            self._schedule(rel)
        return hexd

    __call__ = lookup

    def _schedule(self, rel: str) -> Future[str | None]:
        with self._lock:
            fut = self._pending.get(rel)
            if fut is None:
                fut = self._pool.submit(self._compute, rel)
                self._pending[rel] = fut
            return fut

    def _compute(self, rel: str) -> str | None:
        try:
            k = self._key(rel)
            if k is None:
                return None
            path, key = k
            hexd = self._known(rel, key)
            if hexd is not None:
                return hexd
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(self.CHUNK):
                    h.update(chunk)
                st = os.fstat(f.fileno())
            # A file replaced while we read it is hashed again next time.
            if _Key(st.st_mtime_ns, st.st_size) != key:
                return None
            hexd = h.hexdigest()
            self._cache[rel] = (key, hexd)
            self.computed += 1
            return hexd
        except OSError as e:
            log.warning("sha256 of %s failed: %s", rel, e)
            return None
        finally:
            with self._lock:
                self._pending.pop(rel, None)

    async def digest(self, rel: str) -> str | None:
        rel = self._norm(rel)
        k = self._key(rel)
        if k is None:
            return None
        hexd = self._known(rel, k[1])
        if hexd is not None:
            return hexd
        return await asyncio.wrap_future(self._schedule(rel))

    def warm(self, max_bytes: int = 256 * 2**20) -> None:
        """Hash the files TMCD hands out (tarballs, RPMs: all files up to
        `max_bytes`) in the background at start; bigger ones (disk images) on
        first request, so a start does not re-read the whole image store."""
        def walk() -> None:
            for dirpath, _dirs, names in os.walk(self.root):
                for n in sorted(names):
                    p = os.path.join(dirpath, n)
                    try:
                        if os.path.getsize(p) > max_bytes:
                            continue
                    except OSError:
                        continue
                    self.lookup(os.path.relpath(p, self.root))
        self._pool.submit(walk)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class PlainFileResponse(web.FileResponse):
    """FileResponse without aiohttp's pre-compressed sibling lookup.

    A `foo.tar.gz.gz` next to `foo.tar.gz` would otherwise be sent to
    clients announcing gzip, breaking ranges and the published SHA-256.
    """

    def __init__(self, path: Path, st: os.stat_result | None = None, **kw):  # noqa: ANN003
        super().__init__(path, **kw)
        self._stat = st  # the handler's own stat of the resolved path: not taken again

    async def prepare(self, request: web.BaseRequest):  # noqa: ANN201
        # The handler sends the file itself (to hold its admission slot for the
        # whole transfer); aiohttp then calls prepare() again, which must be a no-op.
        if self.prepared:
            return self._payload_writer
        make = getattr(self, "_make_response", None)
        if make is None:  # an aiohttp without it: its own prepare, with its thread hops
            return await super().prepare(request)
        # aiohttp runs open() and fstat() on its executor and close() on another hop:
        # three thread switches per response, and at 100 requests at once the 6-thread
        # pool is the queue the response heads wait in.  On a file the handler has just
        # resolved and stat'ed, both are dentry/inode cache hits of microseconds, so
        # they run here, as nginx does them in its event loop.
        try:
            result, fobj, st, encoding = make(request, "")
        except PermissionError:
            self.set_status(403)
            return await web.StreamResponse.prepare(self, request)
        except OSError:
            self.set_status(404)
            return await web.StreamResponse.prepare(self, request)
        if fobj is None:
            if result.name == "PRE_CONDITION_FAILED":
                return await self._precondition_failed(request)
            if result.name == "NOT_MODIFIED":
                return await self._not_modified(request, f"{st.st_mtime_ns:x}-{st.st_size:x}",
                                                st.st_mtime)
            self.set_status(403)  # not a regular file
            return await web.StreamResponse.prepare(self, request)
        try:
            return await self._prepare_open_file(request, fobj, st, encoding)
        finally:
            fobj.close()

    # Seconds a transfer may make no progress before its connection is dropped,
    # so a stalled client cannot hold an admission slot forever (it can resume).
    stall_timeout: float = 60.0

    async def _sendfile(self, request: web.BaseRequest, fobj, offset: int,  # noqa: ANN001, ANN202
                        count: int):
        # One zero-copy path on every loop: uvloop has no loop.sendfile (aiohttp
        # would copy every byte through Python), and asyncio's has no stall timeout.
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or self.compression or transport.get_extra_info("ssl_object"):
            # Over HTTPS the bytes must go through TLS: no zero-copy path.
            return await self._sendfile_fallback(writer, fobj, offset, count)
        # Cork like nginx's tcp_nopush: headers and body leave in full segments,
        # not as a tiny header packet followed by the file.
        cork = _set_cork(sock, True)
        try:
            send_headers = getattr(writer, "send_headers", None)
            if send_headers is not None:
                send_headers()
            await writer.drain()
            while transport.get_write_buffer_size():  # headers must leave before the body
                if transport.is_closing():
                    raise ConnectionResetError("connection lost")
                await asyncio.sleep(0.001)
            await sendfile_fd(sock.fileno(), fobj.fileno(), offset, count, self.stall_timeout)
        except TimeoutError:
            transport.abort()
            raise ConnectionResetError("client stalled") from None
        finally:
            if cork:
                _set_cork(sock, False)  # flush the last partial segment now
        return writer

    def _get_file_path_stat_encoding(self, accept_encoding: str):  # noqa: ANN202
        st = self._stat if self._stat is not None else self._path.stat()
        return (self._path if stat.S_ISREG(st.st_mode) else None), st, None


# Process-wide syscall counters, exported with the http metrics.
STATS: Counter = Counter()


def _set_cork(sock: socket.socket, on: bool) -> bool:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
        return True
    except (OSError, AttributeError):  # not TCP, or not Linux
        return False


# At most this much per sendfile() call, as nginx's sendfile_max_chunk: one connection
# with a large free buffer does not hold the loop while the others wait.  512 KiB, not
# nginx's 2 MiB: on loopback a call also does the receiver's TCP work, and with 2 MiB
# calls 100 downloads ran at 0.8 x nginx with both processes partly idle, with 512 KiB
# at 1.45-1.84 x (bench/http, docs/http.md).
CHUNK = 512 << 10


class _Sender:
    """One file to one socket, driven by writability callbacks, nginx style.

    Each time the socket can take more, the callback itself calls sendfile():
    no task switch, no future and no timer per wakeup (at 1,000 clients the
    per-wakeup cost is what the server's CPU goes to).  A single timer per
    transfer checks for progress every `stall_timeout` seconds.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, in_fd: int, offset: int,
                 count: int, stall_timeout: float | None):
        self.loop = loop
        self.fd = fd
        self.in_fd = in_fd
        self.offset = offset
        self.count = count
        self.sent = 0
        self.stall_timeout = stall_timeout
        self.done: asyncio.Future[int] = loop.create_future()
        self._registered = False
        self._timer: asyncio.TimerHandle | None = None
        self._seen = -1

    def start(self) -> asyncio.Future[int]:
        self._step()
        if not self.done.done():
            self.loop.add_writer(self.fd, self._step)
            self._registered = True
            if self.stall_timeout:
                self._seen = self.sent
                self._timer = self.loop.call_later(self.stall_timeout, self._check)
        return self.done

    def _step(self) -> None:
        try:
            n = os.sendfile(self.fd, self.in_fd, self.offset, min(self.count, CHUNK))
        except BlockingIOError:
            return
        except OSError as e:  # EPIPE, ECONNRESET: the client went away
            self._finish(ConnectionResetError(str(e)))
            return
        STATS["sendfile_calls"] += 1
        self.offset += n
        self.count -= n
        self.sent += n
        if n == 0 or self.count <= 0:  # n == 0: the file shrank; the client sees a short body
            self._finish(None)

    def _check(self) -> None:
        if self.done.done():
            return
        if self.sent == self._seen:
            self._finish(TimeoutError("no progress"))
            return
        self._seen = self.sent
        self._timer = self.loop.call_later(self.stall_timeout or 0, self._check)

    def _finish(self, exc: BaseException | None) -> None:
        if self._registered:
            self.loop.remove_writer(self.fd)
            self._registered = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.done.done():
            if exc is None:
                self.done.set_result(self.sent)
            else:
                self.done.set_exception(exc)

    def cancel(self) -> None:
        self._finish(None)


async def sendfile_fd(out_fd: int, in_fd: int, offset: int, count: int,
                      stall_timeout: float | None = None) -> int:
    """Zero-copy os.sendfile on a non-blocking socket, driven by the event loop.

    The socket belongs to a transport, so we poll a dup() of it: the loop
    refuses add_writer on a descriptor a transport owns.  Raises TimeoutError
    when the peer accepts nothing for `stall_timeout` seconds, and
    ConnectionResetError when it goes away.
    """
    fd = os.dup(out_fd)
    sender = _Sender(asyncio.get_running_loop(), fd, in_fd, offset, count, stall_timeout)
    try:
        return await sender.start()
    finally:
        sender.cancel()  # also on cancellation: never leave a writer behind
        os.close(fd)


def digest_headers(hexd: str) -> dict[str, str]:
    """Both spellings clients look for: a plain hex header and RFC 3230 Digest."""
    b64 = base64.b64encode(bytes.fromhex(hexd)).decode()
    return {"X-Checksum-Sha256": hexd, "Digest": f"sha-256={b64}"}


def not_modified(request: web.BaseRequest, st: os.stat_result) -> bool:
    """Would FileResponse answer 304?  Then no admission slot is needed."""
    etag = f"{st.st_mtime_ns:x}-{st.st_size:x}"
    inm = request.if_none_match
    if inm is not None:
        return any(t.value in (etag, "*") for t in inm)
    ims = request.if_modified_since
    return ims is not None and st.st_mtime <= ims.timestamp()

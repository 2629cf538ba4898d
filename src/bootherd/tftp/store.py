"""The TFTP file store: requested names to sources of bytes, the file cache, uploads.

Names are confined to the root by the rule HTTP follows too (:mod:`bootherd.fileroot`),
after :func:`tftp_name` has turned TFTP clients' spellings into a plain relative name.
A read's bytes come from the per-node resolver, the memory cache, or the file: a file is
not read before its first DATA block is due (a ``tsize`` probe is answered from
``stat``), and the first read of a large one happens on a thread (:meth:`FileStore.load`),
once for all the transfers that want it at that moment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import inspect
import logging
import os
import stat as stat_mod
import time
from collections.abc import Awaitable, Callable

from .. import fileroot
from . import core
from .core import ERR_ACCESS, ERR_FILE_EXISTS, ERR_NOT_FOUND, BytesSource, SourceChanged
from .sessions import Counters, RequestError

log = logging.getLogger("bootherd.tftp")

Resolver = Callable[[str, str], "bytes | None | Awaitable[bytes | None]"]

# Files at least this large that are not cached are first read on a thread: reading one
# of 64 MiB would stall every other transfer for tens of milliseconds.
THREAD_READ_BYTES = 256 * 2**10


def tftp_name(filename: str, root: str) -> str:
    """A TFTP request's file name as a plain name relative to ``root`` (see fileroot).

    TFTP clients write ``/pxelinux.0``, ``\\boot\\x`` (Windows loaders), the root's own
    absolute path, or ``./a//b``: all of these name files inside the root.  ``..`` and NUL
    are left in place for :func:`bootherd.fileroot.confine` to refuse."""
    name = filename.replace("\\", "/")
    if name.startswith(root + "/"):
        name = name[len(root) + 1 :]
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def confine(root: str, filename: str) -> tuple[str, str]:
    """``(relative_name, real_path)`` of a requested name; RequestError 2 or 1 if refused."""
    rel = tftp_name(filename, root)
    try:
        return rel, fileroot.confine(root, rel)
    except fileroot.Refused:
        raise RequestError(ERR_ACCESS, "access violation") from None
    except FileNotFoundError:
        raise RequestError(ERR_NOT_FOUND, "file not found") from None


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


# --------------------------------------------------------------------------- sources


def _checked(result):
    """A resolver's answer: bytes, or None to fall through to the file."""
    if result is not None and not isinstance(result, (bytes, bytearray, memoryview)):
        raise TypeError(f"resolver returned {type(result).__name__}, not bytes")
    return result


def _open_checked(path: str, st: os.stat_result) -> int:
    """Open ``path`` read-only and make sure it is the inode we checked (no swap race)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat_mod.S_ISREG(
            fst.st_mode
        ):
            raise SourceChanged("file changed while opening")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_whole(path: str, st: os.stat_result) -> bytes:
    """The whole file, which must still be the one ``st`` describes."""
    fd = _open_checked(path, st)
    try:
        chunks = []
        remaining = st.st_size + 1  # one byte more: a file that grew is noticed
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != st.st_size:
        raise SourceChanged("file changed during transfer")
    return data


class FileSource:
    """A file's bytes for a read transfer: from memory (cache) once loaded, or read with
    ``pread`` block by block when too large for the cache.  Nothing is read before the
    first block is asked for, or :meth:`FileStore.load` loads it."""

    __slots__ = ("_fd", "_store", "_view", "path", "size", "st")

    def __init__(self, path: str, st: os.stat_result, store: FileStore):
        self.path = path
        self.st = st
        self.size = st.st_size
        self._store = store
        self._view: memoryview | None = None
        self._fd: int | None = None

    @property
    def ready(self) -> bool:
        """Blocks can be read without touching the disk for more than one block."""
        return self._view is not None or self._fd is not None

    def use(self, data: bytes) -> None:
        self._view = memoryview(data)

    def read(self, offset: int, n: int) -> bytes | memoryview:
        if self._view is None and self._fd is None:
            self._store.load_now(self)
        if self._view is not None:
            return self._view[offset : offset + n]
        want = max(0, min(n, self.size - offset))
        data = os.pread(self._fd, want, offset)
        if len(data) != want:
            raise SourceChanged("file changed during transfer")
        return data

    def native_source(self) -> tuple[memoryview | None, int]:
        """For the native data path: the bytes, or else the open file to pread."""
        return self._view, -1 if self._view is not None else self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._view = None


# --------------------------------------------------------------------------- the store


class FileStore:
    """Files under ``root`` (and per-node content from ``resolver``) for reads; uploads
    into ``upload_dir``."""

    def __init__(self, root: str, *, upload_dir: str | None = None,
                 cache_bytes: int = 256 * 2**20, resolver: Resolver | None = None,
                 counters: Counters | None = None):  # fmt: skip
        self.root = os.path.realpath(root)
        self.upload_dir = os.path.realpath(upload_dir) if upload_dir else None
        self.cache = FileCache(cache_bytes)
        self.resolver = resolver
        self.counters = counters if counters is not None else Counters()
        self._loading: dict[tuple, asyncio.Future[bytes]] = {}  # file identity -> its read
        self.thread_reads = 0  # first reads done on a thread

    # -- reads
    async def open(self, client_ip: str, filename: str, netascii: bool = False
                   ) -> tuple[str, BytesSource | FileSource]:  # fmt: skip
        """``(relative_name, source)`` for a read request; raises RequestError."""
        opened = self.open_now(client_ip, filename, netascii)
        return opened if isinstance(opened, tuple) else await opened

    def open_now(self, client_ip: str, filename: str, netascii: bool = False
                 ) -> tuple[str, BytesSource | FileSource] | Awaitable:  # fmt: skip
        """:meth:`open` without a trip through the event loop where nothing must be
        waited for: ``(relative_name, source)``, or an awaitable of it when the resolver
        answers asynchronously or a netascii file must be read first.  Raises
        RequestError."""
        rel, real = confine(self.root, filename)
        data = self._resolve_now(client_ip, rel)
        if inspect.isawaitable(data):
            return self._open_resolved(rel, real, data, netascii)
        if data is not None:
            return rel, BytesSource(core.to_netascii(bytes(data)) if netascii else data)
        source = self._file_source(real)
        if not netascii:
            return rel, source
        return self._netascii(rel, source)

    async def _open_resolved(self, rel: str, real: str, pending: Awaitable, netascii: bool
                             ) -> tuple[str, BytesSource | FileSource]:  # fmt: skip
        data = _checked(await pending)
        if data is not None:
            return rel, BytesSource(core.to_netascii(bytes(data)) if netascii else data)
        source = self._file_source(real)
        return await self._netascii(rel, source) if netascii else (rel, source)

    def _file_source(self, real: str) -> FileSource:
        """The file at ``real`` (confined already) as a source; raises RequestError."""
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise RequestError(ERR_NOT_FOUND, "file not found") from None
        except PermissionError:
            raise RequestError(ERR_ACCESS, "access violation") from None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
                raise RequestError(ERR_NOT_FOUND, "file not found") from None
            raise
        if not stat_mod.S_ISREG(st.st_mode):
            raise RequestError(ERR_NOT_FOUND, "file not found")
        if not os.access(real, os.R_OK):
            raise RequestError(ERR_ACCESS, "access violation")
        return FileSource(real, st, self)

    async def _netascii(self, rel: str, source: FileSource) -> tuple[str, BytesSource]:
        """A file served in netascii: read whole and converted."""
        st = source.st
        try:
            await self.load(source)
            raw = bytes(source.read(0, st.st_size))
        except SourceChanged:
            raise RequestError(ERR_ACCESS, "file changed while opening") from None
        finally:
            source.close()
        return rel, BytesSource(core.to_netascii(raw))

    def _resolve_now(self, client_ip: str, rel: str) -> bytes | None | Awaitable:
        """The resolver's answer, or the awaitable an async resolver gave."""
        if self.resolver is None:
            return None
        result = self.resolver(client_ip, rel)
        return result if inspect.isawaitable(result) else _checked(result)

    def needs_thread(self, source: object) -> bool:
        """Would the first read of ``source`` read a large file whole (not cached)?"""
        if not isinstance(source, FileSource) or source.ready:
            return False
        size = source.size
        return (THREAD_READ_BYTES <= size <= self.cache.max_entry
                and self.cache.get(source.path, source.st) is None)  # fmt: skip

    def ready_unread(self, source: object) -> bool:
        """Make ``source`` ready if that reads none of its bytes (a cache hit, or a file
        too large for the cache, which is then opened for ``pread``); True if it is ready.
        So a size probe of a file not cached still reads nothing."""
        if not isinstance(source, FileSource) or source.ready:
            return True
        data = self.cache.get(source.path, source.st)
        if data is not None:
            self.counters.cache_hits += 1
            source.use(data)
            return True
        if source.size > self.cache.max_entry:
            self.counters.cache_misses += 1
            source._fd = _open_checked(source.path, source.st)
            return True
        return False

    def load_now(self, source: FileSource) -> None:
        """Make ``source`` ready on this thread: from the cache, by opening a file too
        large for it, or by reading it whole."""
        if self.ready_unread(source):
            return
        self.counters.cache_misses += 1
        data = _read_whole(source.path, source.st)
        self.cache.put(source.path, source.st, data)
        source.use(data)

    async def load(self, source: object) -> None:
        """Make a source ready before its first DATA block, reading a large file on a
        thread.  Transfers that want the same file meanwhile wait for the same read.
        Raises SourceChanged."""
        if not self.needs_thread(source):
            return
        key = (source.path, FileCache.identity(source.st))
        pending = self._loading.get(key)
        if pending is None:
            self.counters.cache_misses += 1
            self.thread_reads += 1
            pending = asyncio.ensure_future(asyncio.to_thread(_read_whole, source.path,
                                                              source.st))  # fmt: skip
            self._loading[key] = pending
            pending.add_done_callback(lambda f, k=key: self._loaded(k, f, source.st))
        else:
            self.counters.cache_hits += 1
        data = await asyncio.shield(pending)
        if not source.ready:
            source.use(data)

    def _loaded(self, key: tuple, fut: asyncio.Future[bytes], st: os.stat_result) -> None:
        self._loading.pop(key, None)
        if not fut.cancelled() and fut.exception() is None:
            self.cache.put(key[0], st, fut.result())

    # -- uploads
    def upload_target(self, filename: str) -> tuple[str, str]:
        """``(relative_name, real_path)`` a write request may create; raises RequestError."""
        if self.upload_dir is None:
            raise RequestError(ERR_ACCESS, "access violation: uploads disabled")
        rel, real = confine(self.upload_dir, filename)
        if not os.path.isdir(os.path.dirname(real)):
            raise RequestError(ERR_ACCESS, "access violation: no such directory")
        if os.path.lexists(real):
            raise RequestError(ERR_FILE_EXISTS, "file already exists")
        return rel, real

    @staticmethod
    def save_upload(target: str, data: bytes, netascii: bool = False) -> None:
        """Write a completed upload; it appears under its name only once complete, and an
        existing file is never overwritten.  Raises OSError."""
        if netascii:
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
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

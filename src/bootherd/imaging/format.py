"""The bootherd disk image: fixed-size chunks, each zstd-compressed on its own.

    header (144 bytes) | index (52 bytes per chunk) | stored chunks

Every chunk covers ``chunk_size`` bytes of the disk (the last one what is left) and is
stored alone, so a receiver can decompress and write chunks in whatever order they
arrive.  A chunk that is all zeros, or lies wholly in blocks the filesystem does not use,
is *skipped*: nothing is stored and a receiver writes no data there (zeros on a block
device).  The image's SHA-256 is that of the disk a receiver ends up with: the source
with skipped and unused regions read as zeros.  Layout and fields: docs/imaging.md.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

MAGIC = b"BHIMAGE\x00"
VERSION = 1
HEADER = struct.Struct("!8sHHIIIQQQ32s32s")
HEADER_LEN = HEADER.size + 32  # fixed fields + their SHA-256: 144 bytes
ENTRY = struct.Struct("!QIIB3x32s")  # offset, stored_len, raw_len, kind, sha256(stored)
DEFAULT_CHUNK = 1 << 20
MAX_CHUNK = 16 << 20

SKIPPED, ZSTD, RAW = 0, 1, 2
KIND_NAMES = {SKIPPED: "skipped", ZSTD: "zstd", RAW: "raw"}
FLAG_FS_AWARE = 1  # unused filesystem blocks were read as zeros
EMPTY_SHA = hashlib.sha256(b"").digest()


class ImageError(ValueError):
    """A damaged, truncated or foreign image; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    offset: int  # in the image file
    stored_len: int
    raw_len: int  # disk bytes the chunk covers
    kind: int
    sha256: bytes  # of the stored bytes


@dataclass(frozen=True)
class Header:
    version: int
    flags: int
    header_len: int  # fixed header + index: where chunk data starts
    chunk_size: int
    chunk_count: int
    disk_size: int
    data_size: int  # stored bytes of all chunks
    created: int
    image_sha256: bytes
    index_sha256: bytes
    chunks: tuple[Chunk, ...]
    meta_sha256: bytes  # of the whole header + index, what receivers check first

    def disk_offset(self, i: int) -> int:
        return i * self.chunk_size

    @property
    def file_size(self) -> int:
        return self.header_len + self.data_size

    @property
    def fs_aware(self) -> bool:
        return bool(self.flags & FLAG_FS_AWARE)

    def summary(self) -> dict:
        kinds = {name: 0 for name in KIND_NAMES.values()}
        for c in self.chunks:
            kinds[KIND_NAMES[c.kind]] += 1
        return {"disk_size": self.disk_size, "chunk_size": self.chunk_size,
                "chunks": self.chunk_count, "stored_bytes": self.data_size,
                "file_size": self.file_size, "sha256": self.image_sha256.hex(),
                "chunk_kinds": kinds, "fs_aware": self.fs_aware, "created": self.created}


def encode_header(h: Header) -> bytes:
    index = b"".join(ENTRY.pack(c.offset, c.stored_len, c.raw_len, c.kind, c.sha256)
                     for c in h.chunks)
    fixed = HEADER.pack(MAGIC, h.version, h.flags, h.header_len, h.chunk_size, h.chunk_count,
                        h.disk_size, h.data_size, h.created, h.image_sha256,
                        hashlib.sha256(index).digest())
    return fixed + hashlib.sha256(fixed).digest() + index


def decode_header(meta: bytes) -> Header:
    """Parse and check header + index bytes; raise ImageError naming the problem."""
    if len(meta) < HEADER_LEN:
        raise ImageError(f"truncated header ({len(meta)} of {HEADER_LEN} bytes)")
    fixed, digest = meta[:HEADER.size], meta[HEADER.size:HEADER_LEN]
    if fixed[:8] != MAGIC:
        raise ImageError("not a bootherd image (bad magic)")
    if hashlib.sha256(fixed).digest() != digest:
        raise ImageError("header digest mismatch (damaged header)")
    (_, version, flags, header_len, chunk_size, count, disk_size, data_size, created,
     image_sha, index_sha) = HEADER.unpack(fixed)
    if version != VERSION:
        raise ImageError(f"image format version {version}, this bootherd reads {VERSION}")
    if not 0 < chunk_size <= MAX_CHUNK or chunk_size % 512:
        raise ImageError(f"bad chunk size {chunk_size}")
    if count != -(-disk_size // chunk_size) or header_len != HEADER_LEN + count * ENTRY.size:
        raise ImageError("chunk count does not match the disk size")
    if len(meta) < header_len:
        raise ImageError(f"truncated index ({len(meta)} of {header_len} bytes)")
    index = meta[HEADER_LEN:header_len]
    if hashlib.sha256(index).digest() != index_sha:
        raise ImageError("index digest mismatch (damaged index)")
    chunks = []
    expect = header_len
    for i in range(count):
        off, stored, raw, kind, sha = ENTRY.unpack_from(index, i * ENTRY.size)
        want_raw = min(chunk_size, disk_size - i * chunk_size)
        if kind not in KIND_NAMES or raw != want_raw or off != expect \
                or (kind == SKIPPED) != (stored == 0) or (kind == RAW and stored != raw) \
                or stored > chunk_size + chunk_size // 8 + 1024:
            raise ImageError(f"chunk {i}: inconsistent index entry")
        chunks.append(Chunk(i, off, stored, raw, kind, sha))
        expect += stored
    if expect - header_len != data_size:
        raise ImageError("index does not add up to the data size")
    return Header(version, flags, header_len, chunk_size, count, disk_size, data_size,
                  created, image_sha, index_sha, tuple(chunks),
                  hashlib.sha256(meta[:header_len]).digest())


def read_header(path: str | os.PathLike) -> Header:
    with open(path, "rb") as f:
        head = f.read(HEADER_LEN)
        if len(head) >= HEADER.size and head[:8] == MAGIC:
            header_len = struct.unpack_from("!I", head, 12)[0]
            if HEADER_LEN <= header_len <= HEADER_LEN + (1 << 26):
                head += f.read(header_len - HEADER_LEN)
        h = decode_header(head)
        size = os.fstat(f.fileno()).st_size
    if size < h.file_size:
        raise ImageError(f"truncated image: {size} bytes, the index says {h.file_size}")
    if size > h.file_size:
        raise ImageError(f"trailing data: {size} bytes, the index says {h.file_size}")
    return h


def read_chunk(f, c: Chunk) -> bytes:  # noqa: ANN001 - any binary file
    return os.pread(f.fileno(), c.stored_len, c.offset) if c.stored_len else b""


def chunk_ok(c: Chunk, stored: bytes) -> bool:
    return len(stored) == c.stored_len and hashlib.sha256(stored).digest() == c.sha256


_dctx = zstandard.ZstdDecompressor()


def unpack_chunk(c: Chunk, stored: bytes) -> bytes:
    """Disk bytes of a chunk whose stored bytes passed `chunk_ok`."""
    if c.kind == SKIPPED:
        return bytes(c.raw_len)
    if c.kind == RAW:
        return stored
    out = _dctx.decompress(stored, max_output_size=c.raw_len)
    if len(out) != c.raw_len:
        raise ImageError(f"chunk {c.index}: decompresses to {len(out)} bytes, not {c.raw_len}")
    return out


def verify(path: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> Header:
    """Check every digest of an image (header, index, each chunk, the whole disk)."""
    h = read_header(path)
    whole = hashlib.sha256()
    with open(path, "rb") as f:
        for c in h.chunks:
            stored = read_chunk(f, c)
            if not chunk_ok(c, stored):
                raise ImageError(f"chunk {c.index}: SHA-256 mismatch (damaged data)")
            try:
                whole.update(unpack_chunk(c, stored))
            except zstandard.ZstdError as e:
                raise ImageError(f"chunk {c.index}: cannot decompress: {e}") from None
            if progress:
                progress(c.index + 1, h.chunk_count)
    if whole.digest() != h.image_sha256:
        raise ImageError("disk SHA-256 mismatch")
    return h


# --------------------------------------------------------------------------- creating


def _zero_runs(unused: list[tuple[int, int]], start: int, length: int) -> Iterator[tuple[int, int]]:
    """Parts of [start, start+length) inside the sorted unused ranges, chunk-relative."""
    import bisect
    i = max(0, bisect.bisect_right(unused, (start, 1 << 63)) - 1)
    end = start + length
    while i < len(unused) and unused[i][0] < end:
        a, b = unused[i]
        lo, hi = max(a, start), min(b, end)
        if lo < hi:
            yield lo - start, hi - start
        i += 1


def create(read_at: Callable[[int, int], bytes], disk_size: int, out: str | os.PathLike,
           chunk_size: int = DEFAULT_CHUNK, level: int = 3,
           unused: list[tuple[int, int]] | None = None,
           progress: Callable[[int, int], None] | None = None) -> Header:
    """Write an image of a disk read through ``read_at(offset, length)``.

    ``unused``: sorted, disjoint (start, end) byte ranges whose content does not matter
    (free filesystem blocks); they are stored as zeros.  The file is written beside
    ``out`` and renamed into place when complete."""
    if not 0 < chunk_size <= MAX_CHUNK or chunk_size % 512:
        raise ValueError(f"chunk size must be a multiple of 512 up to {MAX_CHUNK}")
    count = -(-disk_size // chunk_size)
    header_len = HEADER_LEN + count * ENTRY.size
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cctx = zstandard.ZstdCompressor(level=level)
    whole = hashlib.sha256()
    chunks: list[Chunk] = []
    offset = header_len
    try:
        with open(tmp, "wb") as f:
            f.seek(header_len)
            for i in range(count):
                start = i * chunk_size
                raw_len = min(chunk_size, disk_size - start)
                data = read_at(start, raw_len)
                if len(data) != raw_len:
                    raise ImageError(f"source ended early at byte {start + len(data)}")
                if unused:
                    buf = None
                    for lo, hi in _zero_runs(unused, start, raw_len):
                        buf = buf if buf is not None else bytearray(data)
                        buf[lo:hi] = bytes(hi - lo)
                    if buf is not None:
                        data = bytes(buf)
                whole.update(data)
                if not data.count(0) == raw_len:
                    packed = cctx.compress(data)
                    kind = ZSTD if len(packed) < raw_len else RAW
                    stored = packed if kind == ZSTD else data
                    f.write(stored)
                    chunks.append(Chunk(i, offset, len(stored), raw_len, kind,
                                        hashlib.sha256(stored).digest()))
                    offset += len(stored)
                else:
                    chunks.append(Chunk(i, offset, 0, raw_len, SKIPPED, EMPTY_SHA))
                if progress:
                    progress(i + 1, count)
            h = Header(VERSION, FLAG_FS_AWARE if unused else 0, header_len, chunk_size, count,
                       disk_size, offset - header_len, int(time.time()), whole.digest(),
                       b"", tuple(chunks), b"")
            meta = encode_header(h)
            f.seek(0)
            f.write(meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return read_header(out)

"""Reading a disk to image: raw files, block devices, qcow2 (through qemu-img), and which
of its blocks the filesystems on it leave unused.

Filesystem awareness is best effort and only ever drops blocks a well-kept tool reports
free: ext2/3/4 partitions (MBR or GPT, or a bare filesystem) through e2fsprogs'
``dumpe2fs``, and only when the filesystem says it is clean and is not mounted.
Everything else (other filesystems, a dirty journal, dumpe2fs missing) falls back to
skipping all-zero chunks only, and the notes say why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
EXT_MAGIC_OFFSET = 1024 + 56
LINUX_TYPES_MBR = {0x83}


@dataclass
class Source:
    path: str
    fd: int
    size: int
    kind: str  # file | block | qcow2 (or another qemu-img format)
    data_path: str  # what is read: the source itself or its raw conversion
    notes: list[str] = field(default_factory=list)

    def read_at(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            piece = os.pread(self.fd, length - len(out), offset + len(out))
            if not piece:
                break
            out += piece
        return bytes(out)


def _size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    raise ValueError("source must be a regular file or a block device")


def _qemu_format(path: str) -> str:
    if shutil.which("qemu-img") is None:
        return "raw"
    r = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        return "raw"
    return json.loads(r.stdout).get("format", "raw")


@contextlib.contextmanager
def open_source(path: str, scratch: str | os.PathLike | None = None) -> Iterator[Source]:
    """The disk at ``path``; a qcow2 (or other qemu-img format) is converted to a sparse
    raw file in ``scratch`` first and removed afterwards."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or device")
    with open(p, "rb") as probe:
        magic = probe.read(4)
    tmpdir = None
    try:
        kind = "block" if stat.S_ISBLK(p.stat().st_mode) else "file"
        fmt = "raw" if kind == "block" else "qcow2" if magic == b"QFI\xfb" else _qemu_format(path)
        if fmt != "raw":
            if shutil.which("qemu-img") is None:
                raise ValueError(f"{path} is {fmt}: converting it needs qemu-img (qemu-utils)")
            tmpdir = tempfile.mkdtemp(prefix="bhimg-", dir=scratch)
            raw = os.path.join(tmpdir, "disk.raw")
            r = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, raw],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise ValueError(f"qemu-img convert failed: {r.stderr.strip()[:300]}")
            p, kind = Path(raw), fmt
        fd = os.open(p, os.O_RDONLY)
        try:
            yield Source(str(path), fd, _size(fd), kind, str(p))
        finally:
            os.close(fd)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int
    type: str


def partitions(src: Source) -> list[Partition]:
    """MBR primary or GPT partitions; [] when there is no table."""
    mbr = src.read_at(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return []
    entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i) for i in range(4)]
    if any(e[1] == 0xEE for e in entries):
        return _gpt(src)
    out = []
    for i, (_, ptype, lba, count) in enumerate(entries):
        if ptype and count:
            out.append(Partition(i + 1, lba * SECTOR, count * SECTOR, f"mbr:{ptype:02x}"))
    return out


def _gpt(src: Source) -> list[Partition]:
    hdr = src.read_at(SECTOR, 92)
    if hdr[:8] != b"EFI PART":
        return []
    lba, count, size = struct.unpack_from("<QII", hdr, 72)
    if not 128 <= size <= 4096 or count > 1024:
        return []
    table = src.read_at(lba * SECTOR, count * size)
    out = []
    for i in range(count):
        e = table[i * size:(i + 1) * size]
        if len(e) < 48 or not any(e[:16]):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        if last >= first:
            out.append(Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR,
                                 "gpt:" + e[:16].hex()))
    return out


# --------------------------------------------------------------------------- free blocks


def _is_ext(src: Source, start: int) -> bool:
    return src.read_at(start + EXT_MAGIC_OFFSET, 2) == b"\x53\xef"


def _mounted(path: str) -> bool:
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as fh:
            return any(line.split()[0] == real for line in fh if line.strip())
    except OSError:
        return False


def ext_free_ranges(dev: str, start: int) -> tuple[list[tuple[int, int]] | None, str]:
    """Free byte ranges (disk offsets) of the ext filesystem at ``start``, or None and why."""
    if shutil.which("dumpe2fs") is None:
        return None, "dumpe2fs (e2fsprogs) not installed"
    target = f"{dev}?offset={start}" if start else dev
    r = subprocess.run(["dumpe2fs", target], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return None, f"dumpe2fs failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}"
    text = r.stdout
    state = re.search(r"^Filesystem state:\s*(.+)$", text, re.M)
    if not state or state.group(1).strip() != "clean":
        return None, f"filesystem state is {state.group(1).strip() if state else 'unknown'!r}"
    feats = re.search(r"^Filesystem features:\s*(.+)$", text, re.M)
    if feats and "needs_recovery" in feats.group(1).split():
        return None, "journal needs recovery"
    bs = re.search(r"^Block size:\s*(\d+)$", text, re.M)
    if not bs:
        return None, "no block size in dumpe2fs output"
    block = int(bs.group(1))
    out: list[tuple[int, int]] = []
    for m in re.finditer(r"^\s+Free blocks: (.*)$", text, re.M):
        for part in m.group(1).split(","):
            part = part.strip()
            if not part:
                continue
            a, _, b = part.partition("-")
            lo, hi = int(a), int(b or a)
            out.append((start + lo * block, start + (hi + 1) * block))
    out.sort()
    return out, f"{sum(b - a for a, b in out) >> 20} MiB free"


def unused_ranges(src: Source) -> list[tuple[int, int]]:
    """Byte ranges of the disk no filesystem uses; notes say what was found."""
    real_path = src.data_path
    if src.kind == "block" and _mounted(real_path):
        src.notes.append("source is mounted: zero chunks skipped only")
        return []
    parts = partitions(src)
    places = [(p.start, f"partition {p.number}") for p in parts] if parts else [(0, "disk")]
    unused: list[tuple[int, int]] = []
    for start, what in places:
        if not _is_ext(src, start):
            src.notes.append(f"{what}: not ext2/3/4, zero chunks skipped only")
            continue
        ranges, why = ext_free_ranges(real_path, start)
        if ranges is None:
            src.notes.append(f"{what}: ext filesystem, {why}: zero chunks skipped only")
            continue
        src.notes.append(f"{what}: ext filesystem, {why} (dumpe2fs)")
        unused += ranges
    unused.sort()
    return unused

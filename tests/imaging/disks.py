"""Test disks made from Debian's own files: an MBR, one ext4 partition populated with
mkfs.ext4 -d (no mount needed), random bytes in its free blocks (so filesystem-aware
imaging has something to skip) and zeros after it."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

SECTOR = 512
START = 2048  # first partition sector, as partitioning tools align it


def mbr(partitions: list[tuple[int, int, int]]) -> bytes:
    """A DOS partition table with (type, first sector, sectors) entries."""
    out = bytearray(SECTOR)
    for i, (ptype, first, count) in enumerate(partitions):
        out[446 + 16 * i:462 + 16 * i] = struct.pack("<B3sB3sII", 0x80 if i == 0 else 0,
                                                     b"\xfe\xff\xff", ptype, b"\xfe\xff\xff",
                                                     first, count)
    out[510:512] = b"\x55\xaa"
    return bytes(out)


def populate(tmp: Path, mib: int) -> Path:
    """A folder of real files (Debian docs, Python's library) of about ``mib`` MiB."""
    dest = tmp / f"files{mib}"
    if dest.exists():
        return dest
    dest.mkdir()
    budget = mib << 20
    roots = [Path("/usr/share/common-licenses"), Path("/usr/share/doc"), Path("/usr/share/man"),
             Path("/usr/lib/x86_64-linux-gnu")]
    for root in roots:
        for p in sorted(root.rglob("*")):
            if budget <= 0:
                return dest
            if p.is_file() and not p.is_symlink():
                rel = dest / root.name / p.relative_to(root)
                rel.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(p, rel)
                except OSError:
                    continue
                budget -= rel.stat().st_size
    return dest


def make_disk(tmp: Path, size_mib: int = 24, part_mib: int = 18, files_mib: int = 6,
              seed: int = 1, name: str = "disk.raw") -> Path:
    part = tmp / f"part{seed}.img"
    rng = random.Random(seed)
    with open(part, "wb") as f:
        for _ in range(part_mib):  # old contents left in free blocks
            f.write(rng.randbytes(1 << 20))
    files = populate(tmp, files_mib)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-L", "bhtest", "-d", str(files),
                    str(part)], check=True, capture_output=True)
    disk = tmp / name
    with open(disk, "wb") as f:
        f.write(mbr([(0x83, START, (part_mib << 20) // SECTOR)]))
        f.seek(START * SECTOR)
        with open(part, "rb") as p:
            shutil.copyfileobj(p, f)
        f.truncate(size_mib << 20)
    os.unlink(part)
    return disk


def partition(disk: Path, out: Path, part_mib: int = 18) -> Path:
    """The first partition of a written disk, as its own file (for e2fsck, debugfs)."""
    with open(disk, "rb") as f, open(out, "wb") as o:
        f.seek(START * SECTOR)
        o.write(f.read(part_mib << 20))
    return out

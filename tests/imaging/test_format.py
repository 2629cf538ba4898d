"""The image format: round trip, filesystem awareness, and damaged images refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bootherd.imaging import format as fmt
from bootherd.imaging import source as src

from .disks import make_disk, partition


def _create(disk: Path, out: Path, fs_aware: bool = True, **kw) -> fmt.Header:
    with src.open_source(str(disk)) as s:
        unused = src.unused_ranges(s) if fs_aware else []
        return fmt.create(s.read_at, s.size, out, unused=unused, **kw)


def _unpack(image: Path) -> bytes:
    h = fmt.read_header(image)
    with open(image, "rb") as f:
        return b"".join(fmt.unpack_chunk(c, fmt.read_chunk(f, c)) for c in h.chunks)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_disk(tmp_path_factory.mktemp("disk"), size_mib=16, part_mib=12, files_mib=4)


def test_round_trip_without_filesystem_awareness_is_the_source(disk: Path, tmp_path: Path) -> None:
    h = _create(disk, tmp_path / "a.bhimg", fs_aware=False, chunk_size=256 * 1024)
    raw = disk.read_bytes()
    assert h.image_sha256 == hashlib.sha256(raw).digest()
    assert _unpack(tmp_path / "a.bhimg") == raw
    kinds = h.summary()["chunk_kinds"]
    assert kinds["skipped"] >= 12  # the 4 MiB of zeros after the partition, 256 KiB each
    assert fmt.verify(tmp_path / "a.bhimg").image_sha256 == h.image_sha256


def test_filesystem_aware_image_is_smaller_and_its_filesystem_intact(disk: Path,
                                                                     tmp_path: Path) -> None:
    plain = _create(disk, tmp_path / "plain.bhimg", fs_aware=False)
    aware = _create(disk, tmp_path / "aware.bhimg")
    assert aware.fs_aware and not plain.fs_aware
    # The free blocks hold random bytes in the source: skipping them is most of the image.
    assert aware.file_size < plain.file_size / 2
    out = tmp_path / "written.raw"
    out.write_bytes(_unpack(tmp_path / "aware.bhimg"))
    assert hashlib.sha256(out.read_bytes()).digest() == aware.image_sha256
    part = partition(out, tmp_path / "p1.img", 12)
    fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # A real file reads back the same through the filesystem.
    cat = subprocess.run(["debugfs", "-R", "cat /common-licenses/GPL-3", str(part)],
                         capture_output=True)
    assert cat.stdout == Path("/usr/share/common-licenses/GPL-3").read_bytes()


def test_qcow2_source_through_qemu_img(disk: Path, tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-img (qemu-utils) missing under CI")
        pytest.skip("qemu-img not installed")
    q = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(disk), str(q)], check=True)
    a = _create(disk, tmp_path / "raw.bhimg")
    b = _create(q, tmp_path / "q.bhimg")
    assert a.image_sha256 == b.image_sha256 and a.chunks == b.chunks


def test_no_filesystem_means_zero_chunks_only(tmp_path: Path) -> None:
    raw = tmp_path / "blob.raw"
    raw.write_bytes(os.urandom(3 << 20) + bytes(2 << 20) + b"tail" * 1000)
    with src.open_source(str(raw)) as s:
        assert src.unused_ranges(s) == []
        assert any("not ext" in n for n in s.notes)
        h = fmt.create(s.read_at, s.size, tmp_path / "b.bhimg")
    assert [c.kind for c in h.chunks] == [fmt.RAW] * 3 + [fmt.SKIPPED] * 2 + [fmt.ZSTD]
    assert _unpack(tmp_path / "b.bhimg") == raw.read_bytes()


def _damage(image: Path, tmp: Path, where: str) -> Path:
    bad = tmp / f"{where}.bhimg"
    data = bytearray(image.read_bytes())
    h = fmt.read_header(image)
    stored = next(c for c in h.chunks if c.stored_len)
    if where == "chunk":
        data[stored.offset + stored.stored_len // 2] ^= 0x40
    elif where == "index":
        data[fmt.HEADER_LEN + 10] ^= 1
    elif where == "header":
        data[30] ^= 1
    elif where == "truncated":
        del data[-100:]
    elif where == "trailing":
        data += b"junk"
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("where,message", [
    ("chunk", "SHA-256 mismatch"), ("index", "index digest"), ("header", "header digest"),
    ("truncated", "truncated"), ("trailing", "trailing data"),
])
def test_damaged_images_are_refused(disk: Path, tmp_path: Path, where: str, message: str) -> None:
    _create(disk, tmp_path / "good.bhimg")
    with pytest.raises(fmt.ImageError, match=message):
        fmt.verify(_damage(tmp_path / "good.bhimg", tmp_path, where))


def test_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "x.bhimg"
    p.write_bytes(b"hello" * 100)
    with pytest.raises(fmt.ImageError, match="not a bootherd image"):
        fmt.read_header(p)

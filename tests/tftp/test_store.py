"""The TFTP file store: names, sources, the first read of a large file, uploads."""

import asyncio
import os
import threading

import pytest

from bootherd.tftp import core, store
from bootherd.tftp.sessions import RequestError
from bootherd.tftp.store import FileSource, FileStore, tftp_name


@pytest.mark.parametrize("spelled, plain", [
    ("pxelinux.0", "pxelinux.0"), ("/pxelinux.0", "pxelinux.0"), ("//a/./b", "a/b"),
    ("\\boot\\x.efi", "boot/x.efi"), ("/srv/tftp/a", "a"), ("/srv/tftpx/a", "srv/tftpx/a"),
    ("../x", "../x"), ("a\0b", "a\0b"), ("/", ""),
])  # fmt: skip
def test_tftp_spellings_become_plain_names(spelled, plain):
    assert tftp_name(spelled, "/srv/tftp") == plain


@pytest.mark.parametrize("name, code", [("../x", 2), ("a\0b", 2), ("/", 1), ("", 1)])
def test_confine_answers_with_tftp_errors(tmp_path, name, code):
    with pytest.raises(RequestError) as ei:
        store.confine(str(tmp_path), name)
    assert ei.value.code == code


@pytest.fixture
def big(tmp_path):
    data = os.urandom(store.THREAD_READ_BYTES * 2)
    (tmp_path / "big").write_bytes(data)
    return data


async def test_first_read_of_a_large_file_happens_on_a_thread_once(tmp_path, big, monkeypatch):
    threads = []
    read_whole = store._read_whole

    def recording(path, st):
        threads.append(threading.get_ident())
        return read_whole(path, st)

    monkeypatch.setattr(store, "_read_whole", recording)
    fs = FileStore(str(tmp_path))
    sources = [(await fs.open("10.0.0.1", "big"))[1] for _ in range(5)]
    assert all(fs.needs_thread(s) for s in sources)
    await asyncio.gather(*[fs.load(s) for s in sources])
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    assert all(bytes(s.read(0, len(big))) == big for s in sources)
    assert (fs.thread_reads, fs.counters.cache_misses, fs.counters.cache_hits) == (1, 1, 4)
    # now cached: the next transfer needs no thread
    again = (await fs.open("10.0.0.1", "big"))[1]
    assert not fs.needs_thread(again) and bytes(again.read(0, 10)) == big[:10]


async def test_small_and_uncacheable_files_are_read_in_place(tmp_path):
    (tmp_path / "small").write_bytes(b"s" * 100)
    (tmp_path / "huge").write_bytes(b"h" * 5000)
    fs = FileStore(str(tmp_path), cache_bytes=4 * 1024)  # entries up to 1 KiB
    small = (await fs.open("10.0.0.1", "small"))[1]
    huge = (await fs.open("10.0.0.1", "huge"))[1]
    assert not fs.needs_thread(small) and not fs.needs_thread(huge)
    assert bytes(small.read(0, 512)) == b"s" * 100 and len(fs.cache) == 1
    assert bytes(huge.read(4096, 512)) == b"h" * 512  # pread from the open file
    assert huge.native_source()[0] is None and huge.native_source()[1] >= 0
    huge.close()


async def test_a_file_swapped_before_its_first_read_ends_the_transfer(tmp_path, big):
    fs = FileStore(str(tmp_path))
    _, source = await fs.open("10.0.0.1", "big")
    (tmp_path / "new").write_bytes(big)
    os.replace(tmp_path / "new", tmp_path / "big")  # another inode
    with pytest.raises(core.SourceChanged):
        await fs.load(source)
    xfer = core.ReadTransfer(FileSource(source.path, source.st, fs))
    pkts, deadline = xfer.start(0.0)  # read in place: the same rule in the core
    assert deadline is None and xfer.end is core.End.FILE_CHANGED
    assert core.parse_packet(pkts[0]) == core.Error(0, "file changed during transfer")


async def test_resolver_content_and_netascii(tmp_path):
    (tmp_path / "text").write_bytes(b"a\nb")
    fs = FileStore(str(tmp_path), resolver=lambda ip, rel: b"for " + ip.encode() if rel == "cfg" else None)
    rel, src = await fs.open("10.0.0.9", "/cfg")
    assert rel == "cfg" and bytes(src.read(0, 100)) == b"for 10.0.0.9"
    _, src = await fs.open("10.0.0.9", "text", netascii=True)
    assert bytes(src.read(0, 100)) == b"a\r\nb"


def test_uploads_are_confined_and_never_overwrite(tmp_path):
    up = tmp_path / "up"
    up.mkdir()
    fs = FileStore(str(tmp_path), upload_dir=str(up))
    rel, target = fs.upload_target("/log.txt")
    assert rel == "log.txt" and target == str(up / "log.txt")
    fs.save_upload(target, b"a\r\nb", netascii=True)
    assert (up / "log.txt").read_bytes() == b"a\nb"
    for name, code in (("log.txt", 6), ("../x", 2), ("nodir/x", 2)):
        with pytest.raises(RequestError) as ei:
            fs.upload_target(name)
        assert ei.value.code == code
    with pytest.raises(OSError):
        fs.save_upload(target, b"again")  # appeared meanwhile: never overwritten
    assert sorted(os.listdir(up)) == ["log.txt"]
    with pytest.raises(RequestError):
        FileStore(str(tmp_path)).upload_target("x")  # no upload folder

"""File distribution with real clients: curl, busybox wget, raw sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from web_helpers import LARGE, Server, env_no_proxy_fixture, make_file, server_fixture  # noqa: F401 - fixtures

from bootherd.web.files import Admission, Hasher, Refused, resolve

CURL = shutil.which("curl")
BUSYBOX = shutil.which("busybox")


async def run(*args: str, timeout: float = 30) -> tuple[int, bytes, bytes]:
    p = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    return p.returncode or 0, out, err


async def raw_get(port: int, target: str) -> int:
    """Send the request line byte for byte (no client-side ../ normalisation)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await w.drain()
    line = await r.readline()
    w.close()
    return int(line.split()[1])


def headers_of(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    h = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            h[k.strip().lower()] = v.strip()
    return status, h


# -- pure parts ------------------------------------------------------------------------


def test_resolve_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_text("x")
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", root / "out")
    os.symlink(root / "sub" / "f", root / "in")
    assert resolve(root, "sub/f") == (root / "sub" / "f").resolve()
    assert resolve(root, "in") == (root / "sub" / "f").resolve()
    for bad in ("../secret", "sub/../../secret", "/etc/passwd", "out", "sub/./f", "a\x00b"):
        with pytest.raises(Refused):
            resolve(root, bad)
    with pytest.raises(FileNotFoundError):
        resolve(root, "sub")  # a folder is not a file
    with pytest.raises(FileNotFoundError):
        resolve(root, "nope")


def test_admission_counts() -> None:
    a = Admission(2)
    assert a.try_acquire() and a.try_acquire()
    assert not a.try_acquire()
    a.release()
    assert a.try_acquire()
    assert (a.active, a.admitted, a.refused) == (2, 3, 1)


async def test_hasher_caches_and_notices_changes(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    h = Hasher(tmp_path)
    try:
        assert await h.digest("a.bin") == hashlib.sha256(b"one").hexdigest()
        assert h.lookup("/a.bin") == hashlib.sha256(b"one").hexdigest()
        f.write_bytes(b"two!")  # size changes -> cache miss
        assert h.lookup("a.bin") is None  # scheduled, not blocking
        assert await h.digest("a.bin") == hashlib.sha256(b"two!").hexdigest()
        assert h.lookup("missing") is None and await h.digest("../etc/passwd") is None
    finally:
        h.close()


# -- through the server -----------------------------------------------------------------


@pytest.mark.skipif(CURL is None, reason="curl not installed")
async def test_curl_ranges_and_conditionals(server: Server) -> None:
    data = make_file(server.root / "tar" / "small.tar.gz", 10000)
    url = f"{server.url}/files/tar/small.tar.gz"
    rc, out, _ = await run("curl", "-sf", url)
    assert rc == 0 and out == data
    # byte range -> 206 with exactly those bytes
    rc, out, _ = await run("curl", "-sf", "-r", "100-199", url)
    assert rc == 0 and out == data[100:200]
    rc, raw, _ = await run("curl", "-s", "-D", "-", "-o", "/dev/null", "-r", "100-199", url)
    status, h = headers_of(raw)
    assert status == 206 and h["content-range"] == "bytes 100-199/10000"
    # unsatisfiable range -> 416
    rc, raw, _ = await run("curl", "-s", "-D", "-", "-o", "/dev/null", "-r", "20000-", url)
    assert headers_of(raw)[0] == 416
    # HEAD gives the size, ETag and the digest without a body
    rc, raw, _ = await run("curl", "-sI", url)
    status, h = headers_of(raw)
    assert status == 200 and h["content-length"] == "10000" and h["accept-ranges"] == "bytes"
    etag, lm = h["etag"], h["last-modified"]
    # conditional requests -> 304
    rc, raw, _ = await run("curl", "-s", "-D", "-", "-o", "/dev/null",
                           "-H", f"If-None-Match: {etag}", url)
    assert headers_of(raw)[0] == 304
    rc, raw, _ = await run("curl", "-s", "-D", "-", "-o", "/dev/null",
                           "-H", f"If-Modified-Since: {lm}", url)
    assert headers_of(raw)[0] == 304
    rc, raw, _ = await run("curl", "-s", "-D", "-", "-o", "/dev/null",
                           "-H", 'If-None-Match: "other"', url)
    assert headers_of(raw)[0] == 200
    rc, raw, _ = await run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                           f"{server.url}/files/tar/nope")
    assert raw == b"404"


@pytest.mark.skipif(CURL is None, reason="curl not installed")
async def test_sha256_query_and_headers(server: Server) -> None:
    data = make_file(server.root / "rpms" / "x.rpm", 5000)
    want = hashlib.sha256(data).hexdigest()
    url = f"{server.url}/files/rpms/x.rpm"
    rc, out, _ = await run("curl", "-sf", url + "?sha256")
    assert out.decode() == f"{want}  x.rpm\n"
    # the process's one hasher (TMCD names these digests): synchronous, from the cache now
    assert server.wiring.hasher.lookup("rpms/x.rpm") == want
    assert server.svc.file_url("rpms/x.rpm").endswith("/files/rpms/x.rpm")
    rc, raw, _ = await run("curl", "-sI", url)
    _, h = headers_of(raw)
    assert h["x-checksum-sha256"] == want
    assert h["digest"].startswith("sha-256=")


@pytest.mark.skipif(CURL is None, reason="curl not installed")
async def test_interrupted_download_resumes_to_same_sha256(server: Server,
                                                           tmp_path: Path) -> None:
    data = make_file(server.root / "images" / "big.ndz", 3 * LARGE + 12345, seed=7)
    url = f"{server.url}/files/images/big.ndz"
    out = tmp_path / "big.ndz"
    # the first attempt dies mid-transfer (connection dropped after ~200 KB)
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200
            with out.open("wb") as f:
                while f.tell() < 200_000:
                    f.write(await r.content.read(65536))
            r.connection.transport.abort()  # type: ignore[union-attr]
    partial = out.stat().st_size
    assert 0 < partial < len(data)
    rc, _, err = await run("curl", "-sSf", "--retry", "10", "--retry-delay", "1",
                           "--retry-all-errors", "-C", "-", "-o", str(out), url)
    assert rc == 0, err
    rc, sha, _ = await run("curl", "-sf", url + "?sha256")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha.split()[0].decode()


@pytest.mark.skipif(BUSYBOX is None, reason="busybox (busybox-static) not installed")
async def test_busybox_wget_download_and_continue(server: Server, tmp_path: Path,
                                                  env_no_proxy: dict[str, str]) -> None:
    rc, _, err = await run("busybox", "wget", "--help")
    if b"-c" not in err + _:
        pytest.skip("this busybox wget has no -c")
    data = make_file(server.root / "k" / "vmlinuz", 2 * LARGE + 999, seed=3)
    url = f"{server.url}/files/k/vmlinuz"
    out = tmp_path / "vmlinuz"
    rc, _, err = await run("busybox", "wget", "-q", "-O", str(out), url)
    assert rc == 0, err
    assert out.read_bytes() == data
    out.write_bytes(data[:LARGE // 3])  # an interrupted earlier attempt
    rc, _, err = await run("busybox", "wget", "-q", "-c", "-O", str(out), url)
    assert rc == 0, err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_path_escapes_refused(server: Server) -> None:
    (server.tmp / "secret.txt").write_text("top secret")
    make_file(server.root / "ok.txt", 10)
    os.symlink(server.tmp / "secret.txt", server.root / "link-out")
    port = server.svc.port
    assert await raw_get(port, "/files/ok.txt") == 200
    for target in ("/files/../secret.txt", "/files/%2e%2e/secret.txt",
                   "/files/%2E%2E%2Fsecret.txt", "/files/..%2fsecret.txt",
                   "/files//etc/passwd", "/files/%2fetc%2fpasswd", "/files/link-out",
                   "/files/ok.txt/../../secret.txt", "/boot/../i.db",
                   "/files/%00", "/files/.%2e/.%2e/secret.txt"):
        status = await raw_get(port, target)
        assert status in (400, 403, 404), (target, status)
    assert server.ctx.metrics.protocol("http")["path_refused"] >= 3


@pytest.mark.skipif(CURL is None, reason="curl not installed")
async def test_path_as_is_with_curl(server: Server) -> None:
    (server.tmp / "secret.txt").write_text("top secret")
    for path in ("/files/../secret.txt", "/files/sub/../../secret.txt"):
        rc, out, _ = await run("curl", "-s", "--path-as-is", "-w", "\n%{http_code}",
                               server.url + path)
        assert b"top secret" not in out
        assert out.rsplit(b"\n", 1)[1] in (b"403", b"404")


async def test_boot_serves_tftp_root(server: Server) -> None:
    data = make_file(server.boot / "efi" / "snponly.efi", 4000)
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{server.url}/boot/efi/snponly.efi") as r:
            assert r.status == 200 and await r.read() == data
        async with s.get(f"{server.url}/boot/missing.efi") as r:
            assert r.status == 404


async def test_zero_copy_without_loop_sendfile(server: Server, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """uvloop has no loop.sendfile: our os.sendfile path must serve whole files and ranges."""
    loop = asyncio.get_running_loop()

    async def no_sendfile(*a: object, **k: object) -> int:
        raise NotImplementedError

    monkeypatch.setattr(loop, "sendfile", no_sendfile)
    calls = []
    import bootherd.web.files as files

    real = files.sendfile_fd

    async def spy(*a: int) -> int:
        calls.append(a)
        return await real(*a)

    monkeypatch.setattr(files, "sendfile_fd", spy)
    data = make_file(server.root / "img", 3 * LARGE + 17, seed=9)
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{server.url}/files/img") as r:
            assert r.status == 200 and await r.read() == data
        async with s.get(f"{server.url}/files/img", headers={"Range": "bytes=1000-"}) as r:
            assert r.status == 206 and await r.read() == data[1000:]
        async with s.get(f"{server.url}/files/img", headers={"Range": "bytes=5-9"}) as r:
            assert r.status == 206 and await r.read() == data[5:10]
    assert len(calls) == 3
    assert server.ctx.metrics.protocol("http")["bytes_sent"] == 2 * len(data) - 1000 + 5

"""USEWEB=1: the file path Emulab's install-tarfile and install-rpm use, served by
bootherd's HTTP, fetched with wget (what install-tarfile runs) and curl."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time

import pytest
from certs import issue, make_ca
from conftest import ask, make_env

from bootherd.tmcd.protocol import parse_kv

WGET = shutil.which("wget")
pytestmark = pytest.mark.skipif(WGET is None or shutil.which("curl") is None,
                                reason="wget and curl are needed")


@pytest.fixture
async def web(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy"):
        monkeypatch.delenv(k, raising=False)
    ca = make_ca(tmp_path)
    cert, key = issue(tmp_path, ca, "boss", ip="127.0.0.1")
    root = tmp_path / "www"
    from bootherd.procs import free_port

    env = await make_env(tmp_path, extra=[
        f"http.root={root}", "http.port=0", f"http.tls_port={free_port()}",
        f"http.tls_cert={cert}", f"http.tls_key={key}", "http.large_file_bytes=65536",
        f"http.admin_token_file={tmp_path / 'token'}", f"http.log_dir={tmp_path / 'logs'}"],
        services=("tmcd", "http"))
    try:
        yield env, env.wiring["http"], root
    finally:
        await env.wiring.stop()
        await env.live.stop()


def _node(env):  # noqa: ANN001, ANN202
    return next(n for n in env.allocated() if n.allocation.vname == "node1"
                and n.allocation.eid == "exp0")


async def _told(env, n):  # noqa: ANN001, ANN202
    """What the node learns from TMCD: its id, its key hash, its tarball lines."""
    q = lambda c: ask(env.port, f"VERSION=40 {c} ", n.control_ip)  # noqa: E731
    nodeid = (await q("nodeid")).decode().strip()
    keyhash = parse_kv((await q("keyhash")).decode().strip())["HASH"]
    tarballs = [parse_kv(line) for line in (await q("tarballs")).decode().splitlines()]
    return nodeid, keyhash, tarballs


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=30, text=False)


async def test_install_tarfile_path(web) -> None:  # noqa: ANN001
    env, http, root = web
    n = _node(env)
    nodeid, keyhash, tarballs = await _told(env, n)
    assert {t["USEWEB"] for t in tarballs} == {"1"} and len(tarballs) == 2
    data = {}
    for i, t in enumerate(tarballs):
        p = root / t["TARBALL"].lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        data[t["TARBALL"]] = os.urandom(200_000 + i)  # large: through admission
        p.write_bytes(data[t["TARBALL"]])
    out = env.tmp / "got"
    for t in tarballs:
        q = f"nodeid={nodeid}&file={t['TARBALL']}&key={keyhash}"
        # install-tarfile's own way: wget over https, certificate not checked.
        r = await asyncio.to_thread(
            _run, WGET, "-nv", "--no-check-certificate", f"--bind-address={n.control_ip}",
            "-O", str(out), f"https://127.0.0.1:{http.tls_port}/spewrpmtar.php3?{q}")
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == data[t["TARBALL"]]
        # Plain HTTP, and /spewrpmtar (the "users" server's path).
        r = await asyncio.to_thread(
            _run, "curl", "-sf", "--interface", n.control_ip, "-o", str(out),
            f"http://127.0.0.1:{http.port}/spewrpmtar?{q}")
        assert r.returncode == 0 and out.read_bytes() == data[t["TARBALL"]]
    c = http.state.counters
    assert c["useweb_requests"] == 4 and c["large_transfers"] == 4
    # Ranges, like every other file: a resumed download.
    t = tarballs[0]
    q = f"nodeid={nodeid}&file={t['TARBALL']}&key={keyhash}"
    r = await asyncio.to_thread(
        _run, "curl", "-s", "-r", "100-199", "--interface", n.control_ip, "-o", str(out),
        "-w", "%{http_code}", f"http://127.0.0.1:{http.port}/spewrpmtar.php3?{q}")
    assert r.stdout == b"206" and out.read_bytes() == data[t["TARBALL"]][100:200]
    # A copy at least as new as the file: 304, which install-tarfile reads in wget's
    # output as "ERROR 304" and keeps its copy.
    r = await asyncio.to_thread(
        _run, WGET, "-nv", f"--bind-address={n.control_ip}", "-O", str(out),
        f"http://127.0.0.1:{http.port}/spewrpmtar.php3?{q}&stamp={int(time.time()) + 60}")
    assert r.returncode != 0 and b"ERROR 304" in r.stderr
    r = await asyncio.to_thread(
        _run, WGET, "-nv", f"--bind-address={n.control_ip}", "-O", str(out),
        f"http://127.0.0.1:{http.port}/spewrpmtar.php3?{q}&stamp=1&md5=abc")
    assert r.returncode == 0 and out.read_bytes() == data[t["TARBALL"]]


async def test_only_the_node_with_its_key_gets_its_files(web) -> None:  # noqa: ANN001
    env, http, root = web
    n = _node(env)
    nodeid, keyhash, tarballs = await _told(env, n)
    own, shared = (t["TARBALL"] for t in sorted(tarballs, key=lambda t: "only" not in
                                                  t["TARBALL"]))
    for t in tarballs:
        p = root / t["TARBALL"]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 10)
    other = next(m for m in env.allocated() if m.allocation.vname == "node2"
                 and m.allocation.eid == "exp0")
    foreign = next(m for m in env.allocated() if m.allocation.eid != "exp0")
    base = f"http://127.0.0.1:{http.port}/spewrpmtar.php3"
    cases = [
        (n.control_ip, f"nodeid={nodeid}&file={own}&key={keyhash}", "200"),
        (n.control_ip, f"nodeid={nodeid}&file={own}&key={'0' * 40}", "403"),  # wrong key
        (n.control_ip, f"nodeid={nodeid}&file={own}", "400"),  # no key
        (n.control_ip, f"nodeid={nodeid}&key={keyhash}", "400"),  # no file
        (other.control_ip, f"nodeid={nodeid}&file={own}&key={keyhash}", "403"),  # not its address
        (other.control_ip, f"nodeid={other.node_id}&file={own}&key={keyhash}", "403"),  # not its file
        (other.control_ip, f"nodeid={other.node_id}&file={shared}&key={keyhash}", "200"),
        (foreign.control_ip, f"nodeid={foreign.node_id}&file={shared}&key={keyhash}", "403"),
        (n.control_ip, f"nodeid={nodeid}&file=../../etc/passwd&key={keyhash}", "403"),
        ("127.0.0.1", f"nodeid={nodeid}&file={own}&key={keyhash}", "403"),  # no node's address
    ]
    for src, q, want in cases:
        r = await asyncio.to_thread(_run, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                    "--interface", src, f"{base}?{q}")
        assert r.stdout.decode() == want, (src, q)

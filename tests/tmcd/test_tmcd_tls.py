"""TMCD over TLS as Emulab's client asks for it, with real TLS clients (Python's ssl
module and bootherd's tmcc): ISPEAKSSL_TMCDV10 in the clear, the handshake, the
request inside.  Every node here is off the trusted ranges, so its secrets are
served over TLS only; the plain port keeps working for the rest."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest
from certs import issue, make_ca
from conftest import ask, make_env

from bootherd.config import ConfigError, build
from bootherd.tmcd.client import TmccClient, main
from bootherd.tmcd.protocol import TLS_PREFIX, split_fullconfig
from bootherd.tmcd.tls import client_context, server_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory):  # noqa: ANN001, ANN201
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    return {"dir": d, "ca": ca, "server": issue(d, ca, "boss", ip="127.0.0.1"),
            "issue": lambda cn: issue(d, ca, cn)}


@pytest.fixture
async def tenv(tmp_path, pki):  # noqa: ANN001, ANN201
    cert, key = pki["server"]
    ev = await make_env(tmp_path, extra=[
        "tmcd.trusted_ranges=10.255.0.0/16", f"tmcd.tls_cert={cert}", f"tmcd.tls_key={key}",
        f"tmcd.tls_client_ca={pki['ca'][0]}", "tmcd.tls_client_certs=optional"])
    try:
        yield ev
    finally:
        await ev.wiring.stop()
        await ev.live.stop()


def _host(env):  # noqa: ANN001, ANN202
    return next(n for n in env.snap.nodes.values() if env.snap.vnodes.get(n.node_id))


def tls_ask(port: int, src: str, line: bytes, ctx: ssl.SSLContext) -> bytes:
    """Emulab's client's way, with Python's ssl: the tag, the handshake, one record."""
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(src, 0)) as s:
        s.sendall(TLS_PREFIX)
        with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            t.sendall(line)
            out = b""
            while True:
                try:
                    b = t.recv(65536)
                except ssl.SSLEOFError:
                    break
                if not b:
                    break
                out += b
            return out


async def test_accounts_over_tls_and_refused_in_the_clear(tenv, pki) -> None:  # noqa: ANN001
    n = _host(tenv)
    ctx = client_context(str(pki["ca"][0]))
    out = await asyncio.to_thread(tls_ask, tenv.port, n.control_ip,
                                  b"VERSION=40 accounts ", ctx)
    assert out.startswith(b"ADDGROUP NAME=proj0 GID=6000\nADDGROUP NAME=proj0-ops")
    assert b"ADDUSER LOGIN=" in out and b" PSWD=* " in out  # remote: no password hashes
    # The same request in the clear from this (untrusted) address: nothing.
    assert await ask(tenv.port, "VERSION=40 accounts ", n.control_ip) == b""
    assert tenv.counters["tls_required"] == 1
    # The plain port keeps working for everything that is not secret.
    assert await ask(tenv.port, "VERSION=40 status ", n.control_ip) == \
        b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"
    assert (await ask(tenv.port, "VERSION=40 ifconfig ", n.control_ip)).startswith(b"INTERFACE")
    # fullconfig: secret sections only inside TLS.
    plain = split_fullconfig((await ask(tenv.port, "VERSION=40 fullconfig ",
                                        n.control_ip)).decode())
    assert "accounts" not in plain and "keyhash" not in plain and "ifconfig" in plain
    full = split_fullconfig((await asyncio.to_thread(
        tls_ask, tenv.port, n.control_ip, b"VERSION=40 fullconfig ", ctx)).decode())
    assert full["accounts"].startswith("ADDGROUP") and full["keyhash"].startswith("KEYHASH")
    assert tenv.counters["tls_connections"] == 2


async def test_client_certificates_per_node(tenv, pki) -> None:  # noqa: ANN001
    n = _host(tenv)
    other = next(m for m in tenv.allocated() if m.node_id != n.node_id and not m.phys_node_id)
    mine = client_context(str(pki["ca"][0]), *map(str, pki["issue"](n.node_id)))
    theirs = client_context(str(pki["ca"][0]), *map(str, pki["issue"](other.node_id)))
    line = b"VERSION=40 keyhash "
    assert (await asyncio.to_thread(tls_ask, tenv.port, n.control_ip, line, mine)) \
        .startswith(b"KEYHASH HASH='")
    # Another node's (valid) certificate from this node's address: nothing.
    assert await asyncio.to_thread(tls_ask, tenv.port, n.control_ip, line, theirs) == b""
    assert tenv.counters["cert_mismatch"] == 1
    # A vnode's request through its host carries the host's certificate.
    vid = tenv.snap.vnodes[n.node_id][0]
    out = await asyncio.to_thread(tls_ask, tenv.port, n.control_ip,
                                  f"VERSION=40 PROXYFOR={vid} accounts ".encode(), mine)
    assert out.startswith(b"ADDGROUP")


async def test_bootherd_tmcc_speaks_tls(tenv, pki, tmp_path, capsysbinary) -> None:  # noqa: ANN001
    n = _host(tenv)
    c = TmccClient(port=tenv.port, fallback_port=0, bind=n.control_ip, timeout=5,
                   cachedir=str(tmp_path / "cache"), tls=client_context(str(pki["ca"][0])))
    assert await asyncio.to_thread(c.boot) == b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"
    assert c.cached("accounts").startswith(b"ADDGROUP")  # fetched inside TLS
    rc = await asyncio.to_thread(main, ["-p", str(tenv.port), "-P", "0", "-l", n.control_ip,
                                        "--tls", "--ca", str(pki["ca"][0]), "-b",
                                        "-c", str(tmp_path / "c2"), "accounts"])
    assert rc == 0 and capsysbinary.readouterr().out.startswith(b"ADDGROUP")
    # A server certificate the client does not trust: the handshake fails, no reply.
    wrong = make_ca(tmp_path)
    bad = TmccClient(port=tenv.port, fallback_port=0, bind=n.control_ip, timeout=5,
                     tls=client_context(str(wrong[0])))
    with pytest.raises(OSError, match="TLS"):
        await asyncio.to_thread(bad.request, "status")


async def test_broken_handshakes_do_not_hurt_the_server(tenv) -> None:  # noqa: ANN001
    n = _host(tenv)
    for junk in (b"\x16\x03\x01\x00\x05hello", b"not tls at all\n", b""):
        r, w = await asyncio.open_connection("127.0.0.1", tenv.port,
                                             local_addr=(n.control_ip, 0))
        w.write(TLS_PREFIX + junk)
        if not junk:
            w.write_eof()
        try:
            assert await asyncio.wait_for(r.read(), 5) in (b"",)
        except ConnectionResetError:
            pass
        w.close()
    assert tenv.counters["tls_errors"] >= 2
    assert await ask(tenv.port, "VERSION=40 status ", n.control_ip) == \
        b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"


def test_tls_config_is_checked_naming_the_key(tmp_path: Path, pki) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="tmcd.tls_key"):
        build({"tmcd": {"tls_cert": "x.pem"}})
    with pytest.raises(ConfigError, match="tmcd.tls_client_ca"):
        build({"tmcd": {"tls_client_certs": "required"}})
    with pytest.raises(ConfigError, match="tmcd.tls_client_certs"):
        build({"tmcd": {"tls_client_certs": "maybe"}})
    with pytest.raises(ConfigError, match="tmcd.trusted_ranges"):
        build({"tmcd": {"trusted_ranges": ["10.0.0.0/33"]}})
    with pytest.raises(ConfigError, match="tmcd.tls_cert"):
        server_context(build({"tmcd": {"tls_cert": "missing.pem", "tls_key": "missing.key"}},
                             base_dir=tmp_path))
    cert, key = pki["server"]
    with pytest.raises(ConfigError, match="tmcd.tls_cert"):  # a key that is not its key
        server_context(build({"tmcd": {"tls_cert": str(cert), "tls_key": str(pki["ca"][1])}}))
    ok = server_context(build({"tmcd": {"tls_cert": str(cert), "tls_key": str(key),
                                        "tls_client_ca": str(pki["ca"][0]),
                                        "tls_client_certs": "required"}}))
    assert ok is not None and ok.verify_mode == ssl.CERT_REQUIRED

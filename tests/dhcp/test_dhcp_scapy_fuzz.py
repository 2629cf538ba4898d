"""bootherd's live replies decoded by scapy (an independent decoder), and a hypothesis fuzz
run of malformed packets against the live server, which keeps answering valid clients."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dhcp_server import (
    IPXE,
    PXE_BIOS,
    SERVER,
    SID,
    Client,
    Env,
    request,
    start_env,
)

scapy_dhcp = pytest.importorskip("scapy.layers.dhcp")
BOOTP, DHCP = scapy_dhcp.BOOTP, scapy_dhcp.DHCP


def sub_options(raw: bytes) -> dict[int, bytes]:
    """Walk code/len/value by hand: no bootherd code in the checking path."""
    out, i = {}, 0
    while i < len(raw) and raw[i] != 255:
        if raw[i] == 0:
            i += 1
            continue
        out[raw[i]] = raw[i + 2:i + 2 + raw[i + 1]]
        i += 2 + raw[i + 1]
    return out


async def raw_ask(c: Client, port: int, pkt: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(c.sock, pkt, (SERVER, port))
    return await asyncio.wait_for(loop.sock_recv(c.sock, 2048), 2)


@pytest.fixture
async def env(tmp_path: Any) -> Any:
    e, _ = await start_env(tmp_path, unknown_clients="pool",
                           dynamic_pool="127.21.1.10-127.21.1.250")
    try:
        yield e
    finally:
        await e.svc.stop()
        await e.live.stop()


@pytest.mark.parametrize("client", ["bios", "ipxe"])
async def test_scapy_decodes_pxe_reply(env: Env, client: str) -> None:
    opts = PXE_BIOS if client == "bios" else IPXE
    c = Client()
    try:
        data = await raw_ask(c, env.port, request(env.mac(0), 1, opts=opts))
        yi = BOOTP(data).yiaddr
        ack = await raw_ask(c, env.port, request(env.mac(0), 3, opts={
            **opts, **SID, 50: socket.inet_aton(yi)}))
    finally:
        c.close()
    for raw, mtype in ((data, 2), (ack, 5)):
        p = BOOTP(raw)
        o = {x[0]: x[1] for x in p[DHCP].options if isinstance(x, tuple) and len(x) == 2}
        assert p.op == 2 and o["message-type"] == mtype
        assert p.yiaddr == env.ip(0) and p.siaddr == SERVER
        assert o["server_id"] == SERVER and o["subnet_mask"] == "255.255.255.0"
        assert o["vendor_class_id"] == b"PXEClient"
        vend = sub_options(o["vendor_specific"])
        assert vend[6] == b"\x08" and socket.inet_ntoa(vend[128]) == SERVER
        file = p.file.rstrip(b"\0")
        if client == "bios":
            assert file == b"undionly.kpxe"
            assert 175 not in o
        else:
            assert file.startswith(b"http://127.0.0.1:8080/ipxe")
            assert sub_options(o[175])[176] == b"\x01"
        assert o["tftp_server_name"] == SERVER.encode()


junk = st.one_of(
    st.binary(max_size=600),
    # A valid header and cookie followed by random option bytes.
    st.binary(max_size=300).map(lambda b: request(b"\x0a\x00\x00\x00\x00\x01", 1)[:240] + b),
    # A valid request with one byte flipped.
    st.tuples(st.integers(0, 299), st.integers(0, 255)).map(
        lambda t: (lambda r: r[:t[0]] + bytes([t[1]]) + r[t[0] + 1:])(
            request(b"\x0a\x00\x00\x00\x00\x02", 3, opts={50: b"\x7f\x15\x01\x0b"}))),
)


async def test_fuzz_live_server_keeps_answering(env: Env) -> None:
    c = Client()
    sent = []

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(junk)
    def collect(b: bytes) -> None:
        sent.append(b)

    collect()
    loop = asyncio.get_running_loop()
    try:
        for i, b in enumerate(sent):
            await loop.sock_sendto(c.sock, b, (SERVER, env.port))
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        # Drain whatever the junk provoked, then a valid client must still be served.
        await asyncio.sleep(0.2)
        while True:
            try:
                c.sock.recv(4096)
            except BlockingIOError:
                break
        offer = await c.ask(env.port, request(env.mac(9), 1, xid=0xBEEF))
        assert offer is not None and offer.xid == 0xBEEF
        assert offer.ip("yiaddr").compressed == env.ip(9)
    finally:
        c.close()
    assert env.counters["malformed"] > 0
    assert env.counters["errors"] == 0

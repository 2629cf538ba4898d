"""DHCP on loopback against input that cannot be answered as sent: an option 82 too long
to echo, malformed floods; answered or dropped and counted, logged once per interval per
source, never a traceback per packet.  Request lines (log.requests) for unknown MACs."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from test_dhcp_server import PXE_BIOS, Client, request, start_env


def with_long_option_82(packet: bytes, rai: bytes) -> bytes:
    """The packet with `rai` as option 82 in 255-byte parts (RFC 3396) before END: a
    1,000-byte datagram no well-behaved relay would send, but anyone can."""
    body = packet.rstrip(b"\0")
    assert body.endswith(b"\xff")
    parts = b"".join(bytes((82, len(rai[i:i + 255]))) + rai[i:i + 255]
                     for i in range(0, len(rai), 255))
    return body[:-1] + parts + b"\xff"


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info]


async def test_discover_with_510_byte_option_82_is_answered_without_the_echo(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    env, _ = await start_env(tmp_path)
    c = Client()
    rai = bytes([1, 253]) + b"c" * 253 + bytes([2, 253]) + b"r" * 253  # 510 bytes, two parts
    try:
        with caplog.at_level(logging.DEBUG):
            for xid in range(5):
                offer = await c.ask(env.port, with_long_option_82(
                    request(env.mac(0), 1, xid=xid, opts=PXE_BIOS), rai))
                assert offer is not None and offer.message_type == 2
                assert offer.ip("yiaddr").compressed == env.ip(0)
                assert 82 not in offer.options
            # A short option 82 is still echoed verbatim.
            short = bytes([1, 4]) + b"port"
            offer = await c.ask(env.port, request(env.mac(0), 1, opts={**PXE_BIOS, 82: short}))
            assert offer is not None and offer.options[82] == short
    finally:
        c.close()
        await env.svc.stop()
        await env.live.stop()
    assert env.counters["relay_info_dropped"] == 5
    assert env.counters["errors"] == 0
    assert not _tracebacks(caplog)
    lines = [r for r in caplog.records if r.getMessage() == "dhcp bad input"]
    assert len(lines) == 1 and lines[0].fields["what"] == "relay_info_dropped"


async def test_malformed_flood_is_counted_and_logged_once_per_source(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    env, _ = await start_env(tmp_path)
    a, b = Client("127.21.0.201"), Client("127.21.0.202")
    bad = request(env.mac(0), 1)[:240] + b"\x35\x05\x01"  # option 53 running off the end
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(50):
                await a.ask(env.port, bad, timeout=0.01)
            await b.ask(env.port, bad, timeout=0.01)
            # Still answering the well-formed.
            offer = await a.ask(env.port, request(env.mac(1), 1, opts=PXE_BIOS))
            assert offer is not None
    finally:
        a.close()
        b.close()
        await env.svc.stop()
        await env.live.stop()
    assert env.counters["malformed"] == 51
    lines = [r for r in caplog.records if r.getMessage() == "dhcp bad input"]
    assert sorted(r.fields["remote"] for r in lines) == ["127.21.0.201", "127.21.0.202"]
    assert not _tracebacks(caplog)


async def test_request_lines_name_unknown_macs_only_when_turned_on(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    unknown = bytes.fromhex("0a00000000aa")
    for on in (False, True):
        (tmp_path / str(on)).mkdir()
        env, _ = await start_env(tmp_path / str(on), log_requests_on=on)
        c = Client()
        try:
            with caplog.at_level(logging.INFO, logger="bootherd.dhcp"):
                caplog.clear()
                assert await c.ask(env.port, request(unknown, 1, opts=PXE_BIOS),
                                   timeout=0.3) is None
                assert await c.ask(env.port, request(env.mac(2), 1, opts=PXE_BIOS)) is not None
        finally:
            c.close()
            await env.svc.stop()
            await env.live.stop()
        lines = [r for r in caplog.records if r.getMessage() == "dhcp request"]
        if not on:
            assert lines == []
            continue
        first, second = (r.fields for r in lines)
        assert first["mac"] == unknown.hex(":") and first["known"] is False
        assert first["outcome"] == "ignored" and first["reply"] is False
        assert second["node"] == env.nodes[2].node_id and second["outcome"] == "offer"
        assert second["type"] == "DISCOVER" and second["reply"] is True

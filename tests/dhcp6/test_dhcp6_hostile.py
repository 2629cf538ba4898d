"""The DHCPv6 transport on ::1 against bad input: malformed messages and an engine
failure are counted and logged at most once per interval per source, never a traceback
per packet; with log.requests naming dhcp6, every message is one line saying what
became of it (an unknown client: ignored)."""

from __future__ import annotations

import asyncio
import logging
import socket
from functools import partial

import pytest

from bootherd.config import build
from bootherd.dhcp6 import codec
from bootherd.dhcp6.codec import Message, MsgType, Opt
from bootherd.dhcp6.engine import Engine6, Settings6
from bootherd.dhcp6.server import Dhcp6Server
from bootherd.inventory.memory import snapshot_from_text
from bootherd.inventory.testbed import generate
from bootherd.policy import dhcp6_boot

UNKNOWN_DUID = b"\x00\x03\x00\x01\x02\x99\x00\x00\x00\x01"  # DUID-LL of a MAC nobody has


async def _server(log_requests: bool) -> tuple[Dhcp6Server, Engine6]:
    cfg = build({"server": {"public_address": "10.77.0.1", "public_address6": "::1"},
                 "dhcp6": {"address": "::1", "port": 0, "enabled": True}})
    engine = Engine6(Settings6.from_config(cfg, "t"), partial(dhcp6_boot, cfg=cfg))
    snap = snapshot_from_text(generate(3, subnet="10.77.0.0/24"))
    server = Dhcp6Server(engine, lambda: snap, address="::1", port=0,
                         log_requests=log_requests, bad_input_interval=60.0)
    await server.start()
    return server, engine


def _client() -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    return s


async def _settle(engine: Engine6, key: str, want: int) -> None:
    for _ in range(200):
        if engine.counters[key] >= want:
            return
        await asyncio.sleep(0.01)


async def test_malformed_flood_and_engine_failures_are_one_line_per_source(
        caplog: pytest.LogCaptureFixture) -> None:
    server, engine = await _server(log_requests=False)
    port = server.bound[0][1]
    a = _client()
    try:
        with caplog.at_level(logging.DEBUG, logger="bootherd.dhcp6"):
            for _ in range(40):
                a.sendto(b"\x01\x00\x00\x01\x00\x01\x00\x40", ("::1", port))  # option runs off
            await _settle(engine, "malformed", 40)
            assert engine.counters["malformed"] == 40
            # An engine that raises (a bug) on every message: counted, one line, no flood.
            engine.handle = lambda *args: 1 / 0  # type: ignore[method-assign]
            for _ in range(20):
                a.sendto(b"\x01\x00\x00\x01", ("::1", port))
            await _settle(engine, "errors", 20)
            assert engine.counters["errors"] == 20
    finally:
        a.close()
        await server.stop()
    (bad,) = [r for r in caplog.records if r.getMessage() == "dhcp6 bad input"]
    assert bad.fields["remote"] == "::1" and not bad.exc_info
    (failed,) = [r for r in caplog.records if r.getMessage() == "dhcp6 request handling failed"]
    assert failed.exc_info  # one traceback for twenty failures, not twenty
    assert len(caplog.records) == 2


async def test_request_lines_name_unknown_clients_only_when_turned_on(
        caplog: pytest.LogCaptureFixture) -> None:
    solicit = codec.encode(Message(MsgType.SOLICIT, 0x1234, [
        (Opt.CLIENTID, UNKNOWN_DUID), (Opt.ELAPSED_TIME, b"\x00\x00")]))
    for on in (False, True):
        server, engine = await _server(log_requests=on)
        c = _client()
        try:
            with caplog.at_level(logging.INFO, logger="bootherd.dhcp6"):
                caplog.clear()
                c.sendto(solicit, ("::1", server.bound[0][1]))
                await _settle(engine, "ignored", 1)
                assert engine.counters["ignored"] == 1
        finally:
            c.close()
            await server.stop()
        lines = [r for r in caplog.records if r.getMessage() == "dhcp6 request"]
        if not on:
            assert lines == []
            continue
        (line,) = lines
        assert line.fields["type"] == "SOLICIT" and line.fields["outcome"] == "ignored"
        assert line.fields["remote"] == "::1" and line.fields["reply"] is False

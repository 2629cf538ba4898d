"""Fixtures for the TMCD tests: a generated testbed on 127.x addresses and a live server."""

from __future__ import annotations

import asyncio
import socket
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from bootherd.config import build
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.metrics import Metrics
from bootherd.procs import free_port
from bootherd.service import Context, wire

SUBNET = "127.77.0.0/24"
SERVER = "127.0.0.1"


def rich_testbed(nodes: int = 24, seed: int = 7) -> str:
    """A generated testbed plus what generate() leaves out: vnodes on a host,
    tunnels, an nseconfig, and per-vname tarballs."""
    doc = tomllib.loads(generate(nodes, subnet=SUBNET, seed=seed))
    exp = doc["experiments"][0]
    host_id = exp["nodes"][0]["node_id"]
    host = next(n for n in doc["nodes"] if n["node_id"] == host_id)
    host["tunnels"] = [{"lan": "tun0", "member": "node1", "key": "proto", "value": "gre"}]
    exp["nseconfig"] = "set ns [new Simulator]\n$ns run"
    exp["tarballs"].append({"vname": "node1", "dir": "/opt", "path": "tarballs/only-node1.tgz"})
    for k in range(2):
        vid = f"{host_id}v{k}"
        doc["nodes"].append({
            "node_id": vid, "type": host["type"], "phys_node_id": host_id, "jailed": k == 0,
            "interfaces": [{"mac": f"02:ee:00:00:00:{k + 1:02x}", "ip": "", "mask": "",
                            "role": "expt", "iface": f"veth{k}", "lan": ""}]})
        exp["nodes"].append({"node_id": vid, "vname": f"vm{k}", "startupcmd": ""})
    return tomli_w.dumps(doc)


async def ask(port: int, line: bytes | str, src: str, udp: bool = False,
              timeout: float = 5.0) -> bytes:
    """One TMCD request from source address `src`; b'' if nothing came back."""
    data = line.encode() if isinstance(line, str) else line
    if udp:
        return await asyncio.to_thread(_ask_udp, port, data, src, timeout)
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    w.write(data)
    w.write_eof()
    out = await asyncio.wait_for(r.read(), timeout)
    w.close()
    return out


def _ask_udp(port: int, data: bytes, src: str, timeout: float) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", port))
        try:
            return s.recv(65536)
        except TimeoutError:
            return b""


@dataclass
class Env:
    ctx: Context
    live: LiveInventory
    service: object
    port: int
    fallback: int
    tmp: Path
    wiring: Any = None

    @property
    def snap(self):  # noqa: ANN201
        return self.live.snapshot

    @property
    def counters(self):  # noqa: ANN201
        return self.ctx.metrics.protocol("tmcd")

    def allocated(self):  # noqa: ANN201
        return sorted((n for n in self.snap.nodes.values() if n.allocation and n.control_ip),
                      key=lambda n: n.node_id)

    def free(self):  # noqa: ANN201
        return sorted((n for n in self.snap.nodes.values() if not n.allocation),
                      key=lambda n: n.node_id)


async def make_env(tmp_path: Path, nodes: int = 48, extra: list[str] | None = None,
                   text: str | None = None, services: tuple[str, ...] = ("tmcd",)) -> Env:
    e = make_engine(f"sqlite:///{tmp_path}/i.db")
    upgrade(e)
    import_testbed(e, text if text is not None else rich_testbed(nodes))
    port, fallback = free_port(), free_port()
    cfg = build({}, [f"tmcd.port={port}", f"tmcd.fallback_port={fallback}",
                     "database.poll_interval=0.05", *(extra or [])], base_dir=tmp_path)
    live = LiveInventory(e, 0.05, 0.01)
    await live.start()
    ctx = Context(cfg, live, Metrics(), server_name="test")
    wiring = wire(ctx, list(services))
    await wiring.start()
    return Env(ctx, live, wiring["tmcd"], port, fallback, tmp_path, wiring)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    ev = await make_env(tmp_path)
    try:
        yield ev
    finally:
        await ev.wiring.stop()
        await ev.live.stop()


@pytest.fixture(params=["native-front", "python-transport"])
async def both_transports(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    """The server with its connections on the native thread, and on the Python transport
    (a module's `env` can be this one, so its tests run both ways)."""
    ev = await make_env(tmp_path, extra=[
        f"tmcd.native_front={str(request.param == 'native-front').lower()}"])
    try:
        yield ev
    finally:
        await ev.service.stop()
        await ev.live.stop()

"""Helpers and fixtures for the HTTP service tests: a real server on a free loopback port.

Not a conftest.py on purpose: several test folders lazily `from conftest import ...`,
and a second module named conftest collected later would shadow theirs.
Test modules import the fixtures they use from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootherd.config import build
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.metrics import Metrics
from bootherd.service import Context, Wiring, wire
from bootherd.web.service import HttpService

SUBNET = "127.20.0.0/24"
LARGE = 256 * 1024  # files at least this big are "large" in these tests


@dataclass
class Server:
    svc: HttpService
    ctx: Context
    tmp: Path
    root: Path
    boot: Path
    token: str
    wiring: Wiring

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.svc.port}"

    def node_ip(self, i: int = 0) -> str:
        return sorted(self.ctx.live.snapshot.by_ip, key=lambda a: tuple(map(int, a.split("."))))[i]


def make_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    data = bytes((b + seed) % 256 for b in data[:4096]) + data[4096:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def with_power(testbed: str, power: dict[str, dict]) -> str:
    """A testbed file with [nodes.power] tables: node_id -> its power settings."""
    import tomllib

    import tomli_w

    doc = tomllib.loads(testbed)
    for n in doc["nodes"]:
        if n["node_id"] in power:
            n["power"] = power[n["node_id"]]
    return tomli_w.dumps(doc)


async def start_server(tmp: Path, ui: dict | None = None, power: dict[str, dict] | None = None,
                       services: tuple[str, ...] = ("http",), extra: dict | None = None,
                       **http: object) -> Server:
    """`power`: node_id -> [nodes.power] settings; `services`: what the process runs
    (wired by service.wire); `extra`: more configuration sections."""
    db = tmp / "i.db"
    e = make_engine(f"sqlite:///{db}")
    upgrade(e)
    import_testbed(e, with_power(generate(20, subnet=SUBNET), power or {}))
    root, boot = tmp / "www", tmp / "tftpboot"
    root.mkdir(exist_ok=True)
    boot.mkdir(exist_ok=True)
    h = {"port": 0, "root": str(root), "log_dir": str(tmp / "nodelogs"),
         "admin_token_file": str(tmp / "admin-token"), "large_file_bytes": LARGE,
         "max_large_transfers": 4, "retry_after": 1, "max_log_bytes": 64 * 1024,
         "logs_per_node": 3}
    h.update(http)
    cfg = build({"http": h, "tftp": {"root": str(boot)}, "ui": ui or {},
                 "database": {"url": f"sqlite:///{db}"}, **(extra or {})}, base_dir=tmp)
    live = LiveInventory(e, poll_interval=0.05)
    await live.start()
    ctx = Context(cfg, live, Metrics(), server_name="test")
    ctx.metrics.attach_inventory(live)
    wiring = wire(ctx, list(services))
    await wiring.start()
    svc = wiring["http"]
    token = svc.app["admin_token"]  # type: ignore[index]
    return Server(svc, ctx, tmp, root, boot, token, wiring)


async def stop_server(s: Server) -> None:
    await s.wiring.stop()
    await s.ctx.live.stop()


# Registered under the names the tests use; imported as *_fixture so the
# parameter of the same name does not shadow an import.
@pytest.fixture(name="server")
async def server_fixture(tmp_path: Path):  # noqa: ANN201
    s = await start_server(tmp_path)
    try:
        yield s
    finally:
        await stop_server(s)


@pytest.fixture(name="env_no_proxy")
def env_no_proxy_fixture(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for curl/wget children: never through a proxy."""
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    return dict(os.environ)

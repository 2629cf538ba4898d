"""`bootherd serve`: the chosen services in one asyncio process.

Each protocol package exposes `create_service(ctx) -> Service`; the runner
binds them all (a port that cannot be bound stops start-up with a message
naming the service and address), serves until SIGTERM/SIGINT, then stops
them in reverse order and flushes the inventory writer.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .config import Config
from .inventory.db import check_current, make_engine
from .inventory.live import LiveInventory
from .metrics import Metrics

if TYPE_CHECKING:
    from .power.console import ConsoleService
    from .power.controller import PowerController

log = logging.getLogger("bootherd.service")

# name -> module holding create_service(ctx); order is start order.
SERVICES: dict[str, str] = {
    "dhcp": "bootherd.dhcp.service",
    "tftp": "bootherd.tftp.service",
    "bootinfo": "bootherd.bootinfo.service",
    "tmcd": "bootherd.tmcd.service",
    "http": "bootherd.web.service",
    "console": "bootherd.power.service",
}


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class StartupError(RuntimeError):
    pass


@dataclass
class Context:
    """What every service gets: configuration, the live inventory, metrics,
    and the shared objects services publish for each other (e.g. the
    bootinfo server publishes itself so the HTTP API can send wake orders)."""

    config: Config
    live: LiveInventory
    metrics: Metrics
    shared: dict[str, Any] = field(default_factory=dict)
    server_name: str = field(default_factory=lambda: default_server_name())
    power: PowerController | None = None   # out-of-band power, shared by API and lifecycle
    consoles: ConsoleService | None = None  # console capture, when the service runs here


def default_server_name() -> str:
    """Unique per process, so two servers on one host keep their own `servers` row."""
    return f"{socket.gethostname()}-{os.getpid()}"


def available() -> list[str]:
    """Services whose package is present in this build."""
    out = []
    for name, mod in SERVICES.items():
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue
            raise
        out.append(name)
    return out


def open_live(config: Config) -> LiveInventory:
    engine = make_engine(config.database_url)
    check_current(engine)
    return LiveInventory(engine, config.database.poll_interval,
                         config.database.write_batch_interval)


async def run(config: Config, only: list[str] | None = None,
              ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    names = [n for n in available() if (only is None or n in only)
             and getattr(config, n).enabled]
    if only:
        missing = [n for n in only if n not in SERVICES]
        if missing:
            raise StartupError(f"--only: unknown service {', '.join(missing)} "
                               f"(known: {', '.join(SERVICES)})")
    live = await asyncio.to_thread(open_live, config)
    ctx = Context(config, live, Metrics(), server_name=config.server.name or default_server_name())
    ctx.shared["services"] = names
    ctx.metrics.attach_inventory(live)
    await live.start()
    power_pool = attach_power(ctx)
    started: list[Service] = []
    try:
        for name in names:
            mod = importlib.import_module(SERVICES[name])
            svc = mod.create_service(ctx)
            try:
                await svc.start()
            except OSError as e:
                raise StartupError(f"{name}: cannot listen: {e}") from None
            started.append(svc)
            log.info("service started name=%s", name)
        await asyncio.to_thread(_register_server, live, ctx.server_name, names,
                                config.server.public_address)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        log.info("bootherd ready services=%s nodes=%d", ",".join(names),
                 len(live.snapshot.nodes))
        if ready:
            ready.set()
        heartbeat = asyncio.create_task(_heartbeat(live, ctx.server_name, names,
                                                   config.server.public_address))
        await stop.wait()
        heartbeat.cancel()
        log.info("bootherd stopping")
    finally:
        for svc in reversed(started):
            try:
                await svc.stop()
            except Exception:  # noqa: BLE001
                log.exception("stopping %s failed", getattr(svc, "name", svc))
        await live.stop()
        power_pool.shutdown(wait=False, cancel_futures=True)
        log.info("bootherd stopped")


def attach_power(ctx: Context) -> Any:
    """Give the context its power controller; returns the pool to shut down at exit."""
    from .power.service import build_controller

    ctx.power, pool = build_controller(ctx.config, ctx.live.engine, ctx.live.record_note,
                                       ctx.metrics.protocol("power"))
    power = ctx.power
    ctx.metrics.gauge("power_in_flight", lambda: power.in_flight)
    ctx.metrics.gauge("power_max_in_flight", lambda: power.max_in_flight)
    return pool


def _register_server(live: LiveInventory, name: str, roles: list[str], address: str) -> None:
    from sqlalchemy import delete, insert

    from .inventory import schema as s

    now = time.time()
    with live.engine.begin() as conn:
        conn.execute(delete(s.servers).where(s.servers.c.name == name))
        conn.execute(insert(s.servers).values(name=name, roles=",".join(roles), address=address,
                                              started=now, heartbeat=now))


async def _heartbeat(live: LiveInventory, name: str, roles: list[str], address: str) -> None:
    from sqlalchemy import update

    from .inventory import schema as s

    def beat() -> None:
        with live.engine.begin() as conn:
            done = conn.execute(update(s.servers).where(s.servers.c.name == name)
                                .values(heartbeat=time.time())).rowcount
        if not done:  # the row was removed (operator clean-up, restored database)
            _register_server(live, name, roles, address)

    while True:
        await asyncio.sleep(5)
        try:
            await asyncio.to_thread(beat)
        except Exception as e:  # noqa: BLE001 - the database may be briefly away
            log.warning("heartbeat failed: %s", str(e).splitlines()[0][:200])

"""`bootherd serve`: the chosen services in one asyncio process, wired explicitly.

`wire` is the one place that builds a process: the inventory it is given, the
lifecycle coordinator, the objects several services share (TMCD's views, the
IPOD secret, the bootinfo order socket, the power controller, the console
capture, the web console's backend), the recovery ladder the coordinator runs
with that controller, and the services, each with its dependencies as
constructor arguments.  `run` starts them (a port that cannot be bound stops
start-up with a message naming the service and address), serves until
SIGTERM/SIGINT, then stops them in reverse order and flushes the inventory
writer.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from . import preflight, privileges
from .config import Config, describe_source
from .inventory.db import check_current, make_engine
from .inventory.db import describe as describe_database
from .inventory.live import LiveInventory
from .lifecycle import Lifecycle
from .logs import event
from .metrics import Metrics
from .preflight import bind_failure
from .reload import Reloader, dump_state
from .sdnotify import Notifier
from .secretfile import read_or_create

log = logging.getLogger("bootherd.service")

# name -> the module of its service class; order is start order.
SERVICES: dict[str, str] = {
    "dhcp": "bootherd.dhcp.service",
    "dhcp6": "bootherd.dhcp6.server",
    "tftp": "bootherd.tftp.service",
    "bootinfo": "bootherd.bootinfo.service",
    "tmcd": "bootherd.tmcd.service",
    "http": "bootherd.web.service",
    "console": "bootherd.power.service",
    "imaging": "bootherd.imaging.service",
}


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class StartupError(RuntimeError):
    pass


@dataclass
class Context:
    """What most services need: configuration, the live inventory, metrics and
    this server's name.  Anything else a service uses is a constructor argument."""

    config: Config
    live: LiveInventory
    metrics: Metrics
    server_name: str = field(default_factory=lambda: default_server_name())


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


def open_live(config: Config, server_name: str = "") -> LiveInventory:
    """The live inventory of an existing, current database (never an empty one made
    here: NoDatabase names the file); `server_name` empty: identity.server_name."""
    from . import identity

    engine = make_engine(config.database_url, create=False)
    check_current(engine)
    name = server_name or identity.server_name(config, engine)
    return LiveInventory(engine, config.database.poll_interval,
                         config.database.write_batch_interval, name)


@dataclass
class Wiring:
    """One process's objects: the lifecycle coordinator and the services."""

    ctx: Context
    lifecycle: Lifecycle
    services: dict[str, Service]
    power: Any = None       # the power controller (API, CLI through the API, lifecycle)
    power_pool: Any = None  # its drivers' threads, shut down last
    hasher: Any = None
    started: list[Service] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.services[name]

    async def start(self) -> None:
        """Start the coordinator, then each service in order; on failure the ones
        started are stopped again and StartupError names the service."""
        await self.lifecycle.start()
        try:
            for name, svc in self.services.items():
                try:
                    await svc.start()
                except OSError as e:
                    raise StartupError(bind_failure(name, e)) from None
                self.started.append(svc)
                event(log, logging.INFO, "service started", service=name)
        except BaseException:
            await self.stop()
            raise
        # What start built (the inventory snapshot, routes, codecs) lives as long as the
        # process: the cyclic collector need not walk it again at every full collection
        # (8 % of the HTTP loop's time in a 100-download storm went to walking it).
        gc.freeze()

    async def stop(self) -> None:
        for svc in reversed(self.started):
            try:
                await svc.stop()
            except Exception:  # noqa: BLE001
                log.exception("stopping %s failed", getattr(svc, "name", svc))
        self.started.clear()
        gc.unfreeze()  # a process that starts servers again (tests) collects the old ones
        await self.lifecycle.stop()
        if self.hasher is not None:
            self.hasher.close()
        if self.power_pool is not None:
            self.power_pool.shutdown(wait=False, cancel_futures=True)


def wire(ctx: Context, names: list[str]) -> Wiring:
    """Build the lifecycle coordinator and the services `names`, each handed what it uses."""
    from .bootinfo.server import OrderSocket

    cfg, live, metrics = ctx.config, ctx.live, ctx.metrics
    orders = OrderSocket(cfg.bootinfo, metrics.protocol("bootinfo")) \
        if "bootinfo" in names else None
    power, power_pool = build_power(ctx)
    lifecycle = Lifecycle(cfg, live, metrics, ctx.server_name, orders=orders,
                          **recovery_parts(cfg, power))
    consoles = None
    services: dict[str, Service] = {}
    hasher = views = None
    if "http" in names or "tmcd" in names:
        from .tmcd.service import make_views

        # One Views: the TMCD server and its HTTP/JSON view share the render cache.
        views = make_views(cfg, lifecycle.bootwhat,
                           read_or_create(cfg.path(cfg.tmcd.ipod_secret_file)).encode())
    if "console" in names:
        from .power.service import build_consoles
        consoles = build_consoles(cfg, live)
    grub = None
    if "tftp" in names or "http" in names:
        from .bootinfo.grub import GrubConfigs

        # One set of GRUB configurations: GRUB reads them over TFTP or over HTTP.
        grub = GrubConfigs(cfg, live, metrics, lifecycle)
    imaging = None
    if "imaging" in names:
        from .imaging.service import ImagingService

        def http_port() -> int:  # the bound one: tests and harnesses ask for port 0
            http = services.get("http")
            return int(getattr(http, "port", 0) or cfg.http.port)

        imaging = ImagingService(cfg, live, metrics, http_port=http_port, lifecycle=lifecycle)
    from .imaging.reload import ReloadActor
    from .lifecycle import StartReload

    # The reload cycle's actor: the image's session waits for the node, power cycles
    # go through the one power controller.
    lifecycle.register(StartReload, ReloadActor(live, imaging, power).start)
    for name in names:
        if name == "console":
            services[name] = consoles
        elif name == "imaging":
            services[name] = imaging
        elif name == "dhcp":
            from .dhcp.service import DhcpService
            services[name] = DhcpService(ctx, lifecycle)
        elif name == "dhcp6":
            from .dhcp6.server import Dhcp6Service
            services[name] = Dhcp6Service(ctx, lifecycle)
        elif name == "tftp":
            from .tftp.service import TFTPService
            services[name] = TFTPService(ctx, lifecycle, grub)
        elif name == "bootinfo":
            from .bootinfo.service import BootinfoService
            assert orders is not None
            services[name] = BootinfoService(cfg, live, metrics, lifecycle, orders)
        elif name == "tmcd":
            from .tmcd.service import TmcdService
            services[name] = TmcdService(cfg, live, metrics, lifecycle, views)
        elif name == "http":
            from .bootinfo import grub as grub_http
            from .bootinfo import ipxe
            from .imaging import http as imaging_http
            from .tmcd import http as tmcd_http
            from .tmcd import useweb
            from .web import ui
            from .web.files import Hasher
            from .web.service import HttpService
            hasher = Hasher(cfg.path(cfg.http.root))
            console = ui.Backend(cfg, live, metrics, ctx.server_name, lifecycle, views, power,
                                 consoles, list(names))
            routes = (partial(ipxe.add_routes, config=cfg, live=live, metrics=metrics,
                              lifecycle=lifecycle),
                      partial(tmcd_http.add_routes, live=live, metrics=metrics, views=views),
                      partial(useweb.add_routes, live=live),
                      partial(grub_http.add_routes, configs=grub),
                      partial(imaging_http.add_routes, config=cfg, live=live, imaging=imaging,
                              lifecycle=lifecycle),
                      partial(ui.add_routes, backend=console))
            services[name] = HttpService(ctx, hasher, lifecycle, routes, list(names), power,
                                         consoles)
        else:
            raise StartupError(f"unknown service {name!r} (known: {', '.join(SERVICES)})")
    return Wiring(ctx, lifecycle, services, power, power_pool, hasher)


async def run(config: Config, only: list[str] | None = None,
              ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    names = [n for n in available() if (only is None or n in only)
             and getattr(config, n).enabled]
    if only:
        missing = [n for n in only if n not in SERVICES]
        if missing:
            raise StartupError(f"--only: unknown service {', '.join(missing)} "
                               f"(known: {', '.join(SERVICES)})")
    log.info("configuration from %s; inventory %s", describe_source(config),
             describe_database(config.database_url))
    live = await asyncio.to_thread(open_live, config)
    try:  # roots and server.public_address, naming the key (after the inventory: a
        preflight.check(config, names)  # wrong folder makes no empty roots either)
    except BaseException:
        live.engine.dispose()
        raise
    ctx = Context(config, live, Metrics(), server_name=live.server_name)
    ctx.metrics.attach_inventory(live)
    wiring = wire(ctx, names)
    notifier = Notifier()
    await live.start()
    tasks: list[asyncio.Task] = []
    try:
        await wiring.start()
        dropped = privileges.drop(config)  # every port is bound: root is no longer needed
        if dropped:
            log.info("%s", dropped)
        address = _advertised_summary(config, names)
        await asyncio.to_thread(_register_server, live, ctx.server_name, names, address,
                                config.server.forget_after)
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        reloader = Reloader(config.source, list(config.overrides), config)
        for sig, fn in ((signal.SIGTERM, stop.set), (signal.SIGINT, stop.set),
                        (signal.SIGHUP, partial(_on_sighup, reloader, notifier)),
                        (signal.SIGUSR1, partial(dump_state, names, ctx.metrics, live))):
            try:
                loop.add_signal_handler(sig, fn)
            except (NotImplementedError, RuntimeError):
                pass
        event(log, logging.INFO, "bootherd ready", services=names,
              nodes=len(live.snapshot.nodes), server=ctx.server_name)
        notifier.ready(f"serving {','.join(names)} for {len(live.snapshot.nodes)} nodes")
        if ready:
            ready.set()
        tasks.append(asyncio.create_task(_heartbeat(live, ctx.server_name, names, address,
                                                    config.server.forget_after)))
        if notifier.watchdog_interval:
            tasks.append(asyncio.create_task(_watchdog(notifier)))
        await stop.wait()
        log.info("bootherd stopping")
        notifier.stopping()
    finally:
        for t in tasks:
            t.cancel()
        await wiring.stop()
        await live.stop()
        notifier.close()
        log.info("bootherd stopped")


def _advertised_summary(config: Config, names: list[str]) -> str:
    """What `bootherd status` shows as the server's address."""
    if config.server.public_address:
        return config.server.public_address
    addresses = (getattr(getattr(config, n), "address", "") for n in names)
    return ",".join(dict.fromkeys(a for a in addresses if a)) or "-"


def _on_sighup(reloader: Reloader, notifier: Notifier) -> None:
    notifier.reloading()
    try:
        reloader.reload()
    except Exception:  # noqa: BLE001 - a failed reload must not take the server down
        log.exception("SIGHUP: reload failed; the running configuration stays")
    notifier.ready()


async def _watchdog(notifier: Notifier) -> None:
    """WATCHDOG=1 from the event loop itself: a loop that stops turning stops the pings."""
    interval = notifier.watchdog_interval or 1.0
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def build_power(ctx: Context) -> tuple[Any, Any]:
    """The process's power controller and its drivers' thread pool (shut down at exit)."""
    from .power.service import build_controller

    power, pool = build_controller(ctx.config, ctx.live.engine, ctx.live.record_note,
                                   ctx.metrics.protocol("power"))
    ctx.metrics.gauge("power_in_flight", lambda: power.in_flight)
    ctx.metrics.gauge("power_max_in_flight", lambda: power.max_in_flight)
    return power, pool


def recovery_parts(cfg: Config, power: Any) -> dict[str, Any]:
    """The coordinator's recovery policy and, for the ladder, its actors' tools: the
    power controller (shared with the API, so cycles share the caps) and the IPOD
    sender (the secret file is read at the first IPOD)."""
    from .lifecycle import Ladder, ResendThenFail

    if cfg.recovery.policy == "resend":
        return {"recovery": ResendThenFail.from_config(cfg.states)}
    from .ipod import Ipod

    secret = cfg.path(cfg.tmcd.ipod_secret_file)
    ipod = Ipod(lambda: read_or_create(secret).encode(), cfg.server.public_address)
    return {"recovery": Ladder.from_config(cfg), "power": power, "ipod": ipod}


def _register_server(live: LiveInventory, name: str, roles: list[str], address: str,
                     forget_after: float = 0.0) -> None:
    from sqlalchemy import delete, insert

    from . import identity
    from .inventory import schema as s

    identity.prune(live.engine, forget_after)
    now = time.time()
    with live.engine.begin() as conn:
        conn.execute(delete(s.servers).where(s.servers.c.name == name))
        conn.execute(insert(s.servers).values(name=name, roles=",".join(roles), address=address,
                                              started=now, heartbeat=now))


async def _heartbeat(live: LiveInventory, name: str, roles: list[str], address: str,
                     forget_after: float = 0.0) -> None:
    from sqlalchemy import update

    from . import identity
    from .inventory import schema as s

    beats = 0

    def beat() -> None:
        with live.engine.begin() as conn:
            done = conn.execute(update(s.servers).where(s.servers.c.name == name)
                                .values(heartbeat=time.time())).rowcount
        if not done:  # the row was removed (operator clean-up, restored database)
            _register_server(live, name, roles, address)
        if beats % 12 == 0:  # once a minute: rows of servers gone for server.forget_after
            identity.prune(live.engine, forget_after)

    while True:
        await asyncio.sleep(5)
        beats += 1
        try:
            await asyncio.to_thread(beat)
        except Exception as e:  # noqa: BLE001 - the database may be briefly away
            log.warning("heartbeat failed: %s", str(e).splitlines()[0][:200])

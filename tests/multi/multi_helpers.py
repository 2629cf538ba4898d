"""Several `bootherd serve` processes on one PostgreSQL, a storm against all of them,
and a TCP forwarder that plays a database outage.

Every server listens on its own loopback address (127.<net>.0.<i+1>) with the same ports,
has its own `server.name`, and shares the TFTP and HTTP roots.  The storm's relay sends
each DHCP request to every server (a relay with several helper addresses).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bootherd.config import load
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.snapshot import load as load_snapshot
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.storm import report, runner

SERVICES = ("dhcp", "tftp", "bootinfo", "tmcd", "http")


def free_ports(hosts: list[str], count: int) -> list[int]:
    """`count` ports free for UDP and TCP on every host."""
    out: list[int] = []
    while len(out) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((hosts[0], 0))
            port = u.getsockname()[1]
        ok = port not in out
        for h in hosts:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as t:
                    try:
                        t.bind((h, port))
                    except OSError:
                        ok = False
        if ok:
            out.append(port)
    return out


@dataclass
class Deployment:
    work: Path
    pg_url: str  # what the test reads (direct)
    hosts: list[str]
    ports: dict[str, int]
    configs: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen | None] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)

    def cfg(self, i: int = 0, overrides: list[str] | None = None) -> Any:
        cwd = os.getcwd()
        os.chdir(self.configs[i].parent)
        try:
            return load(self.configs[i], overrides or [])
        finally:
            os.chdir(cwd)

    def start(self, i: int) -> None:
        d = self.configs[i].parent
        log = open(d / "serve.log", "a")
        p = subprocess.Popen([sys.executable, "-m", "bootherd.cli", "serve", "-c",
                              str(self.configs[i])], cwd=d, stdout=log, stderr=subprocess.STDOUT)
        self.procs[i] = p
        self.logs.append(log)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection((self.hosts[i], self.ports["tmcd"]), timeout=0.5):
                    break
            except OSError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server {i} did not start:\n"
                                       + (d / "serve.log").read_text()[-3000:]) from None
                time.sleep(0.1)
        time.sleep(0.3)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i, signal.SIGTERM)
        for log in self.logs:
            log.close()

    def log(self, i: int) -> str:
        return (self.configs[i].parent / "serve.log").read_text()

    def server_sets(self) -> list[dict[str, tuple[str, int]]]:
        p = self.ports
        return [{"dhcp": (h, p["dhcp"]), "proxy": (h, p["proxy"]), "tftp": (h, p["tftp"]),
                 "bootinfo": (h, p["bootinfo"]), "tmcd": (h, p["tmcd"]), "http": (h, p["http"])}
                for h in self.hosts]


def deploy(work: Path, pg_url: str, servers: int, nodes: int, net: int,
           server_db_url: str | None = None, pool: str = "", extra: str = "") -> Deployment:
    """Inventory of `nodes` (+20) on 127.<net>.0.0/16 in pg_url, configs for `servers`
    servers on 127.<net+1>.0.1.. (not started)."""
    engine = make_engine(pg_url)
    upgrade(engine)
    import_testbed(engine, generate(nodes + 20, subnet=f"127.{net}.0.0/16", seed=3))
    engine.dispose()
    hosts = [f"127.{net + 1}.0.{i + 1}" for i in range(servers)]
    names = ("dhcp", "proxy", "tftp", "bootinfo", "client", "order", "tmcd", "http", "relay",
             "imaging")
    ports = dict(zip(names, free_ports(hosts + [f"127.{net + 1}.0.200"], len(names)),
                     strict=True))
    (work / "tftpboot").mkdir(parents=True, exist_ok=True)
    (work / "www").mkdir(exist_ok=True)
    dep = Deployment(work, pg_url, hosts, ports)
    url = server_db_url or pg_url
    pool_lines = f'unknown_clients = "pool"\ndynamic_pool = "{pool}"\n' if pool else ""
    for i, h in enumerate(hosts):
        d = work / f"srv{i}"
        d.mkdir(exist_ok=True)
        cfg = d / "bootherd.toml"
        cfg.write_text(
            f'[server]\nname = "srv{i}"\npublic_address = "{h}"\n'
            f'[database]\nurl = "{url}"\npoll_interval = 0.1\n'
            f'[dhcp]\naddress = "{h}"\nport = {ports["dhcp"]}\nproxy_port = {ports["proxy"]}\n'
            f'relay_port = {ports["relay"]}\n{pool_lines}'
            f'[tftp]\naddress = "{h}"\nroot = "{work / "tftpboot"}"\nport = {ports["tftp"]}\n'
            f'[bootinfo]\naddress = "{h}"\nport = {ports["bootinfo"]}\n'
            f'client_port = {ports["client"]}\norder_port = {ports["order"]}\n'
            f'[tmcd]\naddress = "{h}"\nport = {ports["tmcd"]}\nfallback_port = 0\n'
            f'ipod_secret_file = "{work / "ipod-secret"}"\n'
            f'[imaging]\naddress = "{h}"\nport = {ports["imaging"]}\n'
            f'[http]\naddress = "{h}"\nport = {ports["http"]}\nroot = "{work / "www"}"\n'
            'log_dir = "nodelogs"\nadmin_token_file = "admin-token"\n'
            '[states]\npxewakeup_timeout = 3.0\n' + extra)
        dep.configs.append(cfg)
        dep.procs.append(None)
    return dep


def storm(dep: Deployment, nodes: int, net: int, seed: int = 5, timeout: float = 200.0,
          spread: float = 1.0, only: list[int] | None = None) -> tuple[dict, dict, float]:
    """Boot `nodes` nodes against the servers (indexes `only`, default all); returns
    (raw, summary, start time)."""
    # The storm reads and writes (swap-in) the database directly, not through a test proxy.
    cfg = dep.cfg(0, [f"database.url={dep.pg_url}"])
    engine = make_engine(dep.pg_url)
    snap = load_snapshot(engine)
    engine.dispose()
    sets = dep.server_sets()
    if only is not None:
        sets = [sets[i] for i in only]
    st = runner.Settings(nodes=nodes, profile="optimized", start_spread=spread, loss=0.0,
                         servers=sets[0], server_sets=sets if len(sets) > 1 else [],
                         order_poll=5.0 if len(sets) > 1 else 0.0,
                         relay_address=f"127.{net + 1}.0.{100 + seed % 50}",
                         relay_port=dep.ports["relay"], seed=seed, timeout=timeout,
                         wait_timeout=120.0, tarball_bytes=64 * 1024, rpm_bytes=16 * 1024)
    started = time.time()
    raw = runner.run(cfg, snap, st)
    return raw, report.summarize(raw), started


def db_check(url: str, node_ids: list[str], since: float, timeout: float = 15.0) -> dict:
    """What the database holds for these nodes once the writers have caught up."""
    engine = make_engine(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with engine.connect() as conn:
                states = {r.node_id: (r.state, r.since) for r in conn.execute(
                    select(s.node_states).where(s.node_states.c.node_id.in_(node_ids)))}
                isup_events = dict(conn.execute(
                    select(s.node_events.c.node_id, func.count())
                    .where(s.node_events.c.node_id.in_(node_ids), s.node_events.c.state == "ISUP",
                           s.node_events.c.ts >= since)
                    .group_by(s.node_events.c.node_id)).all())
                leases = [dict(r._mapping) for r in conn.execute(
                    select(s.leases).where(s.leases.c.node_id.in_(node_ids)))]
                ctrl = {r.node_id: r.ip for r in conn.execute(
                    select(s.interfaces.c.node_id, s.interfaces.c.ip)
                    .where(s.interfaces.c.node_id.in_(node_ids), s.interfaces.c.role == "ctrl"))}
                servers = [dict(r._mapping) for r in conn.execute(select(s.servers))]
                first = node_ids
                history = [tuple(r) for r in conn.execute(
                    select(s.node_events.c.node_id, s.node_events.c.ts, s.node_events.c.state,
                           s.node_events.c.source)
                    .where(s.node_events.c.node_id.in_(first)).order_by(s.node_events.c.id))]
            done = all(states.get(n, ("",))[0] == "ISUP" for n in node_ids) \
                and len(isup_events) == len(node_ids) and len(leases) >= len(node_ids)
            if done or time.monotonic() > deadline:
                return {"states": states, "isup_events": isup_events, "leases": leases,
                        "ctrl": ctrl, "servers": servers, "history": history}
            time.sleep(0.3)
    finally:
        engine.dispose()


def assert_booted_and_unique(summary: dict, raw: dict, db: dict, nodes: int,
                             excused: set[str] = frozenset()) -> None:
    """Every node booted, its ISUP is in the history, one lease row each, no address twice.

    `excused`: nodes whose last event may be missing (told to a server that was then
    killed before its 50 ms batch committed)."""
    assert summary["nodes"] == nodes
    assert summary["failed"] == 0, summary["failure_reasons"]
    assert summary["reached_isup"] == nodes
    ids = [n["node"] for n in raw["nodes"]]
    not_up = [n for n in ids if db["states"].get(n, ("",))[0] != "ISUP" and n not in excused]
    assert not not_up, f"{len(not_up)} nodes not ISUP in node_states: " \
        f"{[(n, db['states'].get(n)) for n in not_up[:5]]} history of {not_up[:1]}: " \
        f"{[h for h in db['history'] if not_up and h[0] == not_up[0]]}"
    missing = [n for n in ids if n not in db["isup_events"] and n not in excused]
    assert not missing, f"{len(missing)} nodes without an ISUP event: {missing[:5]}"
    # One lease row per node, at its inventory address, and no address twice.
    by_node: dict[str, list[dict]] = {}
    for r in db["leases"]:
        by_node.setdefault(r["node_id"], []).append(r)
    assert all(len(by_node.get(n, [])) == 1 for n in ids), \
        [(n, by_node.get(n)) for n in ids if len(by_node.get(n, [])) != 1][:5]
    ips = [r["ip"] for r in db["leases"]]
    assert len(ips) == len(set(ips))
    macs = [r["mac"] for r in db["leases"]]
    assert len(macs) == len(set(macs))
    wrong = [(n, by_node[n][0]["ip"], db["ctrl"].get(n)) for n in ids
             if by_node[n][0]["ip"] != db["ctrl"].get(n)]
    assert not wrong, wrong[:5]


class PgForwarder:
    """A TCP forwarder to PostgreSQL in its own thread; `cut()` closes the listener and
    every connection (the database is unreachable), `restore()` listens again."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432), host: str = "127.0.0.1"):
        self.target = target
        self.host = host
        self.port = free_ports([host], 1)[0]
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.base_events.Server | None = None
        self.conns: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.restore()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        self.conns |= {cw, sw}
        await asyncio.gather(self._pipe(cr, sw), self._pipe(sr, cw))
        self.conns -= {cw, sw}

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._client, self.host, self.port,
                                                 reuse_address=True)

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self.conns):
            w.transport.abort()  # RST: the servers see the database go away at once
        self.conns.clear()

    def restore(self) -> None:
        self._call(self._listen())

    def cut(self) -> None:
        self._call(self._cut())

    def url(self, pg_url: str) -> str:
        head, _, tail = pg_url.rpartition("@")
        _host, _, db = tail.partition("/")
        return f"{head}@{self.host}:{self.port}/{db}"

    def close(self) -> None:
        try:
            self._call(self._cut())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

"""Run a storm: pick the nodes, prepare the files they fetch, start them, collect results.

One asyncio process drives all nodes by default; `workers > 1` splits the
nodes over that many processes (each with its own relay address) when one
core is not enough to play them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import multiprocessing as mp
import os
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from ..config import Config
from ..inventory.model import Snapshot, natural_key
from . import clients as c
from .dhcp6 import Dhcp6Relay
from .net import Loss
from .node import ALL_STATES, FRISBEE_FILES, Env, SimNode, boot

log = logging.getLogger("bootherd.storm")

NODES_ARG = "{nodes}"  # in Settings.power_on_cmd: the storm's node ids
LAG_PROBE_INTERVAL = 0.01  # seconds between the simulator's loop-lag samples

# Stand-in sizes for files the storm creates when the server's roots lack them.
FRISBEE_SIZES = {"kernel.ko.gz": 512 * 1024, "mfsroot.gz": 1024 * 1024,
                 "loader.conf": 16 * 1024}


@dataclass
class Settings:
    nodes: int
    profile: str = "optimized"
    start_spread: float = 1.0
    loss: float = 0.0
    phases: tuple[str, ...] = ("dhcp", "tftp", "loader", "os", "files")
    servers: dict[str, tuple[str, int]] = field(default_factory=dict)
    relay_address: str = "127.0.0.1"
    relay_port: int = 67
    seed: int = 1
    max_reboots: int = 3
    reboot_delay: float = 1.0
    wait_timeout: float = 120.0
    timeout: float = 900.0
    allocate_free: bool = True
    prepare: bool = True
    loader_bytes: int = 70_000
    tarball_bytes: int = 4 * 2**20
    rpm_bytes: int = 1 * 2**20
    workers: int = 1
    # Several servers of one deployment (one NAME -> (host, port) dict each); `servers`
    # is then the first.  See Env.sets.
    server_sets: list[dict[str, tuple[str, int]]] = field(default_factory=list)
    order_poll: float = 0.0
    # 6: the IPv6 profile (storm.dhcp6): UEFI firmware's DHCPv6 through a relay at
    # relay_address (an IPv6 address), then the loader over TFTP or HTTP (`boot6`: pxe,
    # http, or mixed: every other node each), from the nodes' control IPv6 addresses.
    family: int = 4
    boot6: str = "pxe"

    # Simulated Redfish BMCs (storm/bmc.py): their addresses' subnet ("" = none: nodes
    # power on by themselves over start_spread), the share of hung nodes, and the
    # command that powers the nodes on (`bootherd node power on NODES ...`, NODES_ARG
    # standing for the node ids; none: an operator does).
    bmc_subnet: str = ""
    hung: float = 0.0
    power_on_cmd: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Refuse what the profile cannot play, naming the setting."""
        if self.family not in (4, 6):
            raise ValueError(f"family: 4 or 6, got {self.family!r}")
        if self.family == 6:
            if not set(self.phases) <= {"dhcp", "tftp"} or "dhcp" not in self.phases:
                raise ValueError("--family 6 plays the firmware's part: phases dhcp or "
                                 f"dhcp,tftp (got {','.join(self.phases)})")
            if ":" not in self.relay_address:
                raise ValueError("--relay-address: an IPv6 address for --family 6 (the relay "
                                 f"agent's; got {self.relay_address})")
            if self.boot6 not in ("pxe", "http", "mixed"):
                raise ValueError(f"boot6: pxe, http or mixed, got {self.boot6!r}")


def select_nodes(snap: Snapshot, count: int, spread: float, seed: int,
                 family: int = 4, boot6: str = "pxe") -> list[dict[str, Any]]:
    """The first `count` nodes (natural order) whose control IP is a 127.x address
    (`family` 6: that have a control IPv6 address)."""
    import random

    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for nid in sorted(snap.nodes, key=natural_key):
        n = snap.nodes[nid]
        ip, mac = (n.control_ip6 if family == 6 else n.control_ip), n.control_mac
        if not ip or not mac or family == 4 and \
                ipaddress.ip_address(ip) not in ipaddress.ip_network("127.0.0.0/8"):
            continue
        kind = boot6 if boot6 != "mixed" else ("pxe", "http")[len(out) % 2]
        out.append({"node_id": nid, "ip": ip, "mac": bytes.fromhex(mac.replace(":", "")),
                    "loader": n.loaders.get("bios") or "undionly.kpxe",
                    "start_at": rng.uniform(0, spread) if spread > 0 else 0.0,
                    "boot6": kind if family == 6 else ""})
        if len(out) == count:
            break
    if len(out) < count:
        if family == 6:
            raise ValueError(f"the inventory has {len(out)} nodes with a control IPv6 address, "
                             f"{count} asked (generate a testbed with --subnet6 PREFIX)")
        raise ValueError(f"the inventory has {len(out)} nodes with a 127.x control IP, "
                         f"{count} asked (generate a testbed with --subnet 127.64.0.0/16)")
    return out


def prepare_files(cfg: Config, snap: Snapshot, specs: list[dict[str, Any]],
                  st: Settings) -> list[str]:
    """Create the files the nodes will fetch where the server's roots lack them.

    Sparse files: cheap to make, and the servers send them like any other."""
    made: list[str] = []

    def ensure(path: Path, size: int) -> None:
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        made.append(str(path))

    troot = cfg.path(cfg.tftp.root)
    if "tftp" in st.phases:
        for loader in {s["loader"] for s in specs}:
            ensure(troot / loader, st.loader_bytes)
        if st.family == 6:  # UEFI's loaders, by TFTP and by HTTP /boot/ (the same root)
            for s in specs:
                node = snap.nodes[s["node_id"]]
                slot = "uefi" if s["boot6"] == "pxe" else "http"
                loader = node.loaders.get(slot, "")
                if loader and "://" not in loader:
                    ensure(troot / loader.lstrip("/"), st.loader_bytes)
        if st.profile == "legacy":
            for rel, _check in FRISBEE_FILES:
                ensure(troot / rel, FRISBEE_SIZES.get(Path(rel).name, 4096))
    if "files" in st.phases:
        hroot = cfg.path(cfg.http.root)
        exps = {(a.pid, a.eid) for s in specs if (a := snap.nodes[s["node_id"]].allocation)}
        for key in exps:
            for _vname, _dir, path in snap.tarballs.get(key, ()):
                ensure(hroot / path, st.tarball_bytes)
            for _vname, path in snap.rpms.get(key, ()):
                ensure(hroot / path, st.rpm_bytes)
    return made


class SwapIn:
    """Plays the operator: nodes told WAIT are allocated to experiment storm/storm
    (in batches), so the server wakes them with an ORDER, as after a swap-in."""

    PID = EID = "storm"

    def __init__(self, database_url: str):
        self.url = database_url
        self.pending: set[str] = set()
        self.allocated = 0
        self._task: asyncio.Task | None = None

    def add(self, node_id: str) -> None:
        self.pending.add(node_id)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        from ..inventory.db import make_engine

        engine = make_engine(self.url)
        while True:
            await asyncio.sleep(0.5)
            if not self.pending:
                continue
            batch, self.pending = self.pending, set()
            try:
                self.allocated += await asyncio.to_thread(self._allocate, engine, sorted(batch))
            except Exception as e:  # noqa: BLE001 - a DB hiccup must not stop the storm
                log.warning("storm: allocating waiting nodes failed: %s", e)
                self.pending |= batch

    def _allocate(self, engine: Any, node_ids: list[str]) -> int:
        from sqlalchemy import insert, select

        from ..inventory import schema as s

        with engine.begin() as conn:
            if conn.execute(select(s.experiments.c.pid).where(
                    s.experiments.c.pid == self.PID, s.experiments.c.eid == self.EID)).first() is None:
                login = conn.execute(select(s.users.c.login).limit(1)).scalar()
                if login is None:
                    raise RuntimeError("no user in the inventory to own the storm experiment")
                conn.execute(insert(s.experiments).values(pid=self.PID, eid=self.EID, creator=login,
                                                          swapper=login))
                conn.execute(insert(s.experiment_members).values(pid=self.PID, eid=self.EID,
                                                                 login=login, root=True))
            taken = set(conn.execute(select(s.allocations.c.node_id).where(
                s.allocations.c.node_id.in_(node_ids))).scalars())
            rows = [{"node_id": n, "pid": self.PID, "eid": self.EID, "vname": n}
                    for n in node_ids if n not in taken]
            if rows:
                conn.execute(insert(s.allocations), rows)
        return len(rows)


def _endpoints(cfg: Config, st: Settings) -> dict[str, Any]:
    base = _endpoints_of(cfg, st.servers)
    if len(st.server_sets) > 1:
        base["sets"] = [_endpoints_of(cfg, sv) for sv in st.server_sets]
    return base


def _endpoints_of(cfg: Config, sv: dict[str, tuple[str, int]]) -> dict[str, Any]:

    def pick(name: str, host: str, port: int) -> tuple[str, int]:
        return sv.get(name, (host, port))

    tm = cfg.tmcd
    tmcd = [sv["tmcd"]] if "tmcd" in sv else [(tm.address, tm.port)] + (
        [(tm.address, tm.fallback_port)] if tm.fallback_port else [])
    return {
        "dhcp": pick("dhcp", cfg.dhcp.address, cfg.dhcp.port),
        "dhcp6": pick("dhcp6", cfg.dhcp6.address, cfg.dhcp6.port),
        "proxy": pick("proxy", cfg.dhcp.address, cfg.dhcp.proxy_port),
        "dhcp_client_port": cfg.dhcp.client_port,
        "tftp": pick("tftp", cfg.tftp.address, cfg.tftp.port),
        "bootinfo": pick("bootinfo", cfg.bootinfo.address, cfg.bootinfo.port),
        "bootinfo_client_port": cfg.bootinfo.client_port,
        "order_port": cfg.bootinfo.order_port,
        "tmcd": tmcd,
        "http": pick("http", cfg.http.address, cfg.http.port),
        "http_override": "http" in sv,
    }


async def run_nodes(specs: list[dict[str, Any]], st: Settings, endpoints: dict[str, Any],
                    t0: float, relay_address: str, database_url: str | None,
                    counts_cb: Callable[[dict[str, int]], None] | None = None,
                    seed: int = 1, power_db: str | None = None) -> dict[str, Any]:
    """Play `specs` in this event loop; returns per-node results and run-wide figures."""
    loss = Loss(st.loss, seed)
    env = Env(profile=st.profile, phases=st.phases, loss=loss, max_reboots=st.max_reboots,
              reboot_delay=st.reboot_delay, wait_timeout=st.wait_timeout,
              order_poll=st.order_poll, **endpoints)
    env.counts["off"] = len(specs)
    swapin = SwapIn(database_url) if (st.allocate_free and database_url) else None
    if swapin is not None:
        env.on_wait = swapin.add
        swapin.start()
    if "dhcp" in st.phases and st.family == 6:
        env.relay6 = await Dhcp6Relay.open(loss, relay_address)
    elif "dhcp" in st.phases:
        env.relay = await c.DhcpRelay.open(loss, relay_address, st.relay_port)
    nodes = [SimNode(s["node_id"], s["ip"], s["mac"], s["loader"], s["start_at"],
                     boot6=s["boot6"]) for s in specs]
    farm = None
    if st.bmc_subnet:  # each node boots when its BMC powers it on
        from . import bmc

        farm = bmc.BmcFarm(nodes, env, st.bmc_subnet, st.hung, st.seed)
        await farm.start()
        if power_db:
            await asyncio.to_thread(bmc.register, power_db, farm)
        tasks = []
    else:
        tasks = [asyncio.ensure_future(boot(n, env, t0)) for n in nodes]
    # The instrument's own check: how late this loop wakes for a 10 ms sleep.  A late
    # loop fires the nodes' firmware timers late and reads the server's answers late, so
    # a storm whose lag nears the timers (1 s for TFTP) measured the simulator.
    lag: list[float] = []

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_PROBE_INTERVAL
            await asyncio.sleep(LAG_PROBE_INTERVAL)
            lag.append(max(0.0, loop.time() - due))
    prober = asyncio.ensure_future(probe())
    ticker = None
    if counts_cb is not None:
        async def tick() -> None:
            while True:
                counts_cb(dict(env.counts))
                await asyncio.sleep(0.2)
        ticker = asyncio.ensure_future(tick())
    power_on: dict[str, Any] = {}
    try:
        if farm is not None:
            ids = [n.node_id for n in nodes]
            cmd = [a for arg in st.power_on_cmd for a in (ids if arg == NODES_ARG else [arg])]
            launch = asyncio.ensure_future(_power_on(cmd, power_on)) if cmd else None
            await farm.wait(st.timeout, done=lambda: launch.done() if launch else farm.last_action > 0)
            if launch is not None:
                launch.cancel()
            await farm.stop()
            if power_db:
                power_on["server_on"] = await asyncio.to_thread(
                    bmc.server_power_ons, power_db, [n.node_id for n in nodes], t0 - 1)
        else:
            _done, pending = await asyncio.wait(tasks, timeout=st.timeout + st.start_spread)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        for n in nodes:
            if n.state not in ("up", "failed"):
                n.fail_phase, n.reason = n.state, f"storm timeout ({st.timeout:.0f}s) in {n.state}"
                n.t_end = time.time()
                n.enter(env, "failed")
    finally:
        prober.cancel()
        if ticker is not None:
            ticker.cancel()
        if counts_cb is not None:
            counts_cb(dict(env.counts))
        if swapin is not None:
            await swapin.stop()
        for relay in (env.relay, env.relay6):
            if relay is not None:
                relay.close()
    relay = env.relay or env.relay6
    return {"nodes": [n.result() for n in nodes],
            "dropped": {"sent": loss.dropped_out, "received": loss.dropped_in},
            "swapped_in": swapin.allocated if swapin else 0,
            "stray_dhcp": relay.stray if relay else 0,
            "timer_lag": lag,
            **({"power": {**farm.report(), "server_on": power_on.pop("server_on", []),
                          "power_on": power_on}} if farm is not None else {})}


async def _power_on(cmd: list[str], out: dict[str, Any]) -> None:
    """Run the operator's power-on command (bootherd node power on ... --json); its
    per-node results summarized into `out`."""
    t = time.time()
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    out.update({"rc": proc.returncode, "seconds": round(time.time() - t, 2),
                "stderr": stderr.decode(errors="replace")[-2000:]})
    try:
        results = json.loads(stdout)["results"]
    except (ValueError, KeyError, TypeError):
        out["stdout"] = stdout.decode(errors="replace")[-2000:]
        return
    out["ok"] = sum(1 for r in results if r.get("ok"))
    out["errors"] = dict(Counter(r.get("error") or "?" for r in results if not r.get("ok")))


def _worker(idx: int, specs: list[dict[str, Any]], st: Settings, endpoints: dict[str, Any],
            t0: float, relay_address: str, database_url: str | None, counts: Any,
            out: Any) -> None:
    def publish(cs: dict[str, int]) -> None:
        for i, name in enumerate(ALL_STATES):
            counts[idx * len(ALL_STATES) + i] = cs.get(name, 0)
    try:
        res = uvloop.run(run_nodes(specs, st, endpoints, t0, relay_address, database_url,
                                   publish, seed=st.seed + idx))
        out.put((idx, res))
    except BaseException as e:  # noqa: BLE001 - report, never hang the parent
        out.put((idx, {"error": f"{type(e).__name__}: {e}"}))


def run(cfg: Config, snap: Snapshot, st: Settings,
        progress: Callable[[dict[str, int]], None] | None = None) -> dict[str, Any]:
    """The whole storm, blocking; returns raw results (see report.summarize)."""
    st.check()
    specs = select_nodes(snap, st.nodes, st.start_spread, st.seed, st.family, st.boot6)
    made = prepare_files(cfg, snap, specs, st) if st.prepare else []
    endpoints = _endpoints(cfg, st)
    db = cfg.database_url if st.allocate_free else None
    t0 = time.time() + 0.3
    started = time.time()
    workers = max(1, min(st.workers, len(specs) or 1))
    # The simulator's own CPU (this process, or its workers once they are joined): a storm
    # whose simulator used a whole core measured the simulator, not the server.
    cpu0 = _cpu(resource.RUSAGE_SELF if workers == 1 else resource.RUSAGE_CHILDREN)
    if st.bmc_subnet and workers > 1:
        raise ValueError("simulated BMCs run in one storm process (--workers 1)")
    if workers == 1:
        res = uvloop.run(run_nodes(specs, st, endpoints, t0, st.relay_address, db,
                                   progress, st.seed,
                                   power_db=cfg.database_url if st.bmc_subnet else None))
        parts = [res]
    else:
        parts = _run_workers(specs, st, endpoints, t0, db, workers, progress)
    cpu = _cpu(resource.RUSAGE_SELF if workers == 1 else resource.RUSAGE_CHILDREN) - cpu0
    nodes = [n for p in parts for n in p["nodes"]]
    return {
        "storm_cpu": cpu,
        "settings": asdict(st), "t0": t0, "started": started, "finished": time.time(),
        "nodes": nodes, "files_created": len(made),
        "dropped": {k: sum(p["dropped"][k] for p in parts) for k in ("sent", "received")},
        "swapped_in": sum(p["swapped_in"] for p in parts),
        "stray_dhcp": sum(p["stray_dhcp"] for p in parts),
        "timer_lag": [x for p in parts for x in p["timer_lag"]],
        "workers": workers,
        **({"power": parts[0]["power"]} if st.bmc_subnet else {}),
    }


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _relay_for(base: str, idx: int) -> str:
    return str(ipaddress.ip_address(base) + idx)


def _run_workers(specs: list[dict[str, Any]], st: Settings, endpoints: dict[str, Any], t0: float,
                 db: str | None, workers: int,
                 progress: Callable[[dict[str, int]], None] | None) -> list[dict[str, Any]]:
    ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
    counts = ctx.Array("i", workers * len(ALL_STATES), lock=False)
    out = ctx.Queue()
    procs = []
    for i in range(workers):
        part = specs[i::workers]
        p = ctx.Process(target=_worker, args=(i, part, st, endpoints, t0,
                                              _relay_for(st.relay_address, i), db, counts, out),
                        daemon=True)
        p.start()
        procs.append(p)
    results: dict[int, dict[str, Any]] = {}
    import queue

    while len(results) < workers:
        try:
            idx, res = out.get(timeout=0.2)
            results[idx] = res
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and out.empty():
                break
        if progress is not None:
            total = dict.fromkeys(ALL_STATES, 0)
            for w in range(workers):
                for i, name in enumerate(ALL_STATES):
                    total[name] += counts[w * len(ALL_STATES) + i]
            progress(total)
    for p in procs:
        p.join(5)
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors or len(results) < workers:
        raise RuntimeError("storm worker failed: " + "; ".join(errors or ["worker died"]))
    return [results[i] for i in range(workers)]

"""Simulated BMCs for the storm: each virtual node has a Redfish BMC on its own
address, and a node boots only when its BMC powers it on.

`bootherd storm --bmc` starts one small Redfish service per node (the subset of
DMTF Redfish that sushy, bootherd's Redfish driver, uses: the service root, the
systems collection, one ComputerSystem with its PowerState and one-time boot
override, the ComputerSystem.Reset action), all in the storm's event loop, each
bound to the node's BMC address (``--bmc-subnet``, one 127.x address per node)
behind HTTP basic auth.  The storm writes these BMCs into the inventory's
node_power rows (driver redfish, a URL, a generated password), as a site wires
its BMCs, so `bootherd node power on` of the storm's nodes *is* the storm, and
the server's recovery ladder cycles nodes through them like real ones.

Hung nodes (``--hung F``): that share of the nodes hangs in its kernel on its
first boot (after the loader, before the OS's DHCP: the server sees BOOTING and
no more); a power cycle or reset through its BMC boots it afresh, and it boots
normally.  The BMC counts what it was asked (power-ons, cycles, resets, offs)
and when, which is the report's power section and its ramp plot.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .node import Env, SimNode, boot

USER = "storm"
SYSTEM = "/redfish/v1/Systems/1"
RESET = f"{SYSTEM}/Actions/ComputerSystem.Reset"
RESET_TYPES = ("On", "ForceOff", "GracefulShutdown", "ForceRestart", "PowerCycle", "Nmi")
BOOT_TARGETS = ("None", "Pxe", "Hdd")


@dataclass
class SimBmc:
    """One node's BMC: its power, its boot override, what it was asked and when."""

    node: SimNode
    address: str
    power: bool = False
    boot_override: str = "None"
    hung: bool = False           # the node's kernel hangs on its first boot
    hangs: int = 0               # times it did
    task: asyncio.Task | None = None
    actions: list[tuple[float, str]] = field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(a for _, a in self.actions)


class BmcFarm:
    """Every node's simulated BMC, served from this event loop."""

    def __init__(self, nodes: list[SimNode], env: Env, subnet: str, hung_share: float = 0.0,
                 seed: int = 1, port: int = 0):
        hosts = ipaddress.ip_network(subnet).hosts()
        self.env = env
        self.password = secrets.token_urlsafe(12)
        self._basic = "Basic " + base64.b64encode(f"{USER}:{self.password}".encode()).decode()
        self.port = port
        self.bmcs: dict[str, SimBmc] = {}
        self.by_address: dict[str, SimBmc] = {}
        for n in nodes:
            b = SimBmc(n, str(next(hosts)))
            self.bmcs[n.node_id] = self.by_address[b.address] = b
        rng = random.Random(seed)
        k = round(len(nodes) * hung_share)
        for nid in rng.sample(sorted(self.bmcs), k) if k else []:
            self.bmcs[nid].hung = True
        env.hang = self._hang
        self._runner: web.AppRunner | None = None
        self.requests = 0
        self.refused = 0
        self.last_action = 0.0

    # -- the Redfish service ----------------------------------------------------------

    async def start(self) -> None:
        if not self.port:
            from ..procs import free_port

            self.port = free_port(next(iter(self.by_address), "127.0.0.1"))
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/redfish/v1/", self._root)
        app.router.add_get("/redfish/v1", self._root)
        app.router.add_get("/redfish/v1/Systems", self._systems)
        app.router.add_get(SYSTEM, self._system)
        app.router.add_patch(SYSTEM, self._patch)
        app.router.add_post(RESET, self._reset)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        for addr in self.by_address:
            await web.TCPSite(self._runner, addr, self.port, backlog=64).start()

    async def stop(self) -> None:
        for b in self.bmcs.values():
            if b.task is not None:
                b.task.cancel()
        tasks = [b.task for b in self.bmcs.values() if b.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, node_id: str) -> str:
        return f"http://{self.bmcs[node_id].address}:{self.port}"

    def _bmc(self, request: web.Request) -> SimBmc:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        b = self.by_address.get(sock[0]) if sock else None
        if b is None:
            raise web.HTTPNotFound()
        return b

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        if request.path.rstrip("/") == "/redfish/v1":
            return await handler(request)  # the service root is public (DSP0266)
        if not secrets.compare_digest(request.headers.get("Authorization", ""), self._basic):
            self.refused += 1
            return _error(401, "Base.1.0.NoValidSession", "authentication required",
                          {"WWW-Authenticate": 'Basic realm="storm BMC"'})
        return await handler(request)

    async def _root(self, request: web.Request) -> web.Response:
        b = self._bmc(request)
        return _json({"@odata.id": "/redfish/v1/", "@odata.type": "#ServiceRoot.v1_5_0.ServiceRoot",
                      "Id": "RootService", "Name": f"storm BMC of {b.node.node_id}",
                      "RedfishVersion": "1.5.0", "UUID": _uuid(b),
                      "Systems": {"@odata.id": "/redfish/v1/Systems"}})

    async def _systems(self, request: web.Request) -> web.Response:
        self._bmc(request)
        return _json({"@odata.id": "/redfish/v1/Systems",
                      "@odata.type": "#ComputerSystemCollection.ComputerSystemCollection",
                      "Name": "Computer System Collection", "Members@odata.count": 1,
                      "Members": [{"@odata.id": SYSTEM}]})

    async def _system(self, request: web.Request) -> web.Response:
        b = self._bmc(request)
        return _json({
            "@odata.id": SYSTEM, "@odata.type": "#ComputerSystem.v1_10_0.ComputerSystem",
            "Id": "1", "Name": b.node.node_id, "UUID": _uuid(b),
            "PowerState": "On" if b.power else "Off",
            "Boot": {"BootSourceOverrideEnabled": "Once" if b.boot_override != "None"
                     else "Disabled",
                     "BootSourceOverrideTarget": b.boot_override,
                     "BootSourceOverrideTarget@Redfish.AllowableValues": list(BOOT_TARGETS),
                     "BootSourceOverrideMode": "Legacy"},
            "Actions": {"#ComputerSystem.Reset": {
                "target": RESET, "ResetType@Redfish.AllowableValues": list(RESET_TYPES)}},
        })

    async def _patch(self, request: web.Request) -> web.Response:
        b = self._bmc(request)
        body = await _body(request)
        boot_ = body.get("Boot")
        if not isinstance(boot_, dict):
            return _error(400, "Base.1.0.PropertyMissing", "only Boot can be set")
        target = boot_.get("BootSourceOverrideTarget", b.boot_override)
        if target not in BOOT_TARGETS:
            return _error(400, "Base.1.0.PropertyValueNotInList", f"no boot target {target!r}")
        b.boot_override = "None" if boot_.get("BootSourceOverrideEnabled") == "Disabled" \
            else target
        return web.Response(status=204)

    async def _reset(self, request: web.Request) -> web.Response:
        b = self._bmc(request)
        kind = (await _body(request)).get("ResetType")
        if kind not in RESET_TYPES:
            return _error(400, "Base.1.0.ActionParameterNotSupported",
                          f"ResetType must be one of {', '.join(RESET_TYPES)}")
        self.act(b, kind)
        return web.Response(status=204)

    # -- the chassis -------------------------------------------------------------------

    def act(self, b: SimBmc, kind: str) -> None:
        """What a reset type does to the node (Nmi: nothing a storm node notices)."""
        now = time.time()
        self.last_action = now
        if kind == "On":
            b.actions.append((now, "on"))
            if not b.power:
                self._power_on(b)
        elif kind in ("ForceOff", "GracefulShutdown"):
            b.actions.append((now, "off"))
            self._power_off(b)
        elif kind in ("ForceRestart", "PowerCycle"):
            b.actions.append((now, "cycle" if b.power else "on"))
            self._power_off(b)
            self._power_on(b)

    def _power_on(self, b: SimBmc) -> None:
        b.power = True
        n = b.node
        # A fresh boot now (boot() waits until t0 + start_at), the override used up.
        b.boot_override = "None"
        b.task = asyncio.ensure_future(boot(n, self.env, time.time() - n.start_at))

    def _power_off(self, b: SimBmc) -> None:
        b.power = False
        if b.task is not None and not b.task.done():
            b.task.cancel()
        b.task = None
        n = b.node
        if n.state != "off":
            n.reason = n.fail_phase = ""
            n.enter(self.env, "off")

    async def _hang(self, node: SimNode) -> None:
        """Env.hang: called as the node's OS starts; a hung node's kernel never goes on."""
        b = self.bmcs.get(node.node_id)
        if b is None or not b.hung or b.hangs:
            return
        b.hangs += 1
        await asyncio.Event().wait()  # until its BMC cuts the power

    # -- waiting and the report --------------------------------------------------------

    def settled(self, quiet: float, since: float) -> bool:
        """Every node is up, or off/failed with no BMC action for `quiet` seconds
        (counted from `since` when there was none)."""
        nodes = [b.node for b in self.bmcs.values()]
        if all(n.state == "up" for n in nodes):
            return True
        if any(n.state not in ("up", "failed", "off") for n in nodes):
            return False
        return time.time() - max(self.last_action, since) > quiet

    async def wait(self, timeout: float, quiet: float = 60.0,
                   done: Any = lambda: True) -> None:
        """Until the storm settled (see `settled`; the quiet time counts only once
        `done()`: the power-on command has ended) or `timeout`."""
        deadline = time.time() + timeout
        since = 0.0
        while time.time() < deadline:
            if not since and done():
                since = time.time()
            if since and self.settled(quiet, since):
                return
            await asyncio.sleep(0.25)  # a poll: settling is a quiet time, not an event

    def report(self) -> dict[str, Any]:
        per_node = {}
        for nid, b in self.bmcs.items():
            c = b.counts()
            per_node[nid] = {"hung": b.hung, "hangs": b.hangs, "on": c["on"], "off": c["off"],
                             "cycles": c["cycle"],
                             "actions": [[round(t, 3), a] for t, a in b.actions]}
        first_on = sorted(min(t for t, a in b.actions if a == "on")
                          for b in self.bmcs.values() if any(a == "on" for _, a in b.actions))
        return {"bmcs": len(self.bmcs), "requests": self.requests, "refused": self.refused,
                "powered_on": len(first_on), "first_on": first_on, "nodes": per_node}


def summarize(power: dict[str, Any], results: list[dict[str, Any]],
              cap: float) -> dict[str, Any]:
    """The storm report's power section: the ramp against the cap, the hung nodes and
    how many cycles each node got."""
    up = {r["node"] for r in results if r["outcome"] == "up"}
    t = power["first_on"]
    span = (t[-1] - t[0]) if len(t) > 1 else 0.0
    sent = power.get("server_on", [])
    sent_span = (sent[-1] - sent[0]) if len(sent) > 1 else 0.0
    nodes = power["nodes"]
    hung = sorted(n for n, v in nodes.items() if v["hung"])
    return {
        "bmcs": power["bmcs"], "powered_on": power["powered_on"], "cap_per_s": cap,
        # As the BMCs saw it (after a few Redfish requests each, so with jitter) ...
        "ramp_s": round(span, 2),
        "ramp_rate_per_s": round((len(t) - 1) / span, 2) if span else None,
        "max_in_one_second": _max_in(t, 1.0),
        # ... and as the server sent them (its ramp).
        "server_sent": len(sent), "server_ramp_s": round(sent_span, 2),
        "server_rate_per_s": round((len(sent) - 1) / sent_span, 2) if sent_span else None,
        "server_max_in_one_second": _max_in(sent, 1.0),
        "hung": len(hung), "hung_recovered": sum(1 for n in hung if n in up),
        "hung_not_recovered": [n for n in hung if n not in up],
        "cycles_per_node": dict(sorted(Counter(v["cycles"] for v in nodes.values()).items())),
        "cycles_of_hung_nodes": {n: nodes[n]["cycles"] for n in hung},
        "cycles_of_healthy_nodes": sum(v["cycles"] for n, v in nodes.items() if n not in hung),
        "bmc_requests": power["requests"], "bmc_refused": power["refused"],
    }


def print_summary(s: dict[str, Any], power_on: dict[str, Any], console: Any) -> None:
    rate = s["ramp_rate_per_s"]
    console.print(f"BMCs: {s['bmcs']} simulated Redfish BMCs, {s['powered_on']} nodes powered on "
                  f"over {s['ramp_s']:.1f} s ({rate if rate is not None else '-'} /s, cap "
                  f"{s['cap_per_s']:g} /s, at most {s['max_in_one_second']} in one second)")
    if s["server_sent"]:
        console.print(f"server: {s['server_sent']} power-ons sent over {s['server_ramp_s']:.1f} s "
                      f"({s['server_rate_per_s']} /s, at most {s['server_max_in_one_second']} "
                      "in one second)")
    if power_on:
        console.print(f"power-on command: exit {power_on.get('rc')}, {power_on.get('ok', '?')} ok "
                      f"in {power_on.get('seconds', '?')} s"
                      + (f", errors {power_on['errors']}" if power_on.get("errors") else ""))
    console.print(f"hung nodes: {s['hung']}, recovered to ISUP: {s['hung_recovered']}"
                  + (f", NOT recovered: {', '.join(s['hung_not_recovered'])}"
                     if s["hung_not_recovered"] else ""))
    console.print(f"power cycles per node (cycles: nodes): {s['cycles_per_node']}; "
                  f"cycles of healthy nodes: {s['cycles_of_healthy_nodes']}")


def plot_ramp(path: str, power: dict[str, Any], cap: float) -> None:
    """Power-ons over time (each BMC's first On) against the cap, and the cycles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = power["first_on"]
    if not t:
        return
    t0 = t[0]
    xs = [x - t0 for x in t]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.step(xs, range(1, len(xs) + 1), where="post", label="nodes powered on (BMC On)")
    sent = [x - t0 for x in power.get("server_on", [])]
    if sent:
        ax.step(sent, range(1, len(sent) + 1), where="post", label="power-ons sent (server)")
    if cap > 0:
        ax.plot([0, xs[-1]], [1, 1 + cap * xs[-1]], "--", label=f"cap: {cap:g} power-ons/s")
    cycles = sorted(ts - t0 for v in power["nodes"].values() for ts, a in v["actions"]
                    if a == "cycle")
    if cycles:
        ax.plot(cycles, range(1, len(cycles) + 1), "r.", label="power cycles (recovery ladder)")
    ax.set_xlabel("seconds since the first power-on")
    ax.set_ylabel("nodes")
    ax.set_title(f"storm power-on ramp: {len(xs)} nodes")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def register(database_url: str, farm: BmcFarm) -> int:
    """Write the farm's BMCs into the inventory (node_power), as a site wires its own."""
    from sqlalchemy import delete, insert

    from ..inventory import schema as s
    from ..inventory.db import make_engine

    engine = make_engine(database_url)
    try:
        rows = [{"node_id": nid, "driver": "redfish", "address": farm.url(nid), "port": 0,
                 "user": USER, "password": farm.password, "system": "", "console": ""}
                for nid in farm.bmcs]
        with engine.begin() as conn:
            conn.execute(delete(s.node_power).where(s.node_power.c.node_id.in_(list(farm.bmcs))))
            if rows:
                conn.execute(insert(s.node_power), rows)
        return len(rows)
    finally:
        engine.dispose()


def server_power_ons(database_url: str, node_ids: list[str], since: float) -> list[float]:
    """When the server sent each power-on (its POWER_ON events: the controller stamps
    them with the command's start, its ramp slot), since `since`."""
    from sqlalchemy import select

    from ..inventory import schema as s
    from ..inventory.db import make_engine

    ev = s.node_events
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return sorted(conn.execute(select(ev.c.ts).where(
                ev.c.state == "POWER_ON", ev.c.ts >= since,
                ev.c.node_id.in_(node_ids))).scalars())
    finally:
        engine.dispose()


def _max_in(ts: list[float], window: float) -> int:
    """The most timestamps within any `window` seconds (ts sorted)."""
    best, j = 0, 0
    for i, t in enumerate(ts):
        while ts[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def _uuid(b: SimBmc) -> str:
    return f"5707a9e0-0000-4000-8000-{int(ipaddress.ip_address(b.address)):012x}"


def _json(doc: dict[str, Any]) -> web.Response:
    return web.Response(text=json.dumps(doc), content_type="application/json")


def _error(status: int, code: str, message: str,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, headers=headers, content_type="application/json",
                        text=json.dumps({"error": {"code": code, "message": message}}))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text='{"error": {"message": "not JSON"}}',
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": {"message": "not a JSON object"}}',
                                 content_type="application/json")
    return body

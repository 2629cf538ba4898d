"""The coordinator at work: a thin asyncio runner around `core.Coordinator`.

It stamps `now`, carries out the effects the coordinator returns (state events
and lifecycle memory through the inventory's batched writer, orders through
the order sender the bootinfo transport provides, next_os clearing in a
thread, and any effect type an actor registered), runs the watcher's
`tick` every `states.check_interval` seconds and confirms its candidates
against the inventory before resolving them, and feeds it inventory changes.

Protocols call the methods in "reported by protocols" below; they are plain
synchronous calls on the event loop (nothing on them waits for the database).
Given the server's power controller, it also runs the recovery ladder's actors
(`actors.RecoveryActors`: power cycles, IPODs, power-state sync).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..boottype import BootType
from ..inventory.live import LifecycleRow, LiveInventory
from ..inventory.model import Node, Snapshot
from ..policy import BootDecision, clear_next_os
from . import store
from .actors import RecoveryActors
from .core import (
    Candidate,
    ClearNextOS,
    Coordinator,
    Effect,
    RecordState,
    RecoveryPolicy,
    Remember,
    SendOrder,
    StartReload,
    Via,
)
from .ladder import PowerCycle, SendIpod

log = logging.getLogger("bootherd.lifecycle")


class OrderSender(Protocol):
    """Sends bootinfo ORDERs (the bootinfo transport provides one)."""

    @property
    def running(self) -> bool: ...

    def send(self, ip: str, kind: BootType) -> str:
        """Send; return a one-line report.  Raises OSError."""
        ...


Executor = Callable[[Any], Any]


class Lifecycle:
    """One per `bootherd serve` process; every service gets it as a constructor argument."""

    def __init__(self, config: Any, live: LiveInventory, metrics: Any, server_name: str, *,
                 orders: OrderSender | None = None, recovery: RecoveryPolicy | None = None,
                 power: Any = None, ipod: Any = None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.live = live
        self.orders = orders
        self.clock = clock
        self.core = Coordinator(config, server_name, live.states, recovery)
        self.counters = metrics.protocol("lifecycle")
        self._executors: dict[type, Executor] = {
            RecordState: self._record, Remember: self._remember,
            SendOrder: self._send, ClearNextOS: self._clear}
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.actors: RecoveryActors | None = None
        if power is not None:
            self.actors = RecoveryActors(self, power, ipod, clock)
            self.actors.register()
        live.on_change(self._on_change)

    # -- extension -----------------------------------------------------------------

    def register(self, effect_type: type, execute: Executor) -> None:
        """An actor (power driver, imager) carries out its own effect type; `execute`
        may return an awaitable, which runs as a task."""
        self._executors[effect_type] = execute

    # -- start and stop -------------------------------------------------------------

    async def start(self) -> None:
        rows = await asyncio.to_thread(store.load, self.live.engine)
        self.core.restore(rows)
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="lifecycle-watcher")
        if self.actors is not None:
            self.actors.start()

    async def stop(self) -> None:
        if self.actors is not None:
            await self.actors.stop()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.drain()

    async def drain(self) -> None:
        """Wait for effects still running (next_os clearings, actors' work)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- carrying out effects ---------------------------------------------------------

    def execute(self, effects: Iterable[Effect],
                committed: Callable[[], None] | None = None) -> str:
        """Carry out effects in order; a failed order stops the rest (they assumed it
        went out) and raises.  `committed` is called once the last state event is in
        the database.  Returns the order's report, if one was sent."""
        effects = list(effects)
        last_state = -1
        if committed is not None:
            last_state = max((i for i, e in enumerate(effects) if isinstance(e, RecordState)),
                             default=-1)
        report = ""
        for i, e in enumerate(effects):
            if i == last_state:
                self._record(e, committed)
                continue
            run = self._executors.get(type(e))
            if run is None:
                raise TypeError(f"no executor for {type(e).__name__}")
            out = run(e)
            if inspect.isawaitable(out):
                self._spawn(out)
            elif isinstance(out, str):
                report = out
        return report

    def _record(self, e: RecordState, committed: Callable[[], None] | None = None) -> None:
        if not e.moves:  # a line in the history only
            self.live.record_note(e.node_id, e.state, e.source, e.ts, e.detail)
            return
        self.live.record_state(e.node_id, e.state, e.source, e.detail, ts=e.ts,
                               committed=committed)

    def _remember(self, e: Remember) -> None:
        self.live.writer.lifecycle(LifecycleRow(e.node_id, dict(e.fields), e.ts))

    def _send(self, e: SendOrder) -> str:
        if self.orders is None or not self.orders.running:
            raise OSError("bootinfo server is not running")
        report = self.orders.send(e.ip, e.kind)
        self.counters["orders"] += 1
        self.counters[{"wake": "auto_wakeups", "recovery": "resends",
                       "reload": "reload_orders"}.get(e.cause, "operator_orders")] += 1
        return report

    async def _clear(self, e: ClearNextOS) -> None:
        try:
            await asyncio.to_thread(clear_next_os, self.live.engine, e.node_id, e.image)
        except Exception as err:  # noqa: BLE001 - logged; the node got its answer already
            log.warning("clearing next_os of %s failed: %s", e.node_id, err)

    def feed(self, step: Callable[[Coordinator, float], Iterable[Effect]]) -> None:
        """An actor reports an outcome: `step(coordinator, now)` returns what follows,
        which is carried out here (each node's effects on their own)."""
        for node_id, group in _by_node(list(step(self.core, self.clock()))):
            try:
                self.execute(group)
            except OSError as e:
                log.warning("lifecycle: acting on %s failed: %s", node_id, e)

    def _spawn(self, aw: Any) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reported by protocols --------------------------------------------------------

    def boot_question(self, snap: Snapshot, node: Node | None, via: Via,
                      version: int = 1) -> BootDecision:
        ans = self.core.boot_question(snap, node, via, self.clock(), version)
        self.execute(ans.effects)
        return ans.decision

    def bootwhat(self, snap: Snapshot, node: Node) -> BootDecision:
        return self.core.bootwhat(snap, node)

    def dhcp_acked(self, node_id: str) -> None:
        fx = self.core.dhcp_acked(node_id, self.clock())
        if fx:  # most ACKs are repeats within the window: nothing to do
            self.execute(fx)

    def loader_fetched(self, node_id: str, path: str, size: int) -> None:
        self.execute(self.core.loader_fetched(node_id, path, size, self.clock()))

    def state_reported(self, node_id: str, state: str, source: str = "tmcd",
                       committed: Callable[[], None] | None = None) -> None:
        self.execute(self.core.state_reported(node_id, state, self.clock(), source), committed)

    def config_outdated(self, node_id: str, digest: str) -> bool:
        return self.core.config_outdated(node_id, digest)

    def config_seen(self, node_id: str, digest: str, fetched: bool) -> None:
        self.execute(self.core.config_seen(node_id, digest, self.clock(), fetched))

    # -- operator actions (CLI through the API, API, web console) -------------------

    async def order(self, node_id: str, kind: BootType | str | None = None,
                    resend: bool = False) -> str:
        """Order a node's loader (AUTO by default); returns a one-line report.
        Raises KeyError (unknown node), ValueError (bad kind, no control IP),
        OSError (no bootinfo transport running here)."""
        node = self.live.snapshot.nodes.get(node_id)
        if node is None:
            raise KeyError(f"unknown node {node_id!r}")
        if self.orders is None or not self.orders.running:
            raise OSError("bootinfo server is not running")
        return self.execute(self.core.order(node, kind, self.clock(), resend=resend))

    async def reboot(self, node_ids: Iterable[str], *, into: str | None = None,
                     source: str = "operator") -> list[dict[str, Any]]:
        """Reboot nodes the recovery policy's way (the ladder: soft step, power cycle,
        ...; it goes on by itself until the node is up or given up).  With `into`,
        the node's one-shot next_os is set first, so it boots that image once (the
        imaging reload uses this).  One result per node: its first step, or why
        not.  Raises ValueError for an unknown `into` image."""
        ids = list(dict.fromkeys(node_ids))
        snap = self.live.snapshot
        set_at = self.clock()
        if into:
            await self._set_next_os([n for n in ids if n in snap.nodes], into)
            snap = self.live.snapshot
        drivers = await asyncio.to_thread(store.power_drivers, self.live.engine,
                                          [n for n in ids if n in snap.nodes])
        self.core.orders_up = self.orders is not None and self.orders.running
        out: list[dict[str, Any]] = []
        for nid in ids:
            node = snap.nodes.get(nid)
            if node is None:
                out.append({"node_id": nid, "ok": False, "error": f"no node {nid!r}"})
                continue
            life = self.core.life.get(nid)
            if into and life is not None and life.order_at >= set_at:
                # Waiting in its loader: the new next_os already woke it (auto-wake).
                out.append({"node_id": nid, "ok": True, "step": "order",
                            "detail": f"woken to boot {into}"})
                continue
            self.core.life_of(nid).bmc = drivers.get(nid, "")
            try:
                fx = self.core.reboot(node, self.clock(), source)
                self.execute(fx)
            except (ValueError, OSError) as e:
                out.append({"node_id": nid, "ok": False, "error": str(e)})
                continue
            out.append({"node_id": nid, "ok": True, **_first_step(fx)})
        return out

    async def _set_next_os(self, node_ids: list[str], image: str, wait: float = 10.0) -> None:
        from ..inventory import ops

        def write() -> None:
            for nid in node_ids:
                ops.set_node(self.live.engine, nid, next_os=image)

        await asyncio.to_thread(write)
        # The node must be answered with it: wait for this server's snapshot to show it.
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            nodes = self.live.snapshot.nodes
            if all(nodes[n].next_os == image for n in node_ids if n in nodes):
                return
            await asyncio.sleep(0.05)
        raise OSError(f"next_os={image} not in this server's inventory after {wait:g} s")

    async def set_service(self, node_id: str, reason: str, source: str = "operator") -> None:
        """Take a node out of service (a reason) or back in (""): no automation acts on
        a node out of service; back in service its ladder budget is whole."""
        if node_id not in self.live.snapshot.nodes:
            raise KeyError(f"unknown node {node_id!r}")
        self.execute(self.core.set_service(node_id, reason, self.clock(), source))

    async def reload(self, node_id: str, image: str, source: str = "operator") -> str:
        """Reload a node with disk image `image` (the caller checked that it exists);
        returns a one-line report.  Raises KeyError (unknown node), ValueError (no
        imaging MFS configured), OSError (an AUTO order could not be sent)."""
        node = self.live.snapshot.nodes.get(node_id)
        if node is None:
            raise KeyError(f"unknown node {node_id!r}")
        self.core.orders_up = self.orders is not None and self.orders.running
        effects = self.core.reload(node, image, self.clock(), source)
        self.execute(effects)
        self.counters["reloads"] += 1
        how = next((e for e in effects if isinstance(e, (SendOrder, StartReload))), None)
        if isinstance(how, SendOrder):
            return f"reload {image}: its loader was ordered to ask again"
        if isinstance(how, StartReload) and how.power_cycle:
            return f"reload {image}: power cycle into a network boot"
        return f"reload {image}: it asks again by itself (iPXE waiting)"

    def reload_reported(self, node_id: str, image: str, state: str, detail: str) -> None:
        fx = self.core.reload_reported(node_id, image, state, detail, self.clock())
        if fx:
            self.execute(fx)

    # -- time and the inventory -------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.states.check_interval)
            try:
                await self.check_once()
            except Exception:  # the watcher must keep watching
                log.exception("lifecycle watcher pass failed")

    async def check_once(self) -> list[tuple[str, str]]:
        """One watcher pass; returns what was done as (node_id, "resend" | "failed" | ...)."""
        self.core.orders_up = self.orders is not None and self.orders.running
        now = self.clock()
        candidates = self.core.tick(now)
        if not candidates:
            return []
        return await self._act(candidates, now)

    async def _act(self, candidates: list[Candidate], now: float) -> list[tuple[str, str]]:
        try:
            records = await asyncio.to_thread(store.records, self.live.engine,
                                              [c.node_id for c in candidates], now,
                                              self.core.operator_hold, self.core.server)
        except Exception as e:  # noqa: BLE001 - the database may be away: act next pass
            log.warning("lifecycle: cannot confirm %d candidates: %s", len(candidates),
                        str(e).splitlines()[0][:200])
            return []
        self.core.orders_up = self.orders is not None and self.orders.running
        # The confirmation can take seconds (a database that just came back): what is
        # recorded now must not be stamped before what the node did meanwhile.
        now = max(now, self.clock())
        effects = self.core.resolve(candidates, records, self.live.snapshot, now)
        done: list[tuple[str, str]] = []
        # Each node's effects on their own: one failed order must not stop the others.
        for node_id, group in _by_node(effects):
            try:
                self.execute(group)
            except OSError as e:
                log.warning("lifecycle: acting on %s failed: %s", node_id, e)
                continue
            done += [(node_id, _action(e)) for e in group if _action(e)]
            # Only reload on free starts a reload from a candidate.
            self.counters["reloads_on_free"] += sum(isinstance(e, StartReload) for e in group)
        return done

    def _on_change(self, old: Snapshot, new: Snapshot) -> None:
        candidates = self.core.inventory_changed(old, new, self.clock())
        if candidates:
            self._spawn(self._act(candidates, self.clock()))


def _by_node(effects: list[Effect]) -> list[tuple[str, list[Effect]]]:
    groups: dict[str, list[Effect]] = {}
    for e in effects:
        groups.setdefault(getattr(e, "node_id", ""), []).append(e)
    return list(groups.items())


def _first_step(effects: list[Effect]) -> dict[str, str]:
    for e in effects:
        if isinstance(e, SendOrder):
            return {"step": "order", "detail": f"{e.kind.name} order to its loader"}
        if isinstance(e, SendIpod):
            return {"step": "ipod", "detail": e.reason}
        if isinstance(e, PowerCycle):
            return {"step": "power_cycle", "detail": e.reason}
    last = [e for e in effects if isinstance(e, RecordState)]
    return {"step": "none", "detail": last[-1].detail if last else ""}


def _action(e: Effect) -> str:
    if isinstance(e, SendOrder):
        return {"recovery": "resend", "wake": "wake"}.get(e.cause, "order")
    if isinstance(e, RecordState) and e.state in ("PXEFAILED", "BOOTFAILED"):
        return "failed"
    if isinstance(e, PowerCycle):
        return "power_cycle"
    if isinstance(e, SendIpod):
        return "ipod"
    return type(e).__name__.lower() if not isinstance(e, (RecordState, Remember)) else ""

"""The node lifecycle coordinator: bootherd's counterpart of pixiecore's `Booter`.

The one place that decides *when* and *with what memory* a node boots.  The
boot policy (`policy.decide_boot`) says what a node boots; this coordinator
wraps it with everything that needs memory:

- one-shot `next_os`: served once, then cleared (TMCD's `bootwhat` only asks);
- the one waiting set: which nodes were told WAIT and how they wait (a bootinfo
  loader needs an ORDER to ask again, iPXE polls by itself), and the auto-wake
  rule that orders a waiting loader once its node has something to boot;
- orders: the last order per node, re-sending it, the re-send budget;
- the answer-to-state mapping and the one de-duplication of state events
  (a storm of retries must not become a storm of events);
- the watcher's rules: which nodes are stuck, handed to a recovery policy (the
  recovery ladder of `lifecycle.ladder`, or the plain `ResendThenFail`); an
  operator's reboot goes to the same policy; a node taken out of service, or one
  an operator powered off by hand recently, is left alone;
- the power state the BMCs report (power-state sync): a node found off is
  SHUTDOWN, not stuck;
- the TMCD configuration digest each node last fetched (`isalive`'s UPDATE=1);
- the reload cycle (issue 20): which nodes are to write which disk image, the
  imaging MFS answer while they do, and their receivers' reports as states;
  reload on free (imaging.reload_on_free): a node freed from its experiment
  enters that cycle.

Protocols only report what they observed and ask for answers.  Sans-IO: every
method takes `now` and returns effects as data (record a state, send an order,
clear next_os, remember lifecycle fields); `lifecycle.runner.Lifecycle`
executes them.  State that must survive a restart or be shared by several
servers is in the effects too (`Remember`), and comes back through `restore`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any, Protocol

from ..boottype import BootType, order_kind
from ..inventory.model import Node, Snapshot
from ..policy import BootDecision, decide_boot, reload_decision
from ..states import State


class Via(StrEnum):
    """How a node asks what to boot, and so how it waits after a WAIT answer."""

    BOOTINFO = "bootinfo"  # a loader over UDP: it waits for an ORDER
    IPXE = "ipxe"          # iPXE over HTTP: it asks again by itself


def reply_state(boot_type: BootType) -> State:
    """The state a boot answer moves the node to."""
    if boot_type == BootType.WAIT:
        return State.PXEWAIT
    if boot_type == BootType.REBOOT:
        return State.REBOOTING
    if boot_type in (BootType.AUTO, BootType.RESTART):
        return State.PXEBOOTING
    return State.BOOTING


# ------------------------------------------------------------------------ effects

@dataclass(frozen=True, slots=True)
class RecordState:
    """Record a state event for the node (in memory at once, durably in the next batch)."""

    node_id: str
    state: str
    source: str
    detail: str = ""
    ts: float = 0.0
    moves: bool = True  # False: history only, the node's state stays as it is


@dataclass(frozen=True, slots=True)
class SendOrder:
    """Send a bootinfo ORDER to the loader at `ip`.  Effects after it in the same list
    are only carried out once it was sent."""

    node_id: str
    ip: str
    kind: BootType
    resend: bool = False
    cause: str = "operator"  # operator | wake | recovery


@dataclass(frozen=True, slots=True)
class ClearNextOS:
    """Clear the node's one-shot next_os in the inventory, if it is still `image`."""

    node_id: str
    image: str


@dataclass(frozen=True, slots=True)
class Remember:
    """Write some `node_lifecycle` columns of the node (the rest stay as they are)."""

    node_id: str
    fields: Mapping[str, Any]
    ts: float


@dataclass(frozen=True, slots=True)
class StartReload:
    """The imaging actor's part of a reload order: have the image's next session wait
    for this node's receiver, and, when `power_cycle`, power-cycle the node into a
    network boot (through the power controller; a node without a power driver loads
    its image at its next network boot)."""

    node_id: str
    image: str
    power_cycle: bool


# Actors add their own effect types (a power action, an imaging step) and register
# an executor for them with `Lifecycle.register`.
Effect = Any


@dataclass(frozen=True, slots=True)
class Answer:
    decision: BootDecision
    effects: tuple[Effect, ...] = ()


# ------------------------------------------------------------------------ memory

@dataclass(slots=True)
class NodeLife:
    """What the coordinator remembers about one node beyond its state."""

    told_at: float = 0.0          # when it was last told WAIT
    order: BootType | None = None  # the last order it was sent
    order_at: float = 0.0
    tries: int = 0                # recovery steps since it last made progress (re-sent orders)
    digest: str | None = None     # TMCD fullconfig digest it last fetched
    consumed: str | None = None   # next_os served, until the snapshot shows it cleared
    deferred_until: float = 0.0   # not a candidate before (another server has it, a step runs)
    # The recovery ladder's memory of one episode (until the node is ISUP again):
    cycles: int = 0               # power cycles spent (node_lifecycle.power_cycles)
    bmc_failures: int = 0         # BMC answers of unreachable/timeout in a row
    soft_tried: bool = False      # the soft step (REBOOT order, IPOD) was taken
    started_in: str = ""          # the state the episode started from
    power: str = ""               # the power state its BMC last reported (on, off, unknown)
    power_at: float = 0.0
    bmc: str | None = None        # its power driver as last looked up ("" none, None unknown)
    reload: str = ""              # the disk image it is to write (reload cycle), "" for none


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node a rule wants to act on, subject to what the inventory says right now."""

    node_id: str
    rule: str   # "stuck" (the watcher) | "wake" (the auto-wake rule) | "free" (reload on free)
    state: str | None
    since: float


@dataclass(frozen=True, slots=True)
class Record:
    """The inventory's view of a node when a candidate is confirmed: its latest
    state, which server recorded it, and whether that server is alive; whether it
    is out of service, when an operator last powered it off by hand, and the power
    cycles the ladder spent on it (None: nothing remembered)."""

    state: str | None
    since: float
    server: str
    server_alive: bool
    out_of_service: str = ""
    operator_power_at: float = 0.0
    power_cycles: int | None = None
    power_driver: str | None = None  # node_power.driver, "" for none (None: not looked up)
    # The live server that acts for the node when no live server handled its last boot
    # contact ("": not worked out).
    heir: str = ""

    def owned_by_other(self, me: str) -> bool:
        """Another live server handled the node's last boot contact: it acts, not us."""
        return self.server not in ("", me) and self.server_alive

    def shared_to_other(self, me: str) -> bool:
        """For what every server sees alike (a node freed in the inventory, a BMC to
        poll): another server acts when it owns the node or, when no live server does,
        when it is the node's heir.  (A stuck node is not shared out so: only the
        servers that remember it see it stuck, and the heir may not be one of them.)"""
        if self.owned_by_other(me):
            return True
        return self.server != me and self.heir not in ("", me)


def heir(servers: Iterable[str], node_id: str) -> str:
    """Which of the live `servers` acts for a node no live server handles (never booted,
    or its server is gone): every server that sees the same servers picks the same one
    (rendezvous hashing), so a freed node is reloaded once and a gone server's nodes
    are shared out among the others rather than taken over by all."""
    return max(servers, key=lambda name: hashlib.sha256(f"{name}\0{node_id}".encode()).digest())


@dataclass(frozen=True, slots=True)
class Stuck:
    """A node the watcher found too long in a state, as handed to the recovery policy."""

    node_id: str
    node: Node | None
    state: str
    since: float
    age: float
    life: NodeLife
    recheck: bool = False  # the policy asked to look again (Coordinator.recheck), not a timeout


class RecoveryPolicy(Protocol):
    """What to do with a stuck node: the watcher's remedy, replaceable as a whole.

    `timeouts`: how long each state may last before the node counts as stuck.
    `retry_states`: the states the policy's own steps record (recording them does
    not reset `NodeLife.tries`; any other state is progress and does).
    `recover` returns effects, built with the coordinator's helpers (`order`,
    `record`) or an actor's own effect types; `reboot` is an operator's (or an
    actor's) request to reboot a node, started the same way.  Raises ValueError
    (the node cannot be reached that way) or OSError (no channel in this process)."""

    timeouts: Mapping[str, float]
    retry_states: frozenset[str]

    def recover(self, stuck: Stuck, lc: Coordinator, now: float) -> list[Effect]: ...

    def reboot(self, node: Node, lc: Coordinator, now: float, source: str) -> list[Effect]: ...


class ResendThenFail:
    """The default recovery: a node in PXEWAKEUP too long gets its last order again,
    `retries` times, then PXEFAILED; BOOTING or TBSETUP too long is BOOTFAILED;
    RELOADSETUP or RELOADING too long is RELOADFAILED (which ends the reload)."""

    retry_states = frozenset({State.PXEWAKEUP})

    def __init__(self, pxewakeup_timeout: float, retries: int, booting_timeout: float,
                 reload_timeout: float = 1800.0):
        self.retries = retries
        self.timeouts = {State.PXEWAKEUP: pxewakeup_timeout, State.BOOTING: booting_timeout,
                         State.TBSETUP: booting_timeout, State.RELOADSETUP: reload_timeout,
                         State.RELOADING: reload_timeout}

    @classmethod
    def from_config(cls, states_cfg: Any) -> ResendThenFail:
        return cls(states_cfg.pxewakeup_timeout, states_cfg.pxewakeup_retries,
                   states_cfg.booting_timeout, states_cfg.reload_timeout)

    def recover(self, stuck: Stuck, lc: Coordinator, now: float) -> list[Effect]:
        nid = stuck.node_id
        if stuck.state == State.PXEWAKEUP:
            if stuck.life.tries < self.retries:
                if not lc.orders_up or stuck.node is None or not stuck.node.control_ip:
                    return []  # no way to re-send from here: wait, do not fail it for that
                return lc.order(stuck.node, None, now, resend=True, cause="recovery")
            return lc.record(nid, State.PXEFAILED, "watcher",
                             f"no answer to {stuck.life.tries + 1} orders", now)
        if stuck.state in (State.RELOADSETUP, State.RELOADING):
            return lc.record(nid, State.RELOADFAILED, "watcher",
                             f"{stuck.state} for {int(stuck.age)} s", now)
        return lc.record(nid, State.BOOTFAILED, "watcher",
                         f"{stuck.state} for {int(stuck.age)} s", now)

    def reboot(self, node: Node, lc: Coordinator, now: float, source: str) -> list[Effect]:
        """A REBOOT order to the node's loader, as bootherd always did."""
        if not lc.orders_up:
            raise OSError("bootinfo server is not running")
        return lc.order(node, BootType.REBOOT, now)


# ---------------------------------------------------------------- de-duplication

class EventWindow:
    """The one de-duplication of observations: at most one event per key per
    `seconds`, unless what is observed changed (or the caller says the node has
    moved on meanwhile).  Loaders, ROMs and DHCP clients retry; each retry is not
    a step of the boot."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._seen: dict[tuple[str, str], tuple[float, object]] = {}

    def admit(self, key: tuple[str, str], now: float, value: object = None,
              moved_on: bool = False) -> bool:
        prev = self._seen.get(key)
        if prev is not None and not moved_on and now - prev[0] < self.seconds \
                and prev[1] == value:
            return False
        if len(self._seen) > 200_000:  # keep the table small: drop expired entries
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.seconds}
        self._seen[key] = (now, value)
        return True


# ------------------------------------------------------------------- coordinator

Decide = Callable[[Snapshot, Node | None, Any, int], BootDecision]


class Coordinator:
    """The node lifecycle's rules and memory (see the module doc).

    `states` is the inventory's in-memory map node_id -> (state, since) that
    every reader of node states shares; the coordinator is its one writer and
    updates it as it emits `RecordState` (the executor makes those durable).
    `server` names this server in the inventory (several servers share it)."""

    def __init__(self, config: Any, server: str,
                 states: MutableMapping[str, tuple[str, float]] | None = None,
                 recovery: RecoveryPolicy | None = None, decide: Decide = decide_boot):
        self.config = config
        self.server = server
        self.states: MutableMapping[str, tuple[str, float]] = {} if states is None else states
        self.recovery: RecoveryPolicy = recovery or ResendThenFail.from_config(config.states)
        self.decide = decide
        # An operator's own power-off keeps automation away from the node this long.
        self.operator_hold = config.recovery.operator_hold
        # node -> when the recovery policy wants to look at it again (a retry later).
        self.rechecks: dict[str, float] = {}
        self.events = EventWindow(config.states.event_window)
        self.life: dict[str, NodeLife] = {}
        # The one waiting set: node_id -> how it waits.
        self.waiting: dict[str, Via] = {}
        # Whether orders can be sent from this process (the bootinfo transport is up).
        self.orders_up = False
        # Reload on free: node_id -> the experiment ("pid/eid") it was freed from,
        # until its "free" candidate is resolved.
        self.freed: dict[str, str] = {}

    def _life(self, node_id: str) -> NodeLife:
        life = self.life.get(node_id)
        if life is None:
            life = self.life[node_id] = NodeLife()
        return life

    life_of = _life  # for recovery policies: the node's memory, made if need be

    # -- memory kept in the inventory ---------------------------------------------

    def restore(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Take back what was remembered (node_lifecycle rows), e.g. after a restart."""
        for r in rows:
            life = self._life(r["node_id"])
            via = r.get("wait_via") or ""
            if via in Via.__members__.values():
                self.waiting[r["node_id"]] = Via(via)
                # Told by another server: not our telling, so whoever spoke to it since
                # (that server, usually) has it; if that server is gone we wake it.
                mine = (r.get("wait_server") or "") in ("", self.server)
                life.told_at = (r.get("wait_ts") or 0.0) if mine else 0.0
            if r.get("order_kind") in BootType.__members__:
                life.order = BootType[r["order_kind"]]
                life.order_at = r.get("order_ts") or 0.0
                life.tries = r.get("order_resends") or 0
            life.digest = r.get("config_digest") or None
            life.cycles = r.get("power_cycles") or 0
            life.reload = r.get("reload_image") or ""

    # -- state events -------------------------------------------------------------

    def record(self, node_id: str, state: str, source: str, detail: str, now: float) -> list[Effect]:
        """Record a state (every state event goes through here)."""
        self.states[node_id] = (state, now)
        fx: list[Effect] = [RecordState(node_id, state, source, detail, now)]
        life = self.life.get(node_id)
        if state not in self.recovery.retry_states:
            if life is not None:
                life.tries = 0  # the node made progress: a fresh recovery budget
                if state == State.ISUP and (life.cycles or life.soft_tried or life.started_in):
                    fx.append(self.end_episode(node_id, life, now))
        if state in (State.RELOADDONE, State.RELOADFAILED) and life is not None and life.reload:
            life.reload = ""  # written (or given up): its next boot is its own again
            fx.append(Remember(node_id, {"reload_image": ""}, now))
        return fx

    def end_episode(self, node_id: str, life: NodeLife, now: float) -> Remember:
        """The node is well (ISUP), or an operator starts afresh: the recovery
        ladder's budget is whole again."""
        life.cycles = life.bmc_failures = 0
        life.soft_tried, life.started_in = False, ""
        self.rechecks.pop(node_id, None)
        return Remember(node_id, {"power_cycles": 0}, now)

    def note(self, node_id: str, what: str, source: str, detail: str, now: float) -> RecordState:
        """A line in the node's history that does not change its state (POWER_STATE,
        IPOD, OUT_OF_SERVICE, ...)."""
        return RecordState(node_id, what, source, detail, now, moves=False)

    # -- questions: what does this node boot? -------------------------------------

    def _asked(self, node: Node) -> Node:
        """The node as the policy must see it: a next_os already served is gone."""
        life = self.life.get(node.node_id)
        if node.next_os and life is not None and life.consumed == node.next_os:
            return dataclasses.replace(node, next_os=None)
        return node

    def boot_question(self, snap: Snapshot, node: Node | None, via: Via, now: float,
                      version: int = 1) -> Answer:
        """A loader (bootinfo) or iPXE (HTTP) asks what `node` boots (None: not in the
        inventory).  Serves a one-shot next_os once, remembers a WAIT and how the node
        waits, and records PXEBOOTING + the answer's state once per event window."""
        if node is None:
            return Answer(self.decide(snap, None, self.config, version))
        nid = node.node_id
        life = self._life(nid)
        reloading = bool(life.reload)
        decision = reload_decision(node, life.reload, self.config) if reloading \
            else self.decide(snap, self._asked(node), self.config, version)
        fx: list[Effect] = []
        if decision.consumes_next_os and decision.image:
            life.consumed = decision.image
            fx.append(ClearNextOS(nid, decision.image))
        was = self.waiting.get(nid)
        if decision.type is BootType.WAIT:
            self.waiting[nid] = via
            life.told_at = now
        else:
            self.waiting.pop(nid, None)
        state = State.RELOADING if reloading else reply_state(decision.type)
        current = self.states.get(nid)
        recorded = self.events.admit(("answer", nid), now, state,
                                     moved_on=current is None or current[0] != state)
        if recorded:
            fx += self.record(nid, State.PXEBOOTING, via, "", now)
            fx += self.record(nid, state, via, decision.image or decision.reason, now)
        # Who told it to wait, and how, goes to the inventory when that changes and
        # with each recorded WAIT (not with every repeat): another server or a
        # restart needs it.
        if was != self.waiting.get(nid) or (recorded and was is not None):
            fx.append(self._remember_wait(nid, now))
        return Answer(decision, tuple(fx))

    def _remember_wait(self, node_id: str, now: float) -> Remember:
        via = self.waiting.get(node_id)
        if via is None:
            return Remember(node_id, {"wait_via": ""}, now)
        return Remember(node_id, {"wait_via": str(via), "wait_server": self.server,
                                  "wait_ts": now}, now)

    def bootwhat(self, snap: Snapshot, node: Node) -> BootDecision:
        """TMCD's `bootwhat`: the same decision, as a query that consumes nothing."""
        life = self.life.get(node.node_id)
        if life is not None and life.reload:
            return reload_decision(node, life.reload, self.config)
        return self.decide(snap, self._asked(node), self.config, 1)

    # -- observations ---------------------------------------------------------------

    def dhcp_acked(self, node_id: str, now: float) -> list[Effect]:
        """A DHCP server acknowledged the node's address: it is (re)starting its boot."""
        if not self.events.admit(("dhcp", node_id), now):
            return []
        return self.record(node_id, State.PXEBOOTING, "dhcp", "", now)

    def loader_fetched(self, node_id: str, path: str, size: int, now: float) -> list[Effect]:
        """The node read a file over TFTP: one event per window (a legacy loader's
        eleven files, each with its size probe, are one step of the boot), in the
        node's history only.  A transfer is reported when it ends, which can be after
        the node moved on with another server; it must not rewind the node's state."""
        if not self.events.admit(("tftp", node_id), now):
            return []
        current = self.states.get(node_id)
        return [RecordState(node_id, current[0] if current else State.PXEBOOTING, "tftp",
                            f"loaded {PurePosixPath(path).name} ({size} bytes)", now,
                            moves=False)]

    def state_reported(self, node_id: str, state: str, now: float,
                       source: str = "tmcd") -> list[Effect]:
        """The node reported its own state (TMCD `state`): always recorded."""
        return self.record(node_id, state, source, "", now)

    # -- TMCD configuration ---------------------------------------------------------

    def config_outdated(self, node_id: str, digest: str) -> bool:
        """`isalive`: does the node hold an older configuration than `digest`?"""
        life = self.life.get(node_id)
        return life is not None and life.digest is not None and life.digest != digest

    def config_seen(self, node_id: str, digest: str, now: float,
                    fetched: bool) -> list[Effect]:
        """The node fetched its full configuration (`fetched`), or asked `isalive`
        with nothing known (then what it holds counts as current)."""
        life = self._life(node_id)
        if life.digest == digest or (not fetched and life.digest is not None):
            return []
        life.digest = digest
        return [Remember(node_id, {"config_digest": digest}, now)]

    # -- orders -----------------------------------------------------------------------

    def order(self, node: Node, kind: BootType | str | None, now: float, *,
              resend: bool = False, cause: str = "operator") -> list[Effect]:
        """Order the node's loader to act (AUTO: ask again; REBOOT; RESTART).

        `resend` repeats the last order (kind None) and counts a recovery try; a
        fresh order starts a new budget.  Raises ValueError for a kind that is not an
        order or a node without a control address."""
        life = self._life(node.node_id)
        if kind is None:
            k = (life.order or BootType.AUTO) if resend else BootType.AUTO
        else:
            k = order_kind(kind)
        ip = node.control_ip
        if not ip:
            raise ValueError(f"node {node.node_id} has no control IP")
        life.tries = life.tries + 1 if resend else 0
        life.order, life.order_at = k, now
        self.waiting.pop(node.node_id, None)  # the order answers the wait
        return [SendOrder(node.node_id, ip, k, resend, cause),
                *self.record(node.node_id, State.PXEWAKEUP, "bootinfo",
                             ("re-sent " if resend else "") + k.name, now),
                Remember(node.node_id, {"order_kind": k.name, "order_resends": life.tries,
                                        "order_server": self.server, "order_ts": now,
                                        "wait_via": ""}, now)]

    # -- the reload cycle ---------------------------------------------------------------

    def reload(self, node: Node, image: str, now: float, source: str = "operator",
               why: str = "") -> list[Effect]:
        """Have the node write disk image `image` (RELOADSETUP, `why` in its detail):
        its next boot question is answered with the imaging MFS.  A loader waiting for
        an ORDER gets one; iPXE waiting asks again by itself; any other node is
        power-cycled into a network boot by the imaging actor.  Raises ValueError
        without an imaging MFS."""
        if not self.config.imaging.mfs_kernel:
            raise ValueError("imaging.mfs_kernel is not set: there is no imaging MFS to boot")
        nid = node.node_id
        life = self._life(nid)
        life.reload = image
        detail = f"{image} ({why})" if why else image
        fx: list[Effect] = [*self.record(nid, State.RELOADSETUP, source, detail, now),
                            Remember(nid, {"reload_image": image}, now)]
        via = self.waiting.get(nid)
        if via is Via.BOOTINFO and self.orders_up and node.control_ip:
            return [*fx, StartReload(nid, image, False),
                    *self.order(node, BootType.AUTO, now, cause="reload")]
        return [*fx, StartReload(nid, image, via is None)]

    def free_image(self, snap: Snapshot, node: Node) -> str:
        """The disk image a freed node writes: imaging.free_image, else its default
        OS's disk image ("" for none)."""
        img = self.config.imaging.free_image
        if img:
            return img
        os_image = snap.os_images.get(node.default_os or "")
        return os_image.disk_image if os_image is not None else ""

    def _reload_freed(self, node: Node, snap: Snapshot, why: str, now: float) -> list[Effect]:
        """Reload on free: the freed node enters the reload cycle as with `node reload`."""
        nid = node.node_id
        if self._life(nid).reload:
            return []  # already reloading: the image it was ordered stays
        image = self.free_image(snap, node)
        if not image:
            return [self.note(nid, "RELOAD_SKIPPED", "free",
                              f"{why}: no disk image (imaging.free_image is empty and OS "
                              f"{node.default_os or '(none)'} has none)", now)]
        return self.reload(node, image, now, source="free", why=why)

    def reload_reported(self, node_id: str, image: str, state: str, detail: str,
                        now: float) -> list[Effect]:
        """A progress report of the node's imaging receiver (POST /images/NAME/progress):
        `done` is RELOADDONE, `failed` RELOADFAILED (both end the reload); anything
        else is a line in the history, once per event window.  A report for an image
        the node is not reloading (an operator's `image receive`) changes nothing."""
        life = self.life.get(node_id)
        if life is None or not life.reload or life.reload != image:
            return []
        if state == "done":
            return self.record(node_id, State.RELOADDONE, "imaging", detail or image, now)
        if state == "failed":
            return self.record(node_id, State.RELOADFAILED, "imaging", detail or image, now)
        if not self.events.admit(("imaging", node_id), now, state):
            return []
        current = self.states.get(node_id)
        return [RecordState(node_id, current[0] if current else State.RELOADING, "imaging",
                            f"{state}: {detail}"[:200], now, moves=False)]

    # -- the inventory changed --------------------------------------------------------

    def inventory_changed(self, old: Snapshot, new: Snapshot, now: float) -> list[Candidate]:
        """Auto-wake: a loader told WAIT whose node now has something to boot is a
        candidate for an AUTO order (iPXE waiters poll by themselves); with
        imaging.reload_on_free, a node freed from its experiment is a "free"
        candidate (`resolve` reloads it).  A served next_os is forgotten once the
        snapshot shows it cleared."""
        for node_id, life in self.life.items():
            if life.consumed is not None:
                n = new.nodes.get(node_id)
                if n is None or n.next_os != life.consumed:
                    life.consumed = None
        out: list[Candidate] = []
        if self.config.imaging.reload_on_free:
            for node_id, a in old.nodes.items():
                b = new.nodes.get(node_id)
                if a.allocation is not None and b is not None and b.allocation is None:
                    self.freed[node_id] = f"freed from {a.allocation.pid}/{a.allocation.eid}"
                    cur = self.states.get(node_id)
                    out.append(Candidate(node_id, "free", cur[0] if cur else None,
                                         cur[1] if cur else 0.0))
        for node_id, via in list(self.waiting.items()):
            if via is not Via.BOOTINFO:
                continue
            a, b = old.nodes.get(node_id), new.nodes.get(node_id)
            if b is None or b.allocation is None:
                continue
            if a is None or a.allocation is None or _boot_os(a) != _boot_os(b):
                del self.waiting[node_id]
                cur = self.states.get(node_id)
                out.append(Candidate(node_id, "wake", cur[0] if cur else None,
                                     cur[1] if cur else 0.0))
        return out

    # -- time: the watcher --------------------------------------------------------------

    def tick(self, now: float) -> list[Candidate]:
        """Nodes longer in a state than the recovery policy allows (in this server's
        memory: each is confirmed against the inventory before anything is done)."""
        timeouts = self.recovery.timeouts
        life = self.life
        out = []
        for node_id, (state, since) in self.states.items():
            limit = timeouts.get(state)
            if limit is None or now - since <= limit:
                continue
            lf = life.get(node_id)
            if lf is not None and lf.deferred_until > now:
                continue
            out.append(Candidate(node_id, "stuck", state, since))
        listed = {c.node_id for c in out}
        for node_id, at in list(self.rechecks.items()):
            cur = self.states.get(node_id)
            if at <= now and node_id not in listed and cur is not None:
                out.append(Candidate(node_id, "recheck", cur[0], cur[1]))
        return out

    def recheck(self, node_id: str, at: float) -> None:
        """Hand the node to the recovery policy again at `at`, whatever its state's
        timeout (a step to retry later, e.g. a BMC that did not answer)."""
        self.rechecks[node_id] = at

    def resolve(self, candidates: Iterable[Candidate], records: Mapping[str, Record],
                snap: Snapshot, now: float) -> list[Effect]:
        """Act on candidates, given the inventory's `records` for them.

        Several servers share the inventory, and only the one that handled a node's
        last boot contact acts on it: a node whose newer state another server
        recorded is not stuck (its state is taken in), and a node another live server
        handles is left to that server.  A record from a server that is gone does
        not protect a node: this server takes over."""
        fx: list[Effect] = []
        for c in candidates:
            rec = records.get(c.node_id)
            other = rec is not None and rec.owned_by_other(self.server)
            life = self._life(c.node_id)
            node = snap.nodes.get(c.node_id)
            if c.rule == "wake":
                if self.states.get(c.node_id, (None, 0.0)) != (c.state, c.since):
                    continue  # it booted on its own while the inventory was asked
                if other and rec is not None and rec.since > life.told_at:
                    continue  # it spoke to another server since we told it to wait
                if node is None or node.allocation is None or not node.control_ip \
                        or not self.orders_up:
                    continue
                fx += self.order(node, BootType.AUTO, now, cause="wake")
                continue
            if c.rule == "free":
                why = self.freed.pop(c.node_id, "freed")
                # Another live server that handles the node reloads it (or, when none
                # does, its heir: every server saw it freed); a node out of service, held
                # off by an operator, or allocated again is left alone.
                if (rec is not None and rec.shared_to_other(self.server)) or node is None \
                        or node.allocation is not None:
                    continue
                if rec is not None and (rec.out_of_service or (
                        rec.operator_power_at
                        and now - rec.operator_power_at < self.operator_hold)):
                    continue
                fx += self._reload_freed(node, snap, why, now)
                continue
            recheck = c.rule == "recheck"
            if recheck:
                self.rechecks.pop(c.node_id, None)
            if self.states.get(c.node_id) != (c.state, c.since):
                continue  # it moved on between tick and now
            if rec is not None and rec.state is not None and rec.since > c.since:
                self.states[c.node_id] = (rec.state, rec.since)  # newer, from another server
                if rec.state not in self.recovery.retry_states:
                    life.tries = 0
                continue
            assert c.state is not None
            timeout = self.recovery.timeouts.get(c.state, 0.0)
            if other:
                life.deferred_until = now + timeout
                continue
            if rec is not None:
                if rec.out_of_service:  # taken out of service: no automation until cleared
                    life.deferred_until = now + max(timeout, 60.0)
                    continue
                if rec.operator_power_at and now - rec.operator_power_at < self.operator_hold:
                    # An operator powered it off by hand: never fight that.
                    life.deferred_until = rec.operator_power_at + self.operator_hold
                    continue
                if rec.power_cycles is not None:
                    life.cycles = rec.power_cycles  # the inventory's count (another server's)
                if rec.power_driver is not None:
                    life.bmc = rec.power_driver
            fx += self.recovery.recover(
                Stuck(c.node_id, node, c.state, c.since, now - c.since, life, recheck), self, now)
        return fx

    # -- operators and actors -------------------------------------------------------

    def reboot(self, node: Node, now: float, source: str = "operator") -> list[Effect]:
        """Reboot a node (operator, API, an imaging step), the recovery policy's way;
        an operator's request starts a fresh episode (a whole budget)."""
        life = self._life(node.node_id)
        fx: list[Effect] = [self.end_episode(node.node_id, life, now)]
        life.deferred_until = 0.0
        return fx + self.recovery.reboot(node, self, now, source)

    def set_service(self, node_id: str, reason: str, now: float, source: str) -> list[Effect]:
        """Take a node out of service (`reason`), or back in (""): the ladder gives
        up this way, operators clear it.  A node back in service has a whole budget."""
        life = self._life(node_id)
        if reason:
            return [self.note(node_id, "OUT_OF_SERVICE", source, reason, now),
                    Remember(node_id, {"out_of_service": reason, "out_since": now,
                                       "out_by": self.server}, now)]
        self.end_episode(node_id, life, now)
        life.deferred_until = 0.0
        return [self.note(node_id, "IN_SERVICE", source, "back in service", now),
                Remember(node_id, {"out_of_service": "", "out_since": 0.0, "out_by": "",
                                   "power_cycles": 0}, now)]

    def power_observed(self, node_id: str, power: str, asked_at: float,
                       now: float) -> list[Effect]:
        """Power-state sync: the node's BMC said `power` (on, off, unknown) when asked
        at `asked_at`.  A change is a line in the history; a node found off is
        SHUTDOWN (off is not stuck: nothing powers it on behind an operator's back),
        unless the ladder is rebooting it or its state is newer than the question."""
        life = self._life(node_id)
        was, life.power, life.power_at = life.power, power, now
        fx: list[Effect] = []
        if power not in ("on", "off"):
            return fx
        if was in ("on", "off") and was != power:
            fx.append(self.note(node_id, "POWER_STATE", "powersync",
                                f"the BMC says power is {power} (was {was})", now))
        cur = self.states.get(node_id)
        if power == "off" and cur is not None and cur[1] < asked_at \
                and cur[0] not in _AT_REST and cur[0] not in self.recovery.retry_states:
            fx += self.record(node_id, State.SHUTDOWN, "powersync",
                              f"the BMC says power is off (was {cur[0]})", now)
        return fx


_AT_REST = frozenset({State.SHUTDOWN, State.PXEFAILED, State.BOOTFAILED})


def _boot_os(n: Node) -> tuple:
    return (n.next_os, n.temp_os, n.default_os, n.pxe_loader)

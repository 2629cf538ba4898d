"""What open consoles are shown live: one in-process view of the state stream, one fan-out.

`FeedCore` (no I/O, the caller passes `now`) follows every state event the services
record (`LiveInventory.on_state`): counts per state and per boot phase, the last event
of each node, recent failures, and the current storm (nodes per phase over time, boot
times and their percentiles).  Each event costs a few dict operations on the recording
path, whatever the number of consoles; nothing here reads the database.

`Feed` turns the core into pushed updates: every `ui.update_interval` seconds one
`tick` is built and serialized once, and the same bytes are queued to every open
console.  A console that stops reading is dropped after `MAX_PENDING` updates; its
browser reconnects and gets a fresh `hello`.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ...states import FAILED
from ...storm.report import percentile

log = logging.getLogger("bootherd.web.ui")

# Boot phases as the server sees them, in chart order (the storm simulator's phases,
# seen from the events the services record: see phase_of).
PHASES = ("idle", "dhcp", "tftp", "loader", "waiting", "os", "setup", "up", "failed", "down")
_INDEX = {p: i for i, p in enumerate(PHASES)}
# A node in one of these is booting: a storm stays open while they change.
IN_BOOT = frozenset({"dhcp", "tftp", "loader", "waiting", "os", "setup"})

STORM_QUIET = 15.0       # seconds without a boot event that end a storm
MAX_SAMPLES = 600        # chart points kept per storm (then halved, the step doubled)
LONG_WAIT = 60.0         # a node woken after waiting longer starts its boot at the wake
RECENT_FAILURES = 50
RECENT_EVENTS = 20_000   # the newest events of all nodes, for what the database lacks yet
HIST_BINS = 30
MAX_PENDING = 64         # updates queued for one console before it is dropped
KEEPALIVE = 15.0         # seconds between SSE comments when nothing changes
SERVERS_POLL = 5.0       # seconds between reads of the servers table (only while watched)
SERVER_SILENT = 15.0     # a server whose heartbeat is older is shown as silent


def phase_of(state: str | None, source: str = "") -> str:
    """The boot phase a node is in after an event (state, who recorded it)."""
    if state is None or state == "":
        return "idle"
    if state == "ISUP":
        return "up"
    if state in FAILED:
        return "failed"
    if state in ("SHUTDOWN", "REBOOTING"):
        return "down"
    if state in ("PXEWAIT", "PXEWAKEUP"):
        return "waiting"
    if state == "BOOTING":
        return "os"
    if state == "TBSETUP":
        return "setup"
    if state == "PXEBOOTING":
        # DHCP records PXEBOOTING on the firmware's ACK, TFTP when the loader is
        # sent, bootinfo and iPXE when the loader asks what to boot.
        return {"dhcp": "dhcp", "tftp": "tftp"}.get(source, "loader")
    return "idle"


@dataclass(slots=True)
class NodeView:
    """What the console knows of one node: its last event."""

    state: str = ""
    since: float | None = None    # when it entered `state`
    source: str = ""
    detail: str = ""
    ts: float | None = None       # its last event (a repeat of the state too)
    phase: str = "idle"
    boot_start: float | None = None


@dataclass
class Storm:
    """Nodes booting together: from the first boot start after a quiet spell until
    STORM_QUIET seconds pass with no boot event."""

    number: int
    t0: float
    step: float
    last_event: float
    times: list[float] = field(default_factory=list)
    samples: list[list[int]] = field(default_factory=list)
    boot_times: list[float] = field(default_factory=list)  # sorted
    started: int = 0
    up: int = 0
    failed: int = 0
    ended: bool = False

    def stats(self) -> dict[str, Any]:
        b = self.boot_times
        return {"count": len(b), "p50": percentile(b, 50), "p95": percentile(b, 95),
                "p99": percentile(b, 99), "max": b[-1] if b else None,
                "started": self.started, "up": self.up, "failed": self.failed}

    def histogram(self) -> dict[str, Any]:
        b = self.boot_times
        if not b:
            return {"lo": 0.0, "width": 0.0, "counts": []}
        lo, hi = b[0], b[-1]
        width = max((hi - lo) / HIST_BINS, 1e-3)
        edges = [lo + width * (i + 1) for i in range(HIST_BINS)]
        counts, prev = [], 0
        for e in edges:
            k = bisect.bisect_right(b, e)
            counts.append(k - prev)
            prev = k
        counts[-1] += len(b) - prev
        return {"lo": lo, "width": width, "counts": counts}

    def summary(self, full: bool) -> dict[str, Any]:
        out = {"number": self.number, "t0": self.t0, "step": self.step, "ended": self.ended,
               "boot": self.stats(), "hist": self.histogram()}
        if full:
            out["times"] = self.times
            out["samples"] = self.samples
        return out


class FeedCore:
    """The console's view of the node states; sans-IO (every entry point takes `now`)."""

    def __init__(self, node_ids: Iterable[str], known: dict[str, tuple[str, float, str]],
                 failures: Iterable[dict[str, Any]] = ()):
        """`known`: node_id -> (state, since, source) as the inventory has them at start;
        `failures`: recent failure events, newest first."""
        self.nodes: dict[str, NodeView] = {}
        self.phase_counts = [0] * len(PHASES)
        self.state_counts: Counter = Counter()
        self.failures: deque[dict[str, Any]] = deque(failures, maxlen=RECENT_FAILURES)
        self.failures_seq = 0
        self.seq = 0                 # events seen
        self.storm: Storm | None = None
        self.storms = 0
        self.servers: list[dict[str, Any]] = []
        self.servers_seq = 0
        self.generation = -1         # of the inventory snapshot: node pages refresh on change
        self._sent = (-1, -1, -1, -1)  # (seq, failures, servers, generation) of the last tick
        self._sent_storm = 0           # the storm the last tick was about
        self._known = known
        self.resync(node_ids)

    # -- inventory -------------------------------------------------------------

    def resync(self, node_ids: Iterable[str]) -> None:
        """Follow the inventory's node list (nodes added or removed)."""
        ids = set(node_ids)
        for nid in list(self.nodes):
            if nid not in ids:
                del self.nodes[nid]
        for nid in ids:
            if nid not in self.nodes:
                st = self._known.get(nid)
                v = NodeView()
                if st is not None:
                    v.state, v.since, v.source = st
                    v.ts = v.since
                    v.phase = phase_of(v.state, v.source)
                self.nodes[nid] = v
        self._known = {}
        self.phase_counts = [0] * len(PHASES)
        self.state_counts = Counter()
        for v in self.nodes.values():
            self.phase_counts[_INDEX[v.phase]] += 1
            self.state_counts[v.state or "UNKNOWN"] += 1

    # -- the state stream --------------------------------------------------------

    def on_event(self, node_id: str, state: str, source: str, ts: float, detail: str) -> None:
        """One recorded state event.  Called on the recording path: keep it cheap."""
        v = self.nodes.get(node_id)
        if v is None:
            return  # not in this server's inventory snapshot (yet)
        self.seq += 1
        old_phase, old_state, old_since = v.phase, v.state, v.since
        new_phase = phase_of(state, source)
        if state != old_state:
            self.state_counts[old_state or "UNKNOWN"] -= 1
            self.state_counts[state] += 1
            v.since = ts
        if new_phase != old_phase:
            self.phase_counts[_INDEX[old_phase]] -= 1
            self.phase_counts[_INDEX[new_phase]] += 1
        in_boot = new_phase in IN_BOOT
        storm = self.storm
        if in_boot and old_phase not in IN_BOOT:
            v.boot_start = ts
            storm = self._storm_for(ts)
            storm.started += 1
        elif state == "PXEWAKEUP" and old_state == "PXEWAIT" and old_since is not None \
                and ts - old_since > LONG_WAIT:
            v.boot_start = ts  # parked for long: its boot begins with the wake
        if storm is not None and not storm.ended and (in_boot or old_phase in IN_BOOT):
            storm.last_event = ts
        if new_phase == "up" and v.boot_start is not None:
            if storm is not None and not storm.ended and v.boot_start >= storm.t0:
                bisect.insort(storm.boot_times, ts - v.boot_start)
                storm.up += 1
            v.boot_start = None
        elif new_phase == "failed":
            if storm is not None and not storm.ended and v.boot_start is not None:
                storm.failed += 1
            v.boot_start = None
            self.failures.appendleft({"node_id": node_id, "ts": ts, "state": state,
                                      "source": source, "detail": detail})
            self.failures_seq += 1
        elif not in_boot:
            v.boot_start = None
        v.state, v.source, v.detail, v.ts, v.phase = state, source, detail, ts, new_phase

    def _storm_for(self, ts: float) -> Storm:
        s = self.storm
        if s is None or s.ended:
            self.storms += 1
            s = self.storm = Storm(self.storms, ts, 0.0, ts)
            s.times.append(0.0)  # the chart starts where the storm does
            s.samples.append(list(self.phase_counts))
        return s

    def set_generation(self, generation: int) -> None:
        self.generation = generation

    def set_servers(self, servers: list[dict[str, Any]]) -> None:
        if servers != self.servers:
            self.servers = servers
            self.servers_seq += 1

    # -- what consoles are sent ---------------------------------------------------

    def counts(self) -> dict[str, Any]:
        return {"nodes": len(self.nodes), "generation": self.generation,
                "phases": list(self.phase_counts),
                "states": {k: v for k, v in sorted(self.state_counts.items()) if v}}

    def hello(self, now: float) -> dict[str, Any]:
        """Everything a console shows, for one that just connected."""
        return {"now": now, "seq": self.seq, "phase_names": list(PHASES), **self.counts(),
                "storm": self.storm.summary(full=True) if self.storm else None,
                "failures": list(self.failures), "servers": self.servers}

    def tick(self, now: float, step: float) -> dict[str, Any] | None:
        """The update every console gets now, or None when nothing changed.

        `step` is the update interval: a storm is sampled at most that often."""
        s = self.storm
        sample = None
        ended_now = False
        if s is not None and not s.ended:
            if now - s.last_event > STORM_QUIET:
                s.ended = ended_now = True
            else:
                if not s.step:
                    s.step = step
                if not s.times or now - s.t0 - s.times[-1] >= s.step * 0.999:
                    sample = [round(now - s.t0, 3), list(self.phase_counts)]
                    s.times.append(sample[0])
                    s.samples.append(sample[1])
                    if len(s.times) > MAX_SAMPLES:
                        s.times, s.samples = s.times[::2], s.samples[::2]
                        s.step *= 2
        mark = (self.seq, self.failures_seq, self.servers_seq, self.generation)
        if sample is None and mark == self._sent and not ended_now:
            return None
        out: dict[str, Any] = {"now": now, "seq": self.seq, **self.counts()}
        if s is not None:
            # A console first hears of a storm with its samples so far, then one at a time.
            out["storm"] = s.summary(full=s.number != self._sent_storm) | {"sample": sample}
            self._sent_storm = s.number
        if mark[1] != self._sent[1]:
            out["failures"] = list(self.failures)
        if mark[2] != self._sent[2]:
            out["servers"] = self.servers
        self._sent = mark
        return out


def _event(ev: Any) -> dict[str, Any]:
    note = isinstance(ev, Note)
    ev = ev.event if note else ev
    return {"node_id": ev.node_id, "ts": ev.ts, "state": ev.state, "source": ev.source,
            "detail": ev.detail, "phase": phase_of(ev.state, ev.source), "note": note}


@dataclass(frozen=True, slots=True)
class Note:
    """A line of a node's history that is not a state (a power action, a loader fetched):
    shown with its events, never counted as where the node is."""

    event: Any

    @property
    def node_id(self) -> str:
        return self.event.node_id

    @property
    def ts(self) -> float:
        return self.event.ts


def sse(event: str, data: Any) -> bytes:
    """One server-sent event, JSON data on one line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n" \
        .encode()


class Subscriber:
    """One open console: its queued updates, and the node it watches (if any)."""

    def __init__(self, node_id: str | None):
        self.node_id = node_id
        self.sid = ""  # the session it belongs to
        self.pending: deque[bytes] = deque()
        self.node_events: list[dict[str, Any]] = []
        self.wakeup = asyncio.Event()
        self.dropped = False
        self.closed = False

    def push(self, data: bytes) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.dropped = True  # it stopped reading: end it, its browser reconnects
        else:
            self.pending.append(data)
        self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()

    async def next(self, timeout: float) -> bytes | None:
        """The queued updates as one write, b"" on timeout, None when it must end."""
        if not self.pending and not (self.dropped or self.closed):
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout)
            except TimeoutError:
                pass
        self.wakeup.clear()
        if self.dropped or self.closed:
            return None
        out = b"".join(self.pending)
        self.pending.clear()
        return out


class Feed:
    """The one fan-out of a process: a FeedCore fed by `live.on_state`, a ticker, and
    the open consoles (node pages also get the node's notes, from `live.on_note`).
    Started and stopped with the web application."""

    def __init__(self, live: Any, interval: float, servers: Callable[[], list[dict[str, Any]]],
                 counters: Counter, clock: Callable[[], float] = time.time):
        self.live = live
        self.interval = interval
        self.read_servers = servers
        self.counters = counters
        self.clock = clock
        self.core: FeedCore | None = None
        # The newest events as recorded (not copied): a node page adds those its database
        # read missed (the writer commits in batches) and those since the page was made.
        self.recent: deque[Any] = deque(maxlen=RECENT_EVENTS)
        self.subs: set[Subscriber] = set()
        self._by_node: dict[str, set[Subscriber]] = {}
        self._task: asyncio.Task | None = None
        self._servers_task: asyncio.Task | None = None
        self.ticks = 0
        self.tick_seconds = 0.0  # CPU spent building and queueing updates (bench/ui reads it)

    # -- life ------------------------------------------------------------------

    async def start(self, known: dict[str, tuple[str, float, str]],
                    failures: list[dict[str, Any]]) -> None:
        """`known`: node_id -> (state, since, source) as read from the inventory (for the
        sources, which live.states lacks); `failures`: recent failures, newest first."""
        # live.states is the newest truth; from here to on_state there is no await, so
        # no event falls between the two.
        states = {}
        for nid, (state, since) in list(self.live.states.items()):
            k = known.get(nid)
            states[nid] = (state, since, k[2] if k and k[0] == state else "")
        self.core = FeedCore(self.live.snapshot.nodes, states, failures)
        self.core.set_generation(self.live.snapshot.generation)
        self.live.on_state(self._on_state)
        self.live.on_note(self._on_note)
        self.live.on_change(self._on_change)
        self._task = asyncio.create_task(self._run(), name="ui-feed")

    async def stop(self) -> None:
        for sub in list(self.subs):
            sub.close()
        for t in (self._task, self._servers_task):
            if t is not None:
                t.cancel()
                try:
                    await t
                except asyncio.CancelledError:
                    pass
        self._task = self._servers_task = None

    def _on_state(self, ev: Any) -> None:
        core = self.core
        if core is None:
            return
        core.on_event(ev.node_id, ev.state, ev.source, ev.ts, ev.detail)
        self._remember(ev)

    def _on_note(self, ev: Any) -> None:
        if self.core is not None:
            self._remember(Note(ev))

    def _remember(self, ev: Any) -> None:
        """Keep a recorded event (or note) for node pages, and tell those open on its node."""
        self.recent.append(ev)
        watchers = self._by_node.get(ev.node_id)
        if watchers:
            e = _event(ev)
            for sub in watchers:
                sub.node_events.append(e)

    def events_of(self, node_id: str, since: float = 0.0) -> list[dict[str, Any]]:
        """This node's events still in memory, recorded at `since` or later, oldest first."""
        return [_event(ev) for ev in list(self.recent)
                if ev.node_id == node_id and ev.ts >= since]

    def _on_change(self, old: Any, new: Any) -> None:
        if self.core is None:
            return
        if old.nodes.keys() != new.nodes.keys():
            self.core.resync(new.nodes)
        self.core.set_generation(new.generation)

    # -- consoles ----------------------------------------------------------------

    def subscribe(self, node_id: str | None = None,
                  since: float | None = None) -> tuple[Subscriber, bytes]:
        """A new console and its first message (everything it shows; for a node page,
        also the node's events since `since`, the time its page was made)."""
        assert self.core is not None
        sub = Subscriber(node_id)
        self.subs.add(sub)
        if node_id is not None:
            self._by_node.setdefault(node_id, set()).add(sub)
        if self._servers_task is None or self._servers_task.done():
            self._servers_task = asyncio.create_task(self._poll_servers(), name="ui-servers")
        self.counters["consoles_opened"] += 1
        hello = self.core.hello(self.clock())
        if node_id is not None:
            hello["node_events"] = self.events_of(node_id, since or 0.0)
        return sub, sse("hello", hello)

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subs.discard(sub)
        if sub.node_id is not None:
            watchers = self._by_node.get(sub.node_id)
            if watchers is not None:
                watchers.discard(sub)
                if not watchers:
                    del self._by_node[sub.node_id]
        if sub.dropped:
            self.counters["consoles_dropped"] += 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            # On a fixed beat: a busy loop delays one update, not all the ones after it.
            due = max(due + self.interval, loop.time())
            await asyncio.sleep(due - loop.time())
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the console must not stop updating
                log.exception("console update failed")

    def tick(self) -> None:
        assert self.core is not None
        t0 = time.thread_time()  # CPU of this thread: waiting for the GIL is not counted
        try:
            self._tick()
        finally:
            self.tick_seconds += time.thread_time() - t0

    def _tick(self) -> None:
        assert self.core is not None
        payload = self.core.tick(self.clock(), self.interval)  # samples the storm regardless
        if payload is not None and self.subs:
            self.ticks += 1
            data = sse("tick", payload)  # serialized once for every console
            for sub in self.subs:
                sub.push(data)
            self.counters["updates_sent"] += len(self.subs)
        for sub in self.subs:
            if sub.node_events:
                sub.push(sse("node", sub.node_events))
                sub.node_events = []

    async def _poll_servers(self) -> None:
        """The servers table, read by one task for all consoles, only while any is open."""
        while self.subs:
            try:
                rows = await asyncio.to_thread(self.read_servers)
                now = self.clock()
                for r in rows:
                    r["alive"] = now - r.get("heartbeat", 0) < SERVER_SILENT
                if self.core is not None:
                    self.core.set_servers(rows)
            except Exception as e:  # noqa: BLE001 - the database may be briefly away
                log.warning("console: reading servers failed: %s", str(e).splitlines()[0][:200])
            await asyncio.sleep(SERVERS_POLL)

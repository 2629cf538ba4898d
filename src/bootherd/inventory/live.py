"""The inventory as running servers see it: a live snapshot and a batched writer.

Hot paths read `live.snapshot` (a plain attribute: no lock, no I/O).  A
watcher notices changes made by any other process and swaps in a fresh
snapshot; SQLite is polled for its generation counter, PostgreSQL also
LISTENs for the change triggers' NOTIFY.  State events and what the lifecycle
coordinator remembers per node, recorded during a boot storm, are queued and
committed in batches by one background thread, so durability never sits on the
packet path (DHCP leases have their own group-commit writer, dhcp/leasewriter.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, insert, select

from ..logs import event
from ..states import FAILED
from . import schema as s
from .model import Snapshot
from .snapshot import load, prune_changes, read_generation

# Seconds of change log kept; a server further behind rebuilds its snapshot whole.
CHANGE_LOG_KEEP = 3600.0

log = logging.getLogger("bootherd.inventory")


@dataclass(slots=True)
class StateEvent:
    node_id: str
    state: str
    source: str
    ts: float
    detail: str = ""
    server: str = ""  # the server that recorded it (several servers share one database)


@dataclass(slots=True)
class LifecycleRow:
    """Some columns of one node's `node_lifecycle` row; the others are left as they are."""

    node_id: str
    fields: dict[str, object]
    ts: float


@dataclass
class WriterStats:
    batches: int = 0
    events: int = 0
    lifecycle: int = 0
    errors: int = 0
    last_error: str = ""
    queue_high: int = 0


@dataclass(slots=True)
class _Job:
    kind: str  # "event" | "note" | "lifecycle" | "flush"
    payload: object
    done: threading.Event | None = None
    result: list = field(default_factory=list)
    committed: Callable[[], None] | None = None  # called on the writer thread after commit


class Writer:
    """One thread that commits queued writes in batches.

    Group commit: a batch is what is queued when the thread is free, so under load the
    events that arrive during one commit make up the next, and a lone event is committed
    at once instead of waiting for company (`interval` > 0 gathers that long first).

    `flush()` blocks until everything queued before it is committed; a lease
    writer that must not answer before the lease is durable waits on it.
    A failed batch is retried (the database may be briefly away), so no
    queued write is lost while the process lives.
    """

    def __init__(self, engine: Engine, interval: float = 0.0):
        self.engine = engine
        self.interval = interval
        self.q: queue.Queue[_Job | None] = queue.Queue()
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name="bootherd-writer", daemon=True)
        self._thread.start()

    def event(self, ev: StateEvent, committed: Callable[[], None] | None = None) -> None:
        self.q.put(_Job("event", ev, committed=committed))

    def note(self, ev: StateEvent) -> None:
        """A line in the node's history that is not a state (a power action)."""
        self.q.put(_Job("note", ev))

    def lifecycle(self, row: LifecycleRow) -> None:
        self.q.put(_Job("lifecycle", row))

    def flush(self, timeout: float | None = 30.0) -> bool:
        job = _Job("flush", None, threading.Event())
        self.q.put(job)
        assert job.done is not None
        return job.done.wait(timeout)

    def close(self) -> None:
        self.q.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self.q.get()
            if first is None:
                break
            jobs = [first]
            deadline = time.monotonic() + self.interval
            while True:
                remaining = deadline - time.monotonic()
                try:
                    j = self.q.get(timeout=max(remaining, 0)) if remaining > 0 else self.q.get_nowait()
                except queue.Empty:
                    break
                if j is None:
                    stop = True
                    break
                jobs.append(j)
                if len(jobs) >= 5000:
                    break
            self.stats.queue_high = max(self.stats.queue_high, self.q.qsize() + len(jobs))
            self._commit(jobs)

    def _commit(self, jobs: list[_Job]) -> None:
        events = [j.payload for j in jobs if j.kind == "event"]
        notes = [j.payload for j in jobs if j.kind == "note"]
        lifecycle = [j.payload for j in jobs if j.kind == "lifecycle"]
        delay = 0.1
        while events or notes or lifecycle:
            try:
                with self.engine.begin() as conn:
                    if events:
                        self._write_events(conn, events)
                    if notes:
                        self._write_notes(conn, notes)
                    if lifecycle:
                        self._write_lifecycle(conn, lifecycle)
                self.stats.batches += 1
                self.stats.events += len(events) + len(notes)
                self.stats.lifecycle += len(lifecycle)
                break
            except Exception as e:  # noqa: BLE001 - the database may be briefly away
                self.stats.errors += 1
                self.stats.last_error = str(e).splitlines()[0][:200]
                log.warning("inventory write failed, retrying in %.1fs: %s", delay,
                            self.stats.last_error)
                time.sleep(delay)
                # At most 1 s: once the database is back, other servers' watchers confirm
                # their candidates against it, and a backlog written late makes a node
                # that booted through this server look stuck in what they ordered.
                delay = min(delay * 2, 1.0)
        for j in jobs:
            if j.done is not None:
                j.done.set()
            if j.committed is not None:
                try:
                    j.committed()
                except Exception:  # noqa: BLE001 - a caller's callback must not stop the writer
                    log.exception("commit callback failed")

    @staticmethod
    def _write_notes(conn, notes: list[StateEvent]) -> None:  # noqa: ANN001
        conn.execute(insert(s.node_events), [
            {"node_id": e.node_id, "ts": e.ts, "state": e.state, "source": e.source,
             "detail": e.detail} for e in notes])

    @staticmethod
    def _write_events(conn, events: list[StateEvent]) -> None:  # noqa: ANN001
        Writer._write_notes(conn, events)
        latest: dict[str, StateEvent] = {}
        for e in events:  # the newest of each node's events, as the upsert's guard keeps
            cur = latest.get(e.node_id)
            if cur is None or e.ts >= cur.ts:
                latest[e.node_id] = e
        ids = sorted(latest)  # one lock order for every server writing these rows
        # One upsert statement, executed for the whole batch: its compiled form is cached
        # (a multi-row VALUES of a new length each batch was compiled again every time,
        # which cost more than the commit).  Several servers write states of the same
        # nodes: keep the newest event, whichever server's batch commits last.
        conn.execute(_state_upsert(conn.dialect.name), [
            {"node_id": i, "state": latest[i].state, "since": latest[i].ts,
             "source": latest[i].source, "server": latest[i].server} for i in ids])

    @staticmethod
    def _write_lifecycle(conn, rows: list[LifecycleRow]) -> None:  # noqa: ANN001
        merged: dict[str, LifecycleRow] = {}
        for r in rows:  # later fields of one node win, in queue order
            m = merged.get(r.node_id)
            if m is None:
                merged[r.node_id] = LifecycleRow(r.node_id, dict(r.fields), r.ts)
            else:
                m.fields.update(r.fields)
                m.ts = max(m.ts, r.ts)
        # One upsert per set of columns (usually one or two sets per batch); rows in one
        # lock order, as for the states.
        groups: dict[tuple[str, ...], list[LifecycleRow]] = {}
        for node_id in sorted(merged):
            r = merged[node_id]
            groups.setdefault(tuple(sorted(r.fields)), []).append(r)
        dialect = conn.dialect.name
        for cols, group in groups.items():
            # One cached statement per set of columns, executed for the whole group (a
            # multi-row VALUES was compiled again for every batch).
            conn.execute(_lifecycle_upsert(dialect, cols),
                         [{"node_id": r.node_id, "updated": r.ts, **r.fields} for r in group])


def _upsert(conn):  # noqa: ANN001, ANN202 - both backends speak INSERT ... ON CONFLICT
    return _upsert_for(conn.dialect.name)


def _upsert_for(dialect: str):  # noqa: ANN202
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


_UPSERTS: dict[object, object] = {}


def _upsert_of(dialect: str, table, cols: tuple[str, ...],  # noqa: ANN001, ANN202
               newest: str = ""):
    """An upsert of `cols` into `table` by node_id (both backends speak ON CONFLICT),
    built once per dialect and columns so its compiled form is cached; with `newest`, a
    row is only replaced by one at least as new in that column."""
    key = (dialect, table.name, cols, newest)
    stmt = _UPSERTS.get(key)
    if stmt is None:
        base = _upsert_for(dialect)(table)
        ex = base.excluded
        stmt = _UPSERTS[key] = base.on_conflict_do_update(
            index_elements=[table.c.node_id], set_={c: ex[c] for c in cols},
            where=table.c[newest] <= ex[newest] if newest else None)
    return stmt


def _state_upsert(dialect: str):  # noqa: ANN202
    return _upsert_of(dialect, s.node_states, ("state", "since", "source", "server"), "since")


def _lifecycle_upsert(dialect: str, cols: tuple[str, ...]):  # noqa: ANN202
    return _upsert_of(dialect, s.node_lifecycle, (*cols, "updated"))


Listener = Callable[[Snapshot, Snapshot], None]


class LiveInventory:
    """Shared by every service in one `bootherd serve` process."""

    def __init__(self, engine: Engine, poll_interval: float = 0.2,
                 write_batch_interval: float = 0.0, server_name: str = ""):
        self.engine = engine
        self.server_name = server_name  # stamped on every state this process records
        self.poll_interval = poll_interval
        self.snapshot: Snapshot = load(engine)
        self.writer = Writer(engine, write_batch_interval)
        self.states: dict[str, tuple[str, float]] = self._load_states()
        self._audit_seen = self._last_audit()
        self.reloads = 0
        self._pruned = 0.0
        self.last_reload_seconds = 0.0
        self._listeners: list[Listener] = []
        self._state_listeners: list[Callable[[StateEvent], None]] = []
        self._note_listeners: list[Callable[[StateEvent], None]] = []
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._pg_thread: threading.Thread | None = None
        self._closing = threading.Event()

    def _load_states(self) -> dict[str, tuple[str, float]]:
        with self.engine.connect() as conn:
            return {r.node_id: (r.state, r.since) for r in conn.execute(select(s.node_states))}

    def _last_audit(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(s.inventory_audit.c.id))).scalar() or 0

    def _new_audit(self) -> list:
        with self.engine.connect() as conn:
            rows = conn.execute(select(s.inventory_audit)
                                .where(s.inventory_audit.c.id > self._audit_seen)
                                .order_by(s.inventory_audit.c.id).limit(1000)).all()
        if rows:
            self._audit_seen = rows[-1].id
        return rows

    def _log_audit(self, rows: list) -> None:
        """Every inventory change, with who made it and from where (the audit rows that
        CLI, API and import write in the change's own transaction)."""
        for r in rows:
            event(log, logging.INFO, "inventory change", origin=r.origin, who=r.who,
                  action=r.action, kind=r.kind, key=r.key, detail=r.detail[:2000])

    # -- changes made elsewhere ------------------------------------------------

    def on_change(self, fn: Listener) -> None:
        """Call fn(old, new) on the event loop after each snapshot swap."""
        self._listeners.append(fn)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        if self.engine.dialect.name == "postgresql":
            self._pg_thread = threading.Thread(target=self._pg_listen, args=(loop,),
                                               name="bootherd-listen", daemon=True)
            self._pg_thread.start()
        self._task = asyncio.create_task(self._watch(), name="inventory-watch")

    async def stop(self) -> None:
        self._closing.set()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(self.writer.close)

    def _pg_listen(self, loop: asyncio.AbstractEventLoop) -> None:
        import psycopg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._closing.is_set():
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("LISTEN bootherd_changes")
                    for _ in conn.notifies(timeout=1.0, stop_after=None):
                        loop.call_soon_threadsafe(self._wake.set)  # type: ignore[union-attr]
                        if self._closing.is_set():
                            return
                    if self._closing.is_set():
                        return
            except Exception as e:  # noqa: BLE001 - reconnect; polling covers the gap
                log.warning("LISTEN connection lost: %s", str(e).splitlines()[0][:200])
                self._closing.wait(1.0)

    async def _watch(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - keep serving the old snapshot
                log.warning("inventory refresh failed, serving the last snapshot: %s",
                            str(e).splitlines()[0][:200])

    def _generation(self) -> int:
        with self.engine.connect() as conn:
            return read_generation(conn)

    async def refresh(self) -> bool:
        """Reload the snapshot if the database has changed; True if it did."""
        gen = await asyncio.to_thread(self._generation)
        if gen == self.snapshot.generation:
            return False
        t0 = time.monotonic()
        # Patch the nodes the change log names; rebuild only when it cannot say.
        new = await asyncio.to_thread(load, self.engine, self.snapshot)
        self.last_reload_seconds = time.monotonic() - t0
        old, self.snapshot = self.snapshot, new
        self.reloads += 1
        event(log, logging.INFO, "inventory reloaded", generation=new.generation,
              nodes=len(new.nodes), seconds=round(self.last_reload_seconds, 3))
        # Listeners run in the same loop step as the swap: nobody sees the new
        # snapshot before they have reacted to it.
        for fn in self._listeners:
            try:
                fn(old, new)
            except Exception:  # noqa: BLE001
                log.exception("change listener failed")
        try:
            self._log_audit(await asyncio.to_thread(self._new_audit))
        except Exception as e:  # noqa: BLE001 - the log must not stop the reload
            log.warning("reading the inventory audit failed: %s", str(e).splitlines()[0][:200])
        if time.time() - self._pruned > CHANGE_LOG_KEEP / 10:
            self._pruned = time.time()
            await asyncio.to_thread(prune_changes, self.engine, self._pruned - CHANGE_LOG_KEEP)
        return True

    # -- writes from the servers -------------------------------------------------

    def on_state(self, fn: Callable[[StateEvent], None]) -> None:
        self._state_listeners.append(fn)

    def record_state(self, node_id: str, state: str, source: str, detail: str = "",
                     ts: float | None = None,
                     committed: Callable[[], None] | None = None) -> None:
        """Record a node state change: in memory at once, durably in the next batch.

        `committed` is called (on the writer thread) once the event is in the
        database: a service that acknowledges a state to the node waits for it,
        so a server killed right after answering has lost nothing it confirmed."""
        ev = StateEvent(node_id, state, source, ts if ts is not None else time.time(), detail,
                        self.server_name)
        self.states[node_id] = (state, ev.ts)
        self.writer.event(ev, committed)
        if state in FAILED:  # every failure an operator must see, whoever recorded it
            event(log, logging.WARNING, "node failed", node=node_id, state=state,
                  source=source, detail=detail)
        for fn in self._state_listeners:
            fn(ev)

    def on_note(self, fn: Callable[[StateEvent], None]) -> None:
        """Call fn(event) for each line of history that is not a state (record_note)."""
        self._note_listeners.append(fn)

    def record_note(self, node_id: str, what: str, source: str, ts: float, detail: str = "") -> None:
        """Add a line to the node's history that does not change its state (a power
        action, for one); durably in the next batch."""
        ev = StateEvent(node_id, what, source, ts, detail, self.server_name)
        self.writer.note(ev)
        for fn in self._note_listeners:
            fn(ev)

    def state_of(self, node_id: str) -> tuple[str, float] | None:
        return self.states.get(node_id)

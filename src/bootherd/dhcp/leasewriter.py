"""The durable side of DHCP leases: rows to the inventory table ``leases``, group commit.

Rows queued while a transaction is in flight form the next transaction, so the batch size
grows with the load and durability never caps the rate.  The transport sends a pool
grant's ACK only after the batch holding its row has committed (a ``kill -9`` loses no
acknowledged pool lease); an inventory node's ACK (:func:`safe_without_db`) goes at once.
The engine never sees this module: it decides from :class:`~bootherd.dhcp.leases.LeaseTable`
and names the row to commit in its ``Decision``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select

from ..inventory import schema as s
from .leases import BOUND, RELEASED

log = logging.getLogger("bootherd.dhcp")


def load_leases(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(s.leases)))


Batch = list[tuple[dict[str, Any], Any]]  # (row, token handed back when committed)


def safe_without_db(row: dict[str, Any]) -> bool:
    """A row whose reply may go before the row is durable: an inventory node's fixed
    address (deterministic: any server gives the same one, nobody else can hold it), or a
    RELEASE/DECLINE (no reply at all)."""
    return row.get("node_id") is not None or row.get("state") != BOUND


class LeaseWriter:
    """One thread, one connection, group commit.

    ``submit(batch, done)`` is called by the event loop with at most one batch in flight;
    ``done(batch)`` is called (from the writer thread) once it has committed.  A failed
    commit is retried with back-off: a queued lease is never dropped while the process lives.

    Several servers on one PostgreSQL: inventory addresses are upserted (every server writes
    the same row), pool addresses are *claimed*: the row is written only if the address is
    free in the database or already this MAC's.  A lost claim's reply is replaced by
    ``on_conflict(row, token, holder) -> token | None`` (a NAK), called from this thread.

    While the database is away (``down``), batches whose rows are all
    :func:`safe_without_db` are handed back at once and kept for the database's return;
    pool grants in a batch are dropped from it (their rows are still claimed later) so the
    transport keeps answering inventory nodes.  ``on_down(bool)`` reports the switches.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.batches = 0
        self.rows = 0
        self.errors = 0
        self.largest = 0
        self.conflicts = 0
        self.down = False
        self.on_down: Callable[[bool], None] | None = None
        self.on_conflict: Callable[[dict[str, Any], Any, dict[str, Any] | None], Any] | None \
            = None
        self.on_holders: Callable[[list[dict[str, Any]]], None] | None = None
        self._cv = threading.Condition()
        # (batch, done, already answered)
        self._queue: list[tuple[Batch, Callable[[Batch], None], bool]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="bootherd-dhcp-leases",
                                        daemon=True)
        self._sqlite = engine.dialect.name == "sqlite"

    def start(self) -> None:
        self._thread.start()

    def submit(self, batch: Batch, done: Callable[[Batch], None]) -> None:
        answered = False
        if self.down:
            answered = self._answer_early(batch, done)
        with self._cv:
            self._queue.append((batch, done, answered))
            self._cv.notify()

    def _answer_early(self, batch: Batch, done: Callable[[Batch], None]) -> bool:
        """Database away: hand back what may be answered now (pool grants get no reply)."""
        try:
            done([item for item in batch if safe_without_db(item[0])])
        except Exception:  # noqa: BLE001
            log.exception("lease commit callback failed")
        return True

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _set_down(self, down: bool) -> None:
        if down == self.down:
            return
        self.down = down
        log.warning("lease database %s", "unreachable: answering inventory nodes from memory"
                    if down else "back: queued leases written")
        if self.on_down is not None:
            try:
                self.on_down(down)
            except Exception:  # noqa: BLE001
                log.exception("lease on_down callback failed")

    def _run(self) -> None:
        conn = None
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    break
                work, self._queue = self._queue, []
            rows = [row for batch, _, _ in work for row, _ in batch]
            delay = 0.05
            while True:
                try:
                    if conn is None:
                        conn = self.engine.raw_connection() if self._sqlite \
                            else self.engine.connect()
                    lost = self._write(conn, rows)
                    break
                except Exception as e:  # noqa: BLE001 - the database may be briefly away
                    self.errors += 1
                    log.warning("lease commit failed, retrying in %.2fs: %s", delay,
                                str(e).splitlines()[0][:200])
                    try:
                        if conn is not None:
                            # Discard, don't reset: a reset on a dead socket only fails
                            # again, loudly, in the pool.
                            conn.invalidate()
                            conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                    conn = None
                    self._set_down(True)
                    # Hand back what may be answered from memory; keep every row.
                    for i, (batch, done, answered) in enumerate(work):
                        if not answered:
                            work[i] = (batch, done, self._answer_early(batch, done))
                    with self._cv:  # batches submitted meanwhile join this retry
                        more, self._queue = self._queue, []
                    if more:
                        work.extend(more)
                        rows.extend(row for batch, _, _ in more for row, _ in batch)
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
            self._set_down(False)
            self.batches += 1
            self.rows += len(rows)
            self.largest = max(self.largest, len(rows))
            for batch, done, answered in work:
                if lost:
                    batch = self._resolve(batch, lost, answered)
                if answered:
                    continue
                try:
                    done(batch)
                except Exception:  # noqa: BLE001
                    log.exception("lease commit callback failed")
        if conn is not None:
            conn.close()

    def _resolve(self, batch: Batch, lost: dict[str, dict[str, Any] | None],
                 answered: bool) -> Batch:
        """Replace the replies of lost claims (the other server's holder wins)."""
        out: Batch = []
        for row, token in batch:
            key = (row["ip"], row["mac"])
            if key in lost:
                self.conflicts += 1
                new = None
                if self.on_conflict is not None:
                    try:
                        new = self.on_conflict(row, None if answered else token, lost[key])
                    except Exception:  # noqa: BLE001
                        log.exception("lease conflict callback failed")
                if new is not None:
                    out.append((row, new))
                continue
            out.append((row, token))
        return out

    _COLS = ("ip", "mac", "client_id", "node_id", "state", "expires", "updated", "server")
    _SQLITE_UPSERT = (
        "INSERT OR REPLACE INTO leases (ip, mac, client_id, node_id, state, expires, updated, "
        "server) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )
    _PG_CHUNK = 4000  # rows per statement (8 parameters each, PostgreSQL allows 65,535)

    def _write(self, conn: Any, rows: list[dict[str, Any]]
               ) -> dict[tuple[str, str], dict[str, Any] | None]:
        """Commit rows; returns the lost pool claims: (ip, mac) -> the row holding ip."""
        latest: dict[str, dict[str, Any]] = {}
        for r in rows:
            latest[r["ip"]] = r
        if self._sqlite:
            # Raw DBAPI: one executemany in C per batch (the SQLAlchemy layer would cost
            # several microseconds of GIL per row on the packet path's core).
            cur = conn.cursor()
            try:
                cur.executemany(self._SQLITE_UPSERT,
                                [tuple(r[c] for c in self._COLS) for r in latest.values()])
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            finally:
                cur.close()
            return {}
        return self._write_pg(conn, [latest[ip] for ip in sorted(latest)])

    def _write_pg(self, conn: Any, rows: list[dict[str, Any]]
                  ) -> dict[tuple[str, str], dict[str, Any] | None]:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        # Sorted by ip: two servers' batches lock rows in one order (no deadlocks).
        fixed = [r for r in rows if r.get("node_id") is not None]
        pool = [r for r in rows if r.get("node_id") is None]
        t = s.leases
        lost: dict[tuple[str, str], dict[str, Any] | None] = {}
        with conn.begin():
            for i in range(0, len(fixed), self._PG_CHUNK):
                stmt = pg_insert(t).values(fixed[i:i + self._PG_CHUNK])
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=[t.c.ip],
                    set_={c: stmt.excluded[c] for c in self._COLS if c != "ip"}))
            for i in range(0, len(pool), self._PG_CHUNK):
                chunk = pool[i:i + self._PG_CHUNK]
                stmt = pg_insert(t).values(chunk)
                ex = stmt.excluded
                # A claim: only a free address (none, released, expired) or the MAC's own.
                stmt = stmt.on_conflict_do_update(
                    index_elements=[t.c.ip],
                    set_={c: ex[c] for c in self._COLS if c != "ip"},
                    where=(t.c.mac == ex.mac) | (t.c.state == RELEASED)
                    | (t.c.expires < ex.updated)).returning(t.c.ip)
                won = set(conn.execute(stmt).scalars())
                missed = [r for r in chunk if r["ip"] not in won]
                if missed:
                    # Another server is granting from the pool: learn every active pool
                    # lease at once, so we stop offering its addresses one NAK at a time.
                    now = max(r["updated"] for r in chunk)
                    active = [dict(h._mapping) for h in conn.execute(
                        select(t).where(t.c.node_id.is_(None), t.c.expires > now,
                                        t.c.state != RELEASED))]
                    holders = {h["ip"]: h for h in active}
                    for r in missed:
                        lost[(r["ip"], r["mac"])] = holders.get(r["ip"])
                    if self.on_holders is not None:
                        self.on_holders(active)
        return lost

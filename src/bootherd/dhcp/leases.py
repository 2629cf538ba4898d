"""DHCP leases: the in-memory table the engine decides from, and its durable writer.

The in-memory :class:`LeaseTable` is authoritative while the process lives: it holds at
most one lease per address and one address per MAC, so an address is never given to two
clients.  :class:`LeaseWriter` persists lease rows to the inventory table ``leases`` with
group commit: rows queued while a transaction is in flight form the next transaction, so
the batch size grows with the load and durability never caps the rate.  The transport
sends an ACK only after the batch holding its row has committed (a ``kill -9`` loses no
acknowledged lease).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, insert, select

from ..inventory import schema as s

log = logging.getLogger("bootherd.dhcp")

BOUND = "bound"
OFFERED = "offered"
RELEASED = "released"
DECLINED = "declined"


@dataclass(slots=True)
class Lease:
    ip: str
    mac: str
    state: str
    expires: float
    node_id: str | None = None
    client_id: str = ""

    def active(self, now: float) -> bool:
        """Holds its address now (offered or bound, not expired; declined blocks too)."""
        return self.state != RELEASED and self.expires > now


class LeaseTable:
    """Address <-> MAC bindings. Pure (no I/O, no clock: callers pass ``now``)."""

    def __init__(self) -> None:
        self.by_ip: dict[str, Lease] = {}
        self.by_mac: dict[str, str] = {}  # mac -> ip of its latest lease (affinity)

    def load(self, rows: Iterable[Any]) -> None:
        for r in rows:
            lease = Lease(r.ip, r.mac, r.state, float(r.expires), r.node_id, r.client_id or "")
            self.by_ip[lease.ip] = lease
            if lease.state != DECLINED:
                prev = self.by_mac.get(lease.mac)
                # A MAC with several rows (old data): keep its newest binding.
                if prev is None or self.by_ip[prev].expires < lease.expires:
                    self.by_mac[lease.mac] = lease.ip

    def get(self, ip: str) -> Lease | None:
        return self.by_ip.get(ip)

    def of_mac(self, mac: str) -> Lease | None:
        ip = self.by_mac.get(mac)
        if ip is None:
            return None
        lease = self.by_ip.get(ip)
        if lease is None or lease.mac != mac or lease.state == DECLINED:
            return None
        return lease

    def free_for(self, ip: str, mac: str, now: float) -> bool:
        """True if ``mac`` may hold ``ip`` (nobody else holds it now)."""
        lease = self.by_ip.get(ip)
        return lease is None or lease.mac == mac and lease.state != DECLINED \
            or not lease.active(now)

    def put(self, ip: str, mac: str, state: str, expires: float, node_id: str | None = None,
            client_id: str = "") -> Lease:
        """Bind ip to mac, dropping any other binding of either (one holder per address)."""
        old_ip = self.by_mac.get(mac)
        if old_ip is not None and old_ip != ip:
            old = self.by_ip.get(old_ip)
            if old is not None and old.mac == mac and old.state in (OFFERED,):
                del self.by_ip[old_ip]  # an unanswered offer elsewhere: give it back
        prev = self.by_ip.get(ip)
        if prev is not None and prev.mac != mac and self.by_mac.get(prev.mac) == ip:
            del self.by_mac[prev.mac]
        lease = Lease(ip, mac, state, expires, node_id, client_id)
        self.by_ip[ip] = lease
        if state == DECLINED:
            if self.by_mac.get(mac) == ip:
                del self.by_mac[mac]
        else:
            self.by_mac[mac] = ip
        return lease

    def drop_offer(self, mac: str) -> None:
        """The client took another server's offer: free what we offered it."""
        ip = self.by_mac.get(mac)
        if ip is None:
            return
        lease = self.by_ip.get(ip)
        if lease is not None and lease.mac == mac and lease.state == OFFERED:
            del self.by_ip[ip]
            del self.by_mac[mac]

    def holders(self) -> dict[str, str]:
        return {ip: lease.mac for ip, lease in self.by_ip.items()}


def lease_row(lease: Lease, now: float, server: str) -> dict[str, Any]:
    return {"ip": lease.ip, "mac": lease.mac, "client_id": lease.client_id,
            "node_id": lease.node_id, "state": lease.state, "expires": lease.expires,
            "updated": now, "server": server}


def load_leases(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(s.leases)))


Batch = list[tuple[dict[str, Any], Any]]  # (row, token handed back when committed)


class LeaseWriter:
    """One thread, one connection, group commit.

    ``submit(batch, done)`` is called by the event loop with at most one batch in flight;
    ``done(batch)`` is called (from the writer thread) once it has committed.  A failed
    commit is retried with back-off: a queued lease is never dropped while the process lives.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.batches = 0
        self.rows = 0
        self.errors = 0
        self.largest = 0
        self._cv = threading.Condition()
        self._queue: list[tuple[Batch, Callable[[Batch], None]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="bootherd-dhcp-leases",
                                        daemon=True)
        self._sqlite = engine.dialect.name == "sqlite"

    def start(self) -> None:
        self._thread.start()

    def submit(self, batch: Batch, done: Callable[[Batch], None]) -> None:
        with self._cv:
            self._queue.append((batch, done))
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        conn = None
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    break
                work, self._queue = self._queue, []
            rows = [row for batch, _ in work for row, _ in batch]
            delay = 0.05
            while True:
                try:
                    if conn is None:
                        conn = self.engine.raw_connection() if self._sqlite \
                            else self.engine.connect()
                    self._write(conn, rows)
                    break
                except Exception as e:  # noqa: BLE001 - the database may be briefly away
                    self.errors += 1
                    log.warning("lease commit failed, retrying in %.2fs: %s", delay,
                                str(e).splitlines()[0][:200])
                    try:
                        if conn is not None:
                            conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                    conn = None
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
            self.batches += 1
            self.rows += len(rows)
            self.largest = max(self.largest, len(rows))
            for batch, done in work:
                try:
                    done(batch)
                except Exception:  # noqa: BLE001
                    log.exception("lease commit callback failed")
        if conn is not None:
            conn.close()

    _COLS = ("ip", "mac", "client_id", "node_id", "state", "expires", "updated", "server")
    _SQLITE_UPSERT = (
        "INSERT OR REPLACE INTO leases (ip, mac, client_id, node_id, state, expires, updated, "
        "server) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )

    def _write(self, conn: Any, rows: list[dict[str, Any]]) -> None:
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
            return
        with conn.begin():
            conn.execute(delete(s.leases).where(s.leases.c.ip.in_(list(latest))))
            conn.execute(insert(s.leases), list(latest.values()))

"""DHCP leases: the in-memory table the engine decides from.  Pure: no I/O, no clock.

The :class:`LeaseTable` is authoritative while the process lives: it holds at most one
lease per address and one address per MAC, so an address is never given to two clients.
Its rows reach the database through :class:`bootherd.dhcp.leasewriter.LeaseWriter`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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

    def forget(self, ip: str, mac: str) -> None:
        """Drop mac's binding of ip (nothing if someone else holds ip)."""
        lease = self.by_ip.get(ip)
        if lease is not None and lease.mac == mac:
            del self.by_ip[ip]
            if self.by_mac.get(mac) == ip:
                del self.by_mac[mac]

    def drop_offer(self, mac: str) -> None:
        """The client took another server's offer: free what we offered it."""
        lease = self.of_mac(mac)
        if lease is not None and lease.state == OFFERED:
            self.forget(lease.ip, mac)

    def holders(self) -> dict[str, str]:
        return {ip: lease.mac for ip, lease in self.by_ip.items()}


def lease_row(lease: Lease, now: float, server: str) -> dict[str, Any]:
    return {"ip": lease.ip, "mac": lease.mac, "client_id": lease.client_id,
            "node_id": lease.node_id, "state": lease.state, "expires": lease.expires,
            "updated": now, "server": server}

"""Client addresses as the inventory spells them.

A dual-stack listener reports an IPv4 client as `::ffff:a.b.c.d`; the inventory
knows it as `a.b.c.d`.  Every service that looks a node up by its source address
goes through `norm_ip`.  No imports from the rest of bootherd.
"""

from __future__ import annotations

import ipaddress
import socket
import time


def norm_ip(ip: str) -> str:
    """Canonical text of an address: IPv4-mapped IPv6 becomes plain IPv4, a zone index
    (`%eth0`) is dropped; anything that is not an address comes back unchanged."""
    if ":" not in ip:
        return ip  # IPv4 (the common case) or not an address: nothing to unmap
    try:
        a = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    return str(a.ipv4_mapped or a)


WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def route_source(client_ip: str) -> str:
    """The local address this host sends to `client_ip` from (what a wildcard-bound
    UDP service's reply comes from): the routing table's choice, found by connecting
    a UDP socket, which sends nothing.  "" if there is no route."""
    family = socket.AF_INET6 if ":" in client_ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((client_ip, 9))
            return norm_ip(s.getsockname()[0])
    except OSError:
        return ""


ROUTE_CACHE_SECONDS = 60.0  # a route's source is looked up again after this long
ROUTE_CACHE_SIZE = 65536  # entries (nodes) kept before the cache starts over
_route_cache: dict[str, tuple[str, float]] = {}


def local_address(bound: str, client_ip: str, now: float | None = None) -> str:
    """The address a request to a service bound to `bound` arrived on, as far as a
    reply is concerned: the bound address itself, or for a wildcard the route's source
    (remembered per client for ROUTE_CACHE_SECONDS: a storm's every request would
    otherwise cost a socket of its own)."""
    if bound not in WILDCARDS:
        return bound
    t = time.monotonic() if now is None else now
    hit = _route_cache.get(client_ip)
    if hit is not None and t < hit[1]:
        return hit[0]
    if len(_route_cache) >= ROUTE_CACHE_SIZE:
        _route_cache.clear()
    source = route_source(client_ip)
    _route_cache[client_ip] = (source, t + ROUTE_CACHE_SECONDS)
    return source


def connection_local_ip(transport: object) -> str:
    """The address a TCP connection (an asyncio transport) reached: its local end, as
    the inventory spells addresses; "" without a transport."""
    get = getattr(transport, "get_extra_info", None)
    sockname = get("sockname") if get is not None else None
    return norm_ip(sockname[0]) if sockname else ""

"""Client addresses as the inventory spells them.

A dual-stack listener reports an IPv4 client as `::ffff:a.b.c.d`; the inventory
knows it as `a.b.c.d`.  Every service that looks a node up by its source address
goes through `norm_ip`.  No imports from the rest of bootherd.
"""

from __future__ import annotations

import ipaddress


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

"""A testbed's addresses against the network this server serves.

`testbed.parse` checks what a file says on its own (masks, roles); what needs the
configuration and the host is here: a node must not use the server's own address
(its replies would go to the server), and a node outside every subnet the DHCP
server is on, or with a mask other than that subnet's, gets an answer only through
a relay or with the wrong netmask.  The first is refused, the others are warned
about, each naming the entry, as `bootherd testbed import` prints them.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

WILDCARD = ("0.0.0.0", "")
SERVICE_SECTIONS = ("dhcp", "tftp", "bootinfo", "tmcd", "http")


@dataclass(frozen=True)
class Problem:
    where: str
    message: str
    fatal: bool

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def local_interfaces() -> list[tuple[str, ipaddress.IPv4Interface]]:
    """(interface name, address/prefix) of every IPv4 address of this host's namespace."""
    ip = shutil.which("ip")
    if ip is None:
        return []
    try:
        out = subprocess.run([ip, "-j", "-4", "addr", "show"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        links = json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    found = []
    for link in links:
        for a in link.get("addr_info", []):
            if a.get("family") == "inet":
                found.append((link.get("ifname", ""),
                              ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")))
    return found


def served_subnets(cfg: Any, local: list[tuple[str, ipaddress.IPv4Interface]]
                   ) -> list[tuple[str, ipaddress.IPv4Interface]] | None:
    """The interface addresses the DHCP server answers on (its subnets); None when DHCP
    is off or its address is not on this host (the import runs elsewhere)."""
    d = cfg.dhcp
    if not d.enabled:
        return None
    if d.interface:
        found = [(n, a) for n, a in local if n == d.interface]
    elif d.address in WILDCARD:
        found = [(n, a) for n, a in local if not a.ip.is_loopback] or \
            [(n, a) for n, a in local if a.ip.is_loopback]
    else:
        found = [(n, a) for n, a in local if str(a.ip) == d.address]
    return found or None


def own_addresses(cfg: Any) -> dict[str, str]:
    """Address -> the key that names it as this server's."""
    out: dict[str, str] = {}
    if cfg.server.public_address:
        out[cfg.server.public_address] = "server.public_address"
    for sec in SERVICE_SECTIONS:
        section = getattr(cfg, sec)
        if section.enabled and section.address not in WILDCARD:
            out.setdefault(section.address, f"{sec}.address")
    return out


def check(data: dict[str, list[dict[str, Any]]], cfg: Any,
          local: list[tuple[str, ipaddress.IPv4Interface]] | None = None) -> list[Problem]:
    """The problems of a parsed testbed (`testbed.parse`) on this server's network."""
    local = local_interfaces() if local is None else local
    own = own_addresses(cfg)
    served = served_subnets(cfg, local)
    if served is not None:
        for name, a in served:
            own.setdefault(str(a.ip), f"the address of {name}")
    problems: list[Problem] = []
    for i, n in enumerate(data["nodes"]):
        where = f"nodes[{i}] ({n['node_id']})"
        for j, itf in enumerate(n["interfaces"]):
            w = f"{where}.interfaces[{j}]"
            ip = itf["ip"]
            if not ip:
                continue
            if ip in own:
                problems.append(Problem(f"{w}.ip", f"{ip} is this server's own address "
                                        f"({own[ip]})", True))
                continue
            if itf["role"] != "ctrl" or n["phys_node_id"] or served is None:
                continue
            addr = ipaddress.IPv4Address(ip)
            on = [(name, a) for name, a in served if addr in a.network]
            if not on:
                nets = ", ".join(f"{a.network} on {name}" for name, a in served)
                problems.append(Problem(f"{w}.ip", f"{ip} is outside every subnet the DHCP "
                                        f"server is on ({nets}): it is answered only through "
                                        "a relay (giaddr)", False))
                continue
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{itf['mask']}").prefixlen
            name, a = on[0]
            if prefix != a.network.prefixlen:
                problems.append(Problem(f"{w}.mask", f"{itf['mask']} (/{prefix}) but the "
                                        f"DHCP server's subnet is {a.network} on {name}",
                                        False))
    return problems

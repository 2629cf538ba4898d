"""What does this node boot?  The single place that decides.

DHCP (boot file), TFTP, bootinfo (UDP), iPXE (HTTP) and TMCD's `bootwhat` all
ask these pure functions over an inventory Snapshot; none decides on its own.
No I/O here except `clear_next_os`, which the callers run in a thread.

Order of `decide_boot` (see /work/shared/protocols/bootinfo.md and
docs/bootinfo.md):

1. unknown node                      -> the new-node MFS (or WAIT if none)
2. not allocated (client version>=1) -> WAIT
3. pxe_loader set to another loader  -> REBOOT
4. next_os (one-shot), temp_os, default_os: MFS | MB | PART / DISKPART / SYSID
5. nothing set                       -> WAIT

A node being reloaded is answered `reload_decision` (the imaging MFS) instead; the
lifecycle coordinator, which remembers the reload, asks for it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, update

from .boottype import BootType
from .firmware import BIOS, DEFAULT_LOADERS, IPXE, UEFI, loader_slot
from .inventory import schema as s
from .inventory.memory import type_loaders
from .inventory.model import Node, OSImage, Snapshot

NEWNODE_IMAGE = "NEWNODE-MFS"


@dataclass(frozen=True, slots=True)
class BootDecision:
    type: BootType
    partition: int | None = None
    sysid: int | None = None
    disk: int | None = None
    server: str | None = None  # IPv4 of the TFTP/MFS server (MB, MFS); None: this server
    path: str = ""             # kernel file (MB) or MFS path without "ip:" (MFS)
    initrd: str = ""
    cmdline: str = ""
    image: str | None = None   # OS image name the decision came from
    consumes_next_os: bool = False  # caller clears node.next_os once served
    reason: str = ""           # short why, for logs and `bootherd node events`

    @property
    def boots(self) -> bool:
        """True for answers that start an OS (the node moves to BOOTING)."""
        return self.type in (BootType.PART, BootType.SYSID, BootType.MB, BootType.MFS,
                             BootType.DISKPART)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def split_server_path(spec: str, default_server: str | None = None) -> tuple[str | None, str]:
    """"10.0.0.1:/a/b" -> ("10.0.0.1", "/a/b"); a bare path gets default_server (None:
    this server, whose address each reply fills in: the one its request arrived on).

    Only an IPv4 literal before the colon counts as a host: bootinfo carries a
    4-byte address, and this function must not resolve names (no I/O)."""
    host, sep, rest = spec.partition(":")
    if sep and _is_ipv4(host):
        return host, rest
    return default_server, spec


def _mfs(spec: str, cmdline: str, **kw: Any) -> BootDecision:
    # Emulab convention: text after the first space of an MFS path is its cmdline.
    path, _, extra = spec.strip().partition(" ")
    server, path = split_server_path(path)
    return BootDecision(BootType.MFS, server=server, path=path,
                        cmdline=cmdline or extra.strip(), **kw)


def _from_image(img: OSImage, node: Node, cfg: Any, **kw: Any) -> BootDecision:
    cmdline = node.boot_cmdline or img.cmdline
    if img.kind == "mfs":
        return _mfs(img.path, cmdline, initrd=img.initrd, image=img.name, **kw)
    if img.kind == "kernel":
        server, path = split_server_path(img.path)
        return BootDecision(BootType.MB, server=server, path=path, initrd=img.initrd,
                            cmdline=cmdline, image=img.name, **kw)
    if img.partition is None and img.sysid is not None:
        return BootDecision(BootType.SYSID, sysid=img.sysid, cmdline=cmdline, image=img.name,
                            **kw)
    part = img.partition if img.partition is not None else 1
    if node.bios_disk is not None:
        return BootDecision(BootType.DISKPART, disk=node.bios_disk, partition=part,
                            cmdline=cmdline, image=img.name, **kw)
    return BootDecision(BootType.PART, partition=part, cmdline=cmdline, image=img.name, **kw)


def newnode_decision(snapshot: Snapshot, cfg: Any) -> BootDecision:
    spec = cfg.bootinfo.newnode_mfs
    if spec:
        return _mfs(spec, "", reason="unknown node")
    img = snapshot.os_images.get(NEWNODE_IMAGE)
    if img is not None:
        return _mfs(img.path, img.cmdline, initrd=img.initrd, image=img.name,
                    reason="unknown node")
    return BootDecision(BootType.WAIT, reason="unknown node, no new-node MFS configured")


def decide_boot(snapshot: Snapshot, node: Node | None, cfg: Any,
                client_version: int = 1) -> BootDecision:
    """What `node` (None: not in the inventory) boots now."""
    if node is None:
        return newnode_decision(snapshot, cfg)
    if node.allocation is None and client_version >= 1:
        return BootDecision(BootType.WAIT, reason="not allocated")
    if node.pxe_loader and node.pxe_loader != cfg.bootinfo.loader:
        return BootDecision(BootType.REBOOT, reason=f"pxe_loader is {node.pxe_loader}")
    for field, one_shot in (("next_os", True), ("temp_os", False), ("default_os", False)):
        name = getattr(node, field)
        if not name:
            continue
        img = snapshot.os_images.get(name)
        if img is None:  # dangling reference: try the next setting, never crash
            continue
        return _from_image(img, node, cfg, consumes_next_os=one_shot, reason=field)
    return BootDecision(BootType.WAIT, reason="no boot OS set")


def reload_decision(node: Node, image: str, cfg: Any) -> BootDecision:
    """The imaging MFS for a node that is to write disk image `image` (the reload
    cycle, docs/imaging.md): imaging.mfs_kernel and mfs_initrd, and on its command
    line what its receiver needs, `bootherd.image=NAME bootherd.imaging=HOST:PORT
    bootherd.http=URL bootherd.disk=DEVICE bootherd.node=ID`."""
    img = cfg.imaging
    public = cfg.server.public_address
    host = img.address if img.address not in ("", "0.0.0.0", "127.0.0.1") else public
    args = [img.mfs_cmdline, f"bootherd.node={node.node_id}", f"bootherd.image={image}",
            f"bootherd.imaging={host}:{img.port}", f"bootherd.http={http_base(cfg, public)}",
            f"bootherd.disk={img.reload_disk}"]
    server, path = split_server_path(img.mfs_kernel, public)
    return BootDecision(BootType.MFS, server=server, path=path, initrd=img.mfs_initrd,
                        cmdline=" ".join(a for a in args if a), image=image,
                        reason=f"reload {image}")


# ------------------------------------------------------------------------- DHCP

def url_host(address: str) -> str:
    """An address as a URL's host: IPv6 literals in brackets (RFC 3986)."""
    return f"[{address}]" if ":" in address else address


def advertised(cfg: Any, local: str) -> str:
    """The address a reply names for this server: server.public_address when set,
    else `local`, the address the request arrived on (as dnsmasq does)."""
    return cfg.server.public_address or local


def http_base(cfg: Any, server: str) -> str:
    """This server's HTTP base URL at `server` (an advertised address)."""
    return f"http://{url_host(server)}:{cfg.http.port}"


def public_address6(cfg: Any) -> str:
    """The IPv6 address nodes reach this server at (DHCPv6 boot URLs): server.public_address6,
    else server.public_address when that is IPv6 (an IPv6-only network), else
    dhcp6.address."""
    if cfg.server.public_address6:
        return cfg.server.public_address6
    if ":" in cfg.server.public_address:
        return cfg.server.public_address
    return cfg.dhcp6.address


# iPXE expands ${...} in the DHCP filename before fetching it, so one fixed
# string names every node.  Source address identifies first; the MAC (hyphens:
# no ':' to confuse a URL) helps where the DHCP address is not the control IP.
IPXE_SCRIPT_PATH = "/ipxe"
IPXE_MAC_PARAM = "mac=${netX/mac:hexhyp}"


def ipxe_script_url(cfg: Any, server: str) -> str:
    return f"{http_base(cfg, server)}{IPXE_SCRIPT_PATH}?{IPXE_MAC_PARAM}"


def loader_for(snapshot: Snapshot, node: Node | None, slot: str, cfg: Any) -> str:
    """The loader of `slot` for `node` (None: an unknown client, which gets the loaders
    of `dhcp.newnode_type`): the node's own, else its type's, else the built-in default
    (x86 only); "" when none is configured."""
    if node is not None:
        path = node.loaders.get(slot)
    else:
        tname = cfg.dhcp.newnode_type
        t = snapshot.node_types.get(tname) if tname else None
        path = type_loaders(t).get(slot) if t else None
    return path or DEFAULT_LOADERS.get(slot, "")


# pxe_loader pins the node to one loader (the other half of bootinfo's REBOOT answer:
# the node reboots and must be handed that loader here).  Emulab's loaders are x86
# PXE binaries, so the pin holds for those two slots; other architectures keep theirs.
PINNED_SLOTS = (BIOS, UEFI)


def _boot_loader(snapshot: Snapshot, node: Node | None, slot: str, cfg: Any) -> str:
    pinned = node.pxe_loader if node is not None and slot in PINNED_SLOTS else ""
    return pinned or loader_for(snapshot, node, slot, cfg)


def dhcp_boot(snapshot: Snapshot, node: Node | None, firmware: Any, server: str,
              cfg: Any) -> tuple[str, str] | None:
    """(boot filename, next-server) for a PXE/HTTP/iPXE client that reaches this
    server at `server` (the advertised address: see `advertised`); None when its
    architecture's slot has no loader (the DHCP server refuses it, never handing it
    another architecture's binary).

    iPXE gets the per-node script URL instead of a loader: handing iPXE the
    iPXE binary again is the classic chainload loop."""
    slot = loader_slot(firmware)
    public = server
    if slot == IPXE:
        return ipxe_script_url(cfg, server), public
    loader = _boot_loader(snapshot, node, slot, cfg)
    if not loader:
        return None
    if slot.startswith("http"):  # UEFI HTTP boot: a URL, not a TFTP name
        if "://" in loader:  # a loader on another server
            return loader, public
        return f"{http_base(cfg, server)}/boot/{loader.lstrip('/')}", public
    return loader, public


def dhcp6_boot(snapshot: Snapshot, node: Node | None, firmware: Any, cfg: Any) -> str | None:
    """The boot file URL (DHCPv6 option 59, RFC 5970) for a PXE/HTTP/iPXE client over
    IPv6: tftp://[addr]/loader for PXE, http://[addr]:port/boot/loader for HTTP boot, the
    iPXE script URL for iPXE; None when the slot has no loader (refused)."""
    slot = loader_slot(firmware)
    address = public_address6(cfg)
    if slot == IPXE:
        return ipxe_script_url(cfg, address)
    loader = _boot_loader(snapshot, node, slot, cfg)
    if not loader:
        return None
    if "://" in loader:
        return loader
    if slot.startswith("http"):
        return f"{http_base(cfg, address)}/boot/{loader.lstrip('/')}"
    return f"tftp://{url_host(address)}/{loader.lstrip('/')}"


# -------------------------------------------------------------- one-shot next_os

def clear_next_os(engine: Engine, node_id: str, expected: str | None = None) -> bool:
    """Clear a served one-shot next_os; True if a row changed.

    With `expected`, only that value is cleared, so an operator who set a new
    next_os meanwhile does not lose it.  Blocking: run it via asyncio.to_thread."""
    q = update(s.nodes).where(s.nodes.c.node_id == node_id)
    q = q.where(s.nodes.c.next_os == expected) if expected else \
        q.where(s.nodes.c.next_os.is_not(None))
    with engine.begin() as conn:
        return conn.execute(q.values(next_os=None)).rowcount > 0


# Per-node TFTP files: answered from the inventory, nothing on disk.  A BIOS
# PXE ROM that loaded a plain iPXE binary over TFTP can fetch this script to
# reach its own HTTP boot script without a DHCP round trip.
TFTP_NODE_SCRIPT = "bootherd.ipxe"


def tftp_node_file(snapshot: Snapshot, client_ip: str, path: str, cfg: Any,
                   server: str) -> bytes | None:
    """The per-node answer for a TFTP path, or None to serve the file system;
    `server` is the advertised address (the one the request reached)."""
    if path.lstrip("/") != TFTP_NODE_SCRIPT:
        return None
    node = snapshot.by_ip.get(client_ip)
    if node is None or node.control_mac is None:
        return None
    return (f"#!ipxe\nchain {http_base(cfg, server)}{IPXE_SCRIPT_PATH}"
            f"?mac={node.control_mac}\n").encode()

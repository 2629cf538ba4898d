"""The in-memory view of the inventory that servers answer hot paths from.

A Snapshot is immutable once built: a reload builds a new one and swaps the
reference, so a request never sees half of a change.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def norm_mac(mac: str) -> str:
    """Lower-case, colon-separated MAC; accepts '-', '.', or no separators."""
    hexdigits = "".join(c for c in mac.lower() if c not in ":-.")
    if len(hexdigits) != 12 or any(c not in "0123456789abcdef" for c in hexdigits):
        raise ValueError(f"bad MAC address: {mac!r}")
    return ":".join(hexdigits[i:i + 2] for i in range(0, 12, 2))


def natural_key(name: str) -> tuple[str, int, str]:
    """Sort key that puts pc2 before pc10 (node ids, vnames)."""
    head = name.rstrip("0123456789")
    tail = name[len(head):]
    return (head, int(tail) if tail else -1, name)


@dataclass(frozen=True, slots=True)
class Interface:
    mac: str
    node_id: str
    ip: str | None
    mask: str
    role: str  # ctrl | expt
    iface: str
    speed: int
    duplex: str
    lan: str
    ip6: str | None = None  # IPv6 address (DHCPv6, TMCD/HTTP over IPv6), beside ip


@dataclass(frozen=True, slots=True)
class OSImage:
    name: str
    kind: str  # part | mfs | kernel
    partition: int | None
    sysid: int | None
    path: str
    initrd: str
    cmdline: str
    disk_image: str = ""  # the disk image a reload writes (imaging), "" for none


@dataclass(frozen=True, slots=True)
class Allocation:
    pid: str
    eid: str
    vname: str
    startupcmd: str
    erole: str = "node"  # role in the experiment (TMCD `role`)


@dataclass(frozen=True, slots=True)
class Node:
    node_id: str
    type: str
    role: str
    phys_node_id: str | None
    jailed: bool
    default_os: str | None
    temp_os: str | None
    next_os: str | None
    loaders: dict[str, str]  # loader slot (bootherd.firmware) -> path, own over its type's
    pxe_loader: str
    boot_cmdline: str
    bios_disk: int | None
    privkey: str | None
    ntp_drift: float
    interfaces: tuple[Interface, ...]
    allocation: Allocation | None
    uuid: str = ""  # empty: TMCD derives one from node_id

    @property
    def control(self) -> Interface | None:
        for i in self.interfaces:
            if i.role == "ctrl":
                return i
        return None

    @property
    def control_ip(self) -> str | None:
        c = self.control
        return c.ip if c else None

    @property
    def control_mac(self) -> str | None:
        c = self.control
        return c.mac if c else None

    @property
    def control_ip6(self) -> str | None:
        c = self.control
        return c.ip6 if c else None


@dataclass(frozen=True, slots=True)
class User:
    login: str
    uid: int
    gid: int
    name: str
    email: str
    shell: str
    password_hash: str
    serial: int
    groups: tuple[str, ...]
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Experiment:
    pid: str
    eid: str
    creator: str
    swapper: str
    routertype: str
    nseconfig: str
    startupcmd: str
    gid: str | None
    members: tuple[tuple[str, bool], ...]  # (login, root)
    keyhash: str = ""
    eventkey: str = ""
    syncserver: str = ""  # vname of the experiment's sync server
    nfsmounts: str = "emulabdefault"  # emulabdefault | genidefault | none


@dataclass(frozen=True)
class Snapshot:
    generation: int
    nodes: dict[str, Node]
    by_mac: dict[str, Node]
    by_ip: dict[str, Node]
    by_privkey: dict[str, Node]
    os_images: dict[str, OSImage]
    node_types: dict[str, dict]
    users: dict[str, User]
    groups: dict[str, int]
    experiments: dict[tuple[str, str], Experiment]
    experiment_nodes: dict[tuple[str, str], tuple[str, ...]]
    mounts: dict[tuple[str, str], tuple[tuple[str, str, str], ...]]  # (fstype, remote, local)
    tarballs: dict[tuple[str, str], tuple[tuple[str, str, str], ...]]  # (vname, dir, path)
    rpms: dict[tuple[str, str], tuple[tuple[str, str], ...]]  # (vname, path)
    routes: dict[str, tuple[dict, ...]]
    tunnels: dict[str, tuple[dict, ...]]
    trafgens: dict[str, tuple[dict, ...]]
    link_delays: dict[str, tuple[dict, ...]]
    ntp_servers: tuple[tuple[str, str], ...]
    vnodes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    group_projects: dict[str, str] = field(default_factory=dict)  # group -> its project
    change_id: int = 0  # the last change-log row this snapshot includes

    def node_for_ip(self, ip: str) -> Node | None:
        return self.by_ip.get(ip)

    def node_for_mac(self, mac: str) -> Node | None:
        return self.by_mac.get(mac)

    def experiment_of(self, node: Node) -> Experiment | None:
        a = node.allocation
        return self.experiments.get((a.pid, a.eid)) if a else None

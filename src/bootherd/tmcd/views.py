"""What a node sees: every TMCD reply, rendered from a Snapshot only.

No database reads and no I/O: the server core asks `Views` for a node's
reply and gets text.  All per-node sections are rendered together once per
(node, snapshot generation) and cached, so a boot storm of N nodes costs N
renders whether the nodes send one fullconfig or 26 single requests.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..inventory.model import Experiment, Node, Snapshot, natural_key
from .protocol import (
    FULLCONFIG_SECTIONS,
    SECRET_SECTIONS,
    dq,
    join_lines,
    kv_line,
    render_fullconfig,
    sq,
)

# Commands a free (unallocated) node still gets an answer to.
NO_ALLOCATION_NEEDED = frozenset({"status", "ntpinfo", "ipodinfo", "vnodelist", "isalive",
                                  "bootwhat", "state", "reboot"})
# Routes are handed out for these router types only (ospf computes its own).
STATIC_ROUTERTYPES = frozenset({"static", "manual", "static-ddijk", "static-old"})

ShaLookup = Callable[[str], "str | None"]


@dataclass
class ViewSettings:
    server_address: str = "127.0.0.1"
    http_port: int = 8080
    ipod_secret: bytes = b""
    # Returns the HTTP service's file_sha256(path) hook, or None; looked up at
    # render time because the HTTP service may register it after we start.
    sha_hook: Callable[[], ShaLookup | None] = field(default=lambda: None)
    # bootwhat: callable(snapshot, node) -> reply text or None.
    bootwhat: Callable[[Snapshot, Node], str | None] | None = None


@dataclass
class _Entry:
    sections: dict[str, str]
    full_tcp: str = ""
    full_udp: str = ""
    digest: str = ""


def _mac(mac: str) -> str:
    # Emulab clients expect the MAC as 12 hex digits without separators.
    return mac.replace(":", "").lower()


def _num(x: float | int) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class Views:
    def __init__(self, settings: ViewSettings | None = None):
        self.s = settings or ViewSettings()
        self._gen: int | None = None
        self._cache: dict[str, _Entry] = {}
        self._hostnames: dict[tuple[str, str], str] = {}
        self.renders = 0  # fullconfig section renders (for tests and metrics)

    # -- cache ---------------------------------------------------------------------

    def _entry(self, snap: Snapshot, node: Node) -> _Entry:
        if snap.generation != self._gen:
            if self._gen is not None and snap.generation < self._gen:
                # A request still holding an older snapshot: answer it, don't cache.
                return self._build(snap, node)
            self._gen = snap.generation
            self._cache = {}
            self._hostnames = {}
        e = self._cache.get(node.node_id)
        if e is None:
            e = self._cache[node.node_id] = self._build(snap, node)
        return e

    def _build(self, snap: Snapshot, node: Node) -> _Entry:
        self.renders += 1
        exp = snap.experiment_of(node)
        secs = {name: self._render(name, snap, node, exp) or "" for name in FULLCONFIG_SECTIONS}
        full_tcp = render_fullconfig(secs)
        full_udp = render_fullconfig({k: v for k, v in secs.items() if k not in SECRET_SECTIONS})
        digest = hashlib.sha256(full_tcp.encode()).hexdigest()
        return _Entry(secs, full_tcp, full_udp, digest)

    def invalidate(self) -> None:
        self._gen = None
        self._cache = {}
        self._hostnames = {}

    # -- public --------------------------------------------------------------------

    def command(self, snap: Snapshot, node: Node, cmd: str) -> str | None:
        """Reply text for one command ('' = answered with nothing), None if unknown."""
        if cmd in FULLCONFIG_SECTIONS:
            return self._entry(snap, node).sections[cmd]
        if cmd == "status":
            return self.status(node)
        if cmd == "hostnames":
            exp = snap.experiment_of(node)
            if exp is None:
                return ""
            key = (exp.pid, exp.eid)
            if snap.generation == self._gen and key in self._hostnames:
                return self._hostnames[key]
            text = self.hostnames(snap, exp)
            if snap.generation == self._gen:
                self._hostnames[key] = text
            return text
        if cmd == "bootwhat":
            return (self.s.bootwhat(snap, node) or "") if self.s.bootwhat else ""
        return None

    def fullconfig(self, snap: Snapshot, node: Node, secrets: bool = True) -> str:
        e = self._entry(snap, node)
        return e.full_tcp if secrets else e.full_udp

    def digest(self, snap: Snapshot, node: Node) -> str:
        """Hash of the node's complete fullconfig: changes iff its configuration does."""
        return self._entry(snap, node).digest

    def as_json(self, snap: Snapshot, node: Node, secrets: bool = True) -> dict[str, Any]:
        e = self._entry(snap, node)
        secs = {k: v.splitlines() for k, v in e.sections.items()
                if secrets or k not in SECRET_SECTIONS}
        secs["hostnames"] = (self.command(snap, node, "hostnames") or "").splitlines()
        a = node.allocation
        return {
            "node_id": node.node_id,
            "status": self.status(node).strip(),
            "allocation": {"pid": a.pid, "eid": a.eid, "vname": a.vname} if a else None,
            "generation": snap.generation,
            "digest": e.digest,
            "sections": secs,
        }

    # -- renderers -----------------------------------------------------------------

    def _render(self, name: str, snap: Snapshot, node: Node, exp: Experiment | None) -> str:
        if exp is None and name not in NO_ALLOCATION_NEEDED:
            return ""
        fn = getattr(self, "r_" + name)
        return fn(snap, node, exp)

    @staticmethod
    def status(node: Node) -> str:
        a = node.allocation
        if a is None:
            return "FREE\n"
        return f"ALLOCATED={a.pid}/{a.eid} NICKNAME={a.vname}\n"

    def r_ntpinfo(self, snap: Snapshot, node: Node, exp: Experiment | None) -> str:
        lines = [f"{'PEER' if kind == 'peer' else 'SERVER'}={host}"
                 for host, kind in snap.ntp_servers]
        lines.append(f"DRIFT={_num(float(node.ntp_drift))}")
        return join_lines(lines)

    def r_mounts(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        lines, fstype = [], None
        for fs, remote, local in snap.mounts.get((exp.pid, exp.eid), ()):
            if fs != fstype:
                lines.append(f"FSTYPE={fs}")
                fstype = fs
            lines.append(kv_line(("REMOTE", remote), ("LOCAL", local)))
        return join_lines(lines)

    def r_accounts(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        members = [(snap.users[login], root) for login, root in exp.members
                   if login in snap.users]
        gids: dict[str, int] = {}
        if exp.gid and exp.gid in snap.groups:
            gids[exp.gid] = snap.groups[exp.gid]
        for u, _ in members:
            for g in u.groups:
                if g in snap.groups:
                    gids[g] = snap.groups[g]
        lines = [kv_line("ADDGROUP", ("NAME", name), ("GID", gid))
                 for name, gid in sorted(gids.items(), key=lambda x: x[1])]
        for u, root in members:
            glist = ",".join(str(snap.groups[g]) for g in u.groups
                             if g in snap.groups and snap.groups[g] != u.gid)
            lines.append(kv_line(
                "ADDUSER", ("LOGIN", u.login), ("PSWD", u.password_hash), ("UID", u.uid),
                ("GID", u.gid), ("ROOT", int(root)), ("NAME", dq(u.name)),
                ("HOMEDIR", f"/users/{u.login}"), ("GLIST", dq(glist)), ("SERIAL", u.serial),
                ("EMAIL", dq(u.email)), ("SHELL", u.shell)))
        for u, _ in members:
            for key in u.keys:
                lines.append(kv_line("PUBKEY", ("LOGIN", u.login), ("KEY", dq(key))))
        return join_lines(lines)

    def r_ifconfig(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        lines = []
        for i in node.interfaces:
            if i.role != "expt" or not i.ip:
                continue
            lines.append(kv_line(
                "INTERFACE", ("IFACETYPE", "any"), ("INET", i.ip), ("MASK", i.mask),
                ("MAC", _mac(i.mac)), ("SPEED", f"{i.speed}Mbps"), ("DUPLEX", i.duplex),
                ("IFACE", i.iface), ("RTABID", ""), ("LAN", i.lan)))
        return join_lines(lines)

    def r_tunnels(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        return join_lines([kv_line(("TUNNEL", t["lan"]), ("MEMBER", t["member"]),
                                   ("KEY", sq(t["key"])), ("VALUE", sq(t["value"])))
                           for t in snap.tunnels.get(node.node_id, ())])

    def hostnames(self, snap: Snapshot, exp: Experiment) -> str:
        lines = []
        members = [snap.nodes[nid] for nid in snap.experiment_nodes.get((exp.pid, exp.eid), ())
                   if nid in snap.nodes]
        for n in sorted(members, key=lambda n: natural_key(n.allocation.vname if n.allocation
                                                        else "")):
            if n.allocation is None:
                continue
            for i in n.interfaces:
                if i.role == "expt" and i.ip and i.lan:
                    lines.append(kv_line(("NAME", f"{n.allocation.vname}-{i.lan}"),
                                         ("IP", i.ip), ("ALIASES", "''")))
        return join_lines(lines)

    @staticmethod
    def _route(r: dict) -> list[tuple[str, object]]:
        return [("DEST", r["dest"]), ("DESTTYPE", r["desttype"]), ("DESTMASK", r["destmask"]),
                ("NEXTHOP", r["nexthop"]), ("COST", r["cost"])]

    def r_routing(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        lines = [f"ROUTERTYPE={exp.routertype}"]
        if exp.routertype in STATIC_ROUTERTYPES:
            for r in snap.routes.get(node.node_id, ()):
                lines.append(kv_line("ROUTE", *self._route(r), ("SRC", r["src"])))
        return join_lines(lines)

    def r_routelist(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        lines = [f"ROUTERTYPE={exp.routertype}"]
        if exp.routertype in STATIC_ROUTERTYPES:
            for nid in snap.experiment_nodes.get((exp.pid, exp.eid), ()):
                n = snap.nodes.get(nid)
                if n is None or n.allocation is None:
                    continue
                for r in snap.routes.get(nid, ()):
                    lines.append(kv_line("ROUTE", ("NODE", n.allocation.vname), ("SRC", r["src"]),
                                         *self._route(r)))
        return join_lines(lines)

    def r_trafgens(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        return join_lines([kv_line(
            ("TRAFGEN", t["name"]), ("MYNAME", t["myname"]), ("MYPORT", t["myport"]),
            ("PEERNAME", t["peername"]), ("PEERPORT", t["peerport"]), ("PROTO", t["proto"]),
            ("ROLE", t["role"]), ("GENERATOR", t["generator"]))
            for t in snap.trafgens.get(node.node_id, ())])

    def r_nseconfigs(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        text = exp.nseconfig
        return text if not text or text.endswith("\n") else text + "\n"

    def _files(self, items: list[tuple[str, ...]], kind: str) -> str:
        server = f"{self.s.server_address}:{self.s.http_port}"
        hook = self.s.sha_hook()
        lines = []
        for item in items:
            path = item[-1]
            fields: list[tuple[str, object]] = [("SERVER", server)]
            if kind == "TARBALL":
                fields.append(("DIR", item[0]))
            fields += [(kind, path), ("USEWEB", 1)]
            sha = None
            if hook is not None:
                try:
                    sha = hook(path)
                except Exception:  # noqa: BLE001 - a broken hook must not break replies
                    sha = None
            if sha:
                fields.append(("SHA256", sha))
            lines.append(kv_line(*fields))
        return join_lines(lines)

    @staticmethod
    def _mine(vname: str, node: Node) -> bool:
        # '' applies to every node of the experiment, otherwise only to that vname.
        return vname == "" or (node.allocation is not None and vname == node.allocation.vname)

    def r_rpms(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        items = [(path,) for vname, path in snap.rpms.get((exp.pid, exp.eid), ())
                 if self._mine(vname, node)]
        return self._files(items, "RPM")

    def r_tarballs(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        items = [(d, path) for vname, d, path in snap.tarballs.get((exp.pid, exp.eid), ())
                 if self._mine(vname, node)]
        return self._files(items, "TARBALL")

    def r_startupcmd(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        a = node.allocation
        cmd = (a.startupcmd if a and a.startupcmd else "") or exp.startupcmd
        if not cmd:
            return ""
        return kv_line(("CMD", sq(cmd)), ("UID", exp.swapper)) + "\n"

    def r_delay(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        lines = []
        for d in snap.link_delays.get(node.node_id, ()):
            lines.append(kv_line(
                "DELAY", ("INT0", _mac(d["int0"])), ("INT1", _mac(d["int1"])),
                ("PIPE0", d["pipe0"]), ("DELAY0", _num(d["delay0"])), ("BW0", d["bw0"]),
                ("PLR0", _num(d["plr0"])), ("PIPE1", d["pipe1"]),
                ("DELAY1", _num(d["delay1"])), ("BW1", d["bw1"]), ("PLR1", _num(d["plr1"])),
                ("LINKNAME", d["linkname"])))
        return join_lines(lines)

    def r_ipodinfo(self, snap: Snapshot, node: Node, exp: Experiment | None) -> str:
        # Stable per node for this server's secret, so fullconfig hashes stay put.
        h = hmac.new(self.s.ipod_secret, node.node_id.encode(), hashlib.sha256).hexdigest()[:32]
        return kv_line(("HOST", self.s.server_address), ("MASK", "255.255.255.255"),
                       ("HASH", h)) + "\n"

    def r_vnodelist(self, snap: Snapshot, node: Node, exp: Experiment | None) -> str:
        lines = []
        for vid in snap.vnodes.get(node.node_id, ()):
            v = snap.nodes.get(vid)
            if v is not None:
                lines.append(kv_line(("VNODEID", vid), ("JAILED", int(v.jailed))))
        return join_lines(lines)

    def r_creator(self, snap: Snapshot, node: Node, exp: Experiment) -> str:
        return kv_line(("CREATOR", exp.creator), ("SWAPPER", exp.swapper)) + "\n"

"""What a node sees: every TMCD reply, rendered from a Snapshot only.

No database reads and no I/O: the server core asks `Views` for a node's
reply and gets bytes.  The formats are tmcd's at protocol 40, key for key and
in tmcd's order, with tmcd's quoting (values are written verbatim between
their quotes: Emulab's client scripts match these lines with anchored,
position-by-position patterns, and a value that was "escaped" would no
longer be the value).  docs/tmcd.md has the table of every command.

All sections a node can cache are rendered together once per (node, kind of
asker, snapshot generation) and kept, so a boot storm of N nodes costs N
renders whether the nodes send one fullconfig or 26 single requests.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import SCHEMA
from ..inventory.model import Experiment, Interface, Node, Snapshot
from ..ipod import ipod_hash
from .protocol import (
    ALLOCATED,
    BINARY,
    CACHEABLE,
    COMMAND_TABLE,
    FULLCONFIG_SECTIONS,
    SECRET,
    TCPONLY,
    VNODE_SECTIONS,
    join_lines,
    render_fullconfig,
)

# Routes are computed by the node from `topomap` for these router types (tmcd
# at protocol >= 19 hands out no ROUTE lines for them).
COMPUTED_ROUTES = frozenset({"static", "static-ddijk"})
# Experiments whose /users is shared over NFS do not get PUBKEY lines on local
# nodes (their keys are in the NFS home directories), unless the node asks
# `accounts pubkeys` (or `accounts windows`).
SHARED_HOMES_EXCEPT = frozenset({"none", "genidefault"})
SDPARAMS = "reg=300 agg=5 load=1 expt=5 ctl=1000"  # slothd's defaults, as tmcd has them
USERDIR = "/users"
NODE_UUID_NAMESPACE = uuid.UUID("6f0c8f5e-2b1e-4c38-9a55-3f3c1d0e7a10")

# watchdoginfo: seconds between the watchdog's rounds of each kind (0 = never).
# ISALIVE is the one for the asker's kind; the defaults are Emulab's site defaults.
WATCHDOG_KEYS = ("INTERVAL", "ISALIVE", "NTPDRIFT", "CVSUP", "RUSAGE", "HOSTKEYS",
                 "DHCPDCONF", "SETROOTPSWD")
WATCHDOG_DEFAULTS = {k.name[len("watchdog_"):].upper(): k.default
                     for k in SCHEMA["tmcd"][1] if k.name.startswith("watchdog_")}

BootDecider = Callable[[Snapshot, Node], Any]  # -> policy.BootDecision | None

# Stands for this server's address in cached renders when server.public_address is
# empty (Views._here puts the address a request arrived on in its place).  Control
# characters never reach a render: testbed files refuse them in one-line fields.
SERVER_MARK = "\x01server\x01"


@dataclass(frozen=True)
class ViewSettings:
    server_address: str = ""  # server.public_address; "": the address a request arrived on
    file_server: str = ""  # SERVER= of rpms/tarballs; "" = the server's address
    domain: str = ""
    ipod_secret: bytes = b""
    root_pubkey: str = ""
    watchdog: dict[str, int] = field(default_factory=dict)  # watchdoginfo's keys -> seconds
    bootwhat: BootDecider | None = None

    @classmethod
    def from_config(cls, cfg: Any, ipod_secret: bytes, bootwhat: BootDecider | None
                    ) -> ViewSettings:
        t = cfg.tmcd
        watchdog = {k: getattr(t, "watchdog_" + k.lower()) for k in WATCHDOG_DEFAULTS}
        return cls(server_address=cfg.server.public_address,
                   file_server=t.file_server or cfg.server.public_address,  # "": per request
                   domain=t.domain, ipod_secret=ipod_secret, root_pubkey=t.root_pubkey,
                   watchdog=watchdog, bootwhat=bootwhat)


@dataclass(frozen=True, slots=True)
class Ask:
    """Who is asking, as far as a reply depends on it."""

    node: Node  # the node the reply is about (a vnode when one was named)
    exp: Experiment | None
    vnode: bool = False      # node is a vnode
    as_vnode: bool = False   # ... asking for itself (PROXYFOR, its own address), not its host
    local: bool = True       # the request came from the trusted ranges
    args: str = ""
    server: str = ""         # the address the request arrived on (what replies name)

    @property
    def variant(self) -> tuple[str, bool, bool]:
        return (self.node.node_id, self.as_vnode, self.local)


@dataclass
class _Entry:
    sections: dict[str, bytes]
    full: dict[tuple[bool, bool], str] = field(default_factory=dict)
    # The reply bytes, per (udp, secrets, the address named): a fullconfig is asked once
    # per boot by thousands of nodes, so it is encoded once, not per request.
    full_bytes: dict[tuple[bool, bool, str], bytes] = field(default_factory=dict)
    digest: str | None = None


def _mac(mac: str) -> str:
    # Emulab keeps MACs as 12 hex digits; clients match MAC=(\w*).
    return mac.replace(":", "").lower()


def plain_number(x: float | int) -> str:
    """A number as MySQL prints it: never an exponent (clients match [\\d.]+)."""
    if isinstance(x, int) or float(x).is_integer():
        return str(int(x))
    return f"{x:.10f}".rstrip("0").rstrip(".")


def fixed(x: float, places: int) -> str:
    return f"{float(x):.{places}f}"


def _ports(node: Node) -> list[Interface]:
    """A node's experimental interfaces on a LAN, in port order (vport 0, 1, ...)."""
    return [i for i in node.interfaces if i.role == "expt" and i.ip and i.lan]


def node_uuid(node: Node) -> str:
    return node.uuid or str(uuid.uuid5(NODE_UUID_NAMESPACE, node.node_id))


class Views:
    def __init__(self, settings: ViewSettings | None = None):
        self.s = settings or ViewSettings()
        self._gen: int | None = None
        self._cache: dict[tuple[str, bool, bool], _Entry] = {}
        self._topo: dict[tuple[str, str], bytes] = {}
        # Sections that depend on the experiment only, not on the node: rendered once per
        # experiment and snapshot (accounts: every member of the project, for every node).
        self._per_exp: dict[tuple, str] = {}
        self._exp_hosts: dict[tuple[int, str, str], tuple[list[tuple], dict, dict]] = {}
        self.renders = 0  # per-node renders (for tests and metrics)

    # -- cache ---------------------------------------------------------------------

    def _entry(self, snap: Snapshot, a: Ask) -> _Entry:
        if snap.generation != self._gen:
            if self._gen is not None and snap.generation < self._gen:
                # A request still holding an older snapshot: answer it, don't cache.
                return self._build(snap, a)
            self._gen = snap.generation
            self._cache = {}
            self._topo = {}
            self._per_exp = {}
            self._exp_hosts = {}
        e = self._cache.get(a.variant)
        if e is None:
            e = self._cache[a.variant] = self._build(snap, a)
        return e

    def _build(self, snap: Snapshot, a: Ask) -> _Entry:
        self.renders += 1
        names = [*CACHEABLE, "hostnames"]
        return _Entry({n: self._render(n, snap, a) for n in names})

    def invalidate(self) -> None:
        self._gen = None
        self._cache = {}
        self._topo = {}
        self._per_exp = {}
        self._exp_hosts = {}

    # -- public --------------------------------------------------------------------

    def reply(self, snap: Snapshot, a: Ask, cmd: str) -> bytes:
        """The reply to one command (b'' is a valid, empty answer)."""
        if cmd == "status":
            return self.status(a.node).encode()
        if cmd == "bootwhat":
            return self.bootwhat(snap, a.node).encode()
        if not a.args:
            hit = self._entry(snap, a).sections.get(cmd)
            if hit is not None:
                return self._here(hit, a)
        return self._here(self._render(cmd, snap, a), a)

    def _here(self, data: Any, a: Ask) -> Any:
        """Cached renders name this server by SERVER_MARK (one render serves every
        address a node may ask on, and the digest does not change with it); a reply
        names the address it was asked on."""
        if isinstance(data, bytes):
            mark, here = SERVER_MARK.encode(), (a.server or "0.0.0.0").encode()
        else:
            mark, here = SERVER_MARK, a.server or "0.0.0.0"
        return data.replace(mark, here) if mark in data else data

    def fullconfig(self, snap: Snapshot, a: Ask, udp: bool = False,
                   secrets: bool = True) -> str:
        return self._here(self._fullconfig(snap, a, udp, secrets), a)

    def fullconfig_bytes(self, snap: Snapshot, a: Ask, udp: bool = False,
                         secrets: bool = True) -> bytes:
        """`fullconfig` as the reply's bytes."""
        full = self._entry(snap, a).full_bytes
        key = (udp, secrets, a.server)
        out = full.get(key)
        if out is None:
            out = full[key] = self.fullconfig(snap, a, udp, secrets).encode()
        return out

    def _fullconfig(self, snap: Snapshot, a: Ask, udp: bool = False,
                    secrets: bool = True) -> str:
        """tmcd's fullconfig: every section of the node's kind, in table order.

        Without `secrets` (a plain connection from off the trusted ranges) the
        secret sections are left out, markers and all, as tmcd does; over UDP
        the TCP-only and secret sections are there but empty."""
        e = self._entry(snap, a)
        key = (udp, secrets)
        text = e.full.get(key)
        if text is None:
            out: dict[str, str] = {}
            for name in VNODE_SECTIONS if a.vnode else FULLCONFIG_SECTIONS:
                c = COMMAND_TABLE[name]
                if c.has(SECRET) and not secrets:
                    continue
                out[name] = "" if udp and c.flags & (TCPONLY | SECRET) else \
                    e.sections[name].decode()
            text = e.full[key] = render_fullconfig(out)
        return text

    def digest(self, snap: Snapshot, node: Node) -> str:
        """Hash of the node's complete configuration: changes iff it does."""
        a = self.ask(snap, node)
        e = self._entry(snap, a)
        if e.digest is None:
            e.digest = hashlib.sha256(self._fullconfig(snap, a).encode()).hexdigest()
        return e.digest

    @staticmethod
    def ask(snap: Snapshot, node: Node, **kw: Any) -> Ask:
        return Ask(node, snap.experiment_of(node), vnode=node.phys_node_id is not None, **kw)

    def as_json(self, snap: Snapshot, node: Node, secrets: bool = True,
                server: str = "") -> dict[str, Any]:
        a = self.ask(snap, node, server=server)
        e = self._entry(snap, a)
        names = VNODE_SECTIONS if a.vnode else FULLCONFIG_SECTIONS
        secs = {k: self._here(e.sections[k].decode(), a).splitlines()
                for k in (*names, "hostnames")
                if secrets or not COMMAND_TABLE[k].has(SECRET)}
        al = node.allocation
        return {
            "node_id": node.node_id,
            "status": self.status(node).strip(),
            "allocation": {"pid": al.pid, "eid": al.eid, "vname": al.vname} if al else None,
            "generation": snap.generation,
            "digest": self.digest(snap, node),
            "sections": secs,
        }

    # -- renderers -----------------------------------------------------------------

    def _render(self, name: str, snap: Snapshot, a: Ask) -> bytes:
        c = COMMAND_TABLE.get(name)
        if c is not None and c.has(ALLOCATED) and a.exp is None:
            return b""
        fn = getattr(self, "r_" + name, None)
        if fn is None:
            return b""  # a command tmcd answers with nothing when it has no data
        out = fn(snap, a)
        if c is not None and c.has(BINARY):
            return out
        return out.encode()

    @staticmethod
    def status(node: Node) -> str:
        al = node.allocation
        if al is None:
            return "FREE\n"
        return f"ALLOCATED={al.pid}/{al.eid} NICKNAME={al.vname}\n"

    def bootwhat(self, snap: Snapshot, node: Node) -> str:
        d = self.s.bootwhat(snap, node) if self.s.bootwhat else None
        if d is None:
            return "STATUS=failed\n"
        from ..policy import BootType

        line = f"STATUS=success TYPE={int(d.type)} FLAGS={1 if d.cmdline else 0}"
        if d.type == BootType.PART:
            line += f" WHAT={d.partition}"
        elif d.type == BootType.SYSID:
            line += f" WHAT={d.sysid}"
        elif d.type == BootType.MFS:
            line += f" WHAT={d.server}:{d.path}" if d.server else f" WHAT={d.path}"
        if d.cmdline:
            line += f" CMDLINE='{d.cmdline}'"
        return line + "\n"

    def r_nodeid(self, snap: Snapshot, a: Ask) -> str:
        return a.node.node_id + "\n"

    def r_nodeuuid(self, snap: Snapshot, a: Ask) -> str:
        return node_uuid(a.node) + "\n"

    def r_ifconfig(self, snap: Snapshot, a: Ask) -> str:
        node, lines = a.node, []
        if a.vnode and not a.as_vnode:
            # The host asking for its vnode: the vnode's virtual interfaces.
            for k, i in enumerate(x for x in node.interfaces if x.role == "expt" and x.ip):
                lines.append(
                    f"INTERFACE IFACETYPE=veth INET={i.ip} MASK={i.mask} ID={k + 1} "
                    f"VMAC={_mac(i.mac)} PMAC=none RTABID=0 ENCAPSULATE=1 LAN={i.lan} VTAG=0")
            return join_lines(lines)
        shaped = {_mac(d[k]) for d in snap.link_delays.get(node.node_id, ())
                  for k in ("int0", "int1")}
        for i in node.interfaces:
            if i.role != "expt" or not i.ip:
                continue
            # A container sees a plain link: 100Mbps, full duplex, no routing table.
            speed, duplex, rtabid = ("100", "full", "") if a.as_vnode else (i.speed, i.duplex, 0)
            lines.append(
                f"INTERFACE IFACETYPE=any INET={i.ip} MASK={i.mask} MAC={_mac(i.mac)} "
                f"SPEED={speed}Mbps DUPLEX={duplex} IFACE= RTABID={rtabid} LAN={i.lan}")
        # Interfaces a delay node shapes carry no address; they are listed too.
        for i in node.interfaces:
            if i.role == "expt" and not i.ip and _mac(i.mac) in shaped:
                lines.append(f"INTERFACE IFACETYPE=any INET= MASK= MAC={_mac(i.mac)} "
                             f"SPEED={i.speed}Mbps DUPLEX={i.duplex} IFACE= RTABID= LAN=")
        return join_lines(lines)

    def r_accounts(self, snap: Snapshot, a: Ask) -> str:
        exp = a.exp
        assert exp is not None
        keys = (not a.local or exp.nfsmounts in SHARED_HOMES_EXCEPT
                or a.args.startswith(("pubkeys", "windows")))
        memo = ("accounts", exp.pid, exp.eid, a.local, keys)
        if snap.generation != self._gen:  # not this cache's snapshot: no memo
            return self._accounts(snap, exp, a.local, keys)
        text = self._per_exp.get(memo)
        if text is None:
            text = self._per_exp[memo] = self._accounts(snap, exp, a.local, keys)
        return text

    @staticmethod
    def _accounts(snap: Snapshot, exp: Any, local: bool, keys: bool) -> str:
        pid = exp.pid

        def in_project(g: str) -> bool:
            return g in snap.groups and snap.group_projects.get(g, g) == pid

        groups = sorted((gid, name) for name, gid in snap.groups.items() if in_project(name))
        if not groups:
            return ""  # tmcd: a project without groups gets nothing at all
        lines = [f"ADDGROUP NAME={name} GID={gid}" for gid, name in groups]
        main = exp.gid or pid
        for login, root in sorted(exp.members):
            u = snap.users.get(login)
            if u is None:
                continue
            mine = [g for g in u.groups if in_project(g)]
            aux = sorted(snap.groups[g] for g in mine if g != main)
            if main in mine:
                gid = snap.groups[main]
            elif aux:
                gid = aux.pop()
            else:
                gid = u.gid
            pswd = u.password_hash if local else "*"
            lines.append(
                f'ADDUSER LOGIN={u.login} PSWD={pswd} UID={u.uid} GID={gid} ROOT={int(root)} '
                f'NAME="{u.name}" HOMEDIR={USERDIR}/{u.login} '
                f'GLIST="{",".join(map(str, aux))}" SERIAL={u.serial} EMAIL="{u.email}" '
                f'SHELL={os.path.basename(u.shell)}')
            if keys:
                lines += [f'PUBKEY LOGIN={u.login} KEY="{k}"' for k in u.keys]
        return join_lines(lines)

    def r_delay(self, snap: Snapshot, a: Ask) -> str:
        lines = []
        for d in snap.link_delays.get(a.node.node_id, ()):
            line = (f"DELAY INT0={_mac(d['int0'])} INT1={_mac(d['int1'])} "
                    f"PIPE0={d['pipe0']} DELAY0={fixed(d['delay0'], 2)} BW0={d['bw0']} "
                    f"PLR0={fixed(d['plr0'], 8)} "
                    f"PIPE1={d['pipe1']} DELAY1={fixed(d['delay1'], 2)} BW1={d['bw1']} "
                    f"PLR1={fixed(d['plr1'], 8)} "
                    f"LINKNAME={d['linkname']} RED0={d.get('red0', 0)} RED1={d.get('red1', 0)}")
            for k in (0, 1):
                q = {n: d.get(f"{n}{k}", 0) for n in (
                    "limit", "maxthresh", "minthresh", "weight", "linterm", "qinbytes",
                    "bytes", "meanpsize", "wait", "setbit", "droptail", "gentle")}
                q["weight"] = plain_number(q["weight"])
                line += "".join(f" {n.upper()}{k}={v}" for n, v in q.items())
            line += (f" VNODE0={d.get('vnode0') or 'foo'} VNODE1={d.get('vnode1') or 'bar'}"
                     f" NOSHAPING={d.get('noshaping', 0)}"
                     f" BACKFILL0={d.get('backfill0', 0)} BACKFILL1={d.get('backfill1', 0)}")
            lines.append(line)
        return join_lines(lines)

    def _experiment_hosts(self, snap: Snapshot, exp: Any) -> tuple[list[tuple], dict, dict]:
        """The experiment's host lines as tmcd lists them, by LAN and by node: built once
        per experiment and snapshot, not once per asker (a 4,000-node swap-in made every
        node's render walk every other node's interfaces)."""
        key = (snap.generation, exp.pid, exp.eid)  # an older snapshot's asker: its own
        got = self._exp_hosts.get(key)
        if got is not None:
            return got
        hosts = []  # (vname, lan, vport, ip, node_id)
        for nid in snap.experiment_nodes.get((exp.pid, exp.eid), ()):
            n = snap.nodes.get(nid)
            if n is None or n.allocation is None:
                continue
            for port, i in enumerate(_ports(n)):
                hosts.append((n.allocation.vname, i.lan, port, i.ip, nid))
        # tmcd reads them ordered by vname, LAN and prepends each: the reverse.
        hosts.sort(key=lambda h: (h[0].lower(), h[1].lower()), reverse=True)
        members: dict[str, list[tuple]] = {}
        by_node: dict[str, list[tuple]] = {}
        for h in hosts:
            members.setdefault(h[1], []).append(h)
            by_node.setdefault(h[4], []).append(h)
        got = self._exp_hosts[key] = (hosts, members, by_node)
        return got

    def r_hostnames(self, snap: Snapshot, a: Ask) -> str:
        """tmcd's host table: one line per node and LAN, with its short aliases.

        The first link to each node directly connected to the asker, the
        asker's own first link, and one link of every other node get the bare
        vname as an alias (tmcd's rule, kept to the letter)."""
        exp = a.exp
        assert exp is not None
        hosts, members, by_node = self._experiment_hosts(snap, exp)
        me = a.node.node_id
        my_vname = a.node.allocation.vname if a.node.allocation else ""
        first_lan: dict[str, str] = {}  # vname -> its first LAN shared with the asker
        for h in by_node.get(me, ()):
            for t in members[h[1]]:
                if t[4] != me:
                    first_lan.setdefault(t[0], h[1])
        has_alias: set[str] = set()
        lines = []
        for vname, lan, port, ip, nid in hosts:
            alias = " "
            fl = first_lan.get(vname)
            if fl == lan or (nid == me and port == 0):
                alias = vname
            elif fl is None and vname not in has_alias and vname != my_vname:
                alias = vname
                has_alias.add(vname)
            lines.append(f"NAME={vname}-{lan} IP={ip} ALIASES='{vname}-{port} {alias}'")
        return join_lines(lines)

    def _files(self, items: list[tuple[str, ...]], kind: str, a: Ask) -> str:
        # USEWEB=1: bootherd's files are on its HTTP server (the spewrpmtar path in
        # tmcd/useweb.py), not on an NFS export the node could copy from.
        lines = []
        for item in items:
            d = f"DIR={item[0]} " if kind == "TARBALL" else ""
            lines.append(f"SERVER={self.s.file_server or self._address(a)} USEWEB=1 "
                         f"{d}{kind}={item[-1]}")
        return join_lines(lines)

    def _address(self, a: Ask) -> str:
        """This server as the reply names it: server.public_address, else the address
        the request arrived on."""
        return self.s.server_address or SERVER_MARK

    @staticmethod
    def _mine(vname: str, node: Node) -> bool:
        # '' applies to every node of the experiment, otherwise only to that vname.
        return vname == "" or (node.allocation is not None and vname == node.allocation.vname)

    def r_rpms(self, snap: Snapshot, a: Ask) -> str:
        exp = a.exp
        assert exp is not None
        return self._files([(p,) for v, p in snap.rpms.get((exp.pid, exp.eid), ())
                               if self._mine(v, a.node)], "RPM", a)

    def r_tarballs(self, snap: Snapshot, a: Ask) -> str:
        exp = a.exp
        assert exp is not None
        return self._files([(d, p) for v, d, p in snap.tarballs.get((exp.pid, exp.eid), ())
                               if self._mine(v, a.node)], "TARBALL", a)

    def r_startupcmd(self, snap: Snapshot, a: Ask) -> str:
        exp, al = a.exp, a.node.allocation
        assert exp is not None
        cmd = (al.startupcmd if al and al.startupcmd else "") or exp.startupcmd
        # Verbatim between single quotes: runstartup matches ^CMD='(.*)' UID=(.*)$.
        return f"CMD='{cmd}' UID={exp.swapper}\n" if cmd else ""

    def r_mounts(self, snap: Snapshot, a: Ask) -> str:
        exp = a.exp
        assert exp is not None
        rows = snap.mounts.get((exp.pid, exp.eid), ())
        if not a.local:
            return ""  # tmcd: nodes off the control network get no NFS mounts
        if exp.nfsmounts == "none":
            # Nothing shared: the node makes the directories locally.
            return join_lines(["FSTYPE=LOCAL", *(f"LOCAL={r[2]}" for r in rows)])
        if not rows:
            return ""
        lines = [f"FSTYPE={rows[0][0]}"]
        for fs, remote, local in rows:
            lines.append(f"REMOTE={remote} LOCAL={local}" if remote and fs != "LOCAL"
                         else f"LOCAL={local}")
        return join_lines(lines)

    @staticmethod
    def _route_dest(r: dict) -> str:
        # tmcd masks a net route's destination (Linux's route refuses host bits).
        if r["desttype"] == "net":
            try:
                return str(ipaddress.IPv4Network(f"{r['dest']}/{r['destmask']}",
                                                 strict=False).network_address)
            except ValueError:
                pass
        return r["dest"]

    def r_routing(self, snap: Snapshot, a: Ask) -> str:
        exp = a.exp
        assert exp is not None
        lines = [f"ROUTERTYPE={exp.routertype}"]
        if exp.routertype not in COMPUTED_ROUTES:
            for r in snap.routes.get(a.node.node_id, ()):
                lines.append(f"ROUTE DEST={self._route_dest(r)} DESTTYPE={r['desttype']} "
                             f"DESTMASK={r['destmask']} NEXTHOP={r['nexthop']} "
                             f"COST={r['cost']} SRC={r['src']}")
        return join_lines(lines)

    def r_routelist(self, snap: Snapshot, a: Ask) -> str:
        exp = a.exp
        assert exp is not None
        vname = a.node.allocation.vname if a.node.allocation else a.node.node_id
        lines = [f"ROUTERTYPE={exp.routertype}"]
        for r in snap.routes.get(a.node.node_id, ()):
            lines.append(f"ROUTE NODE={vname} SRC={r['src']} DEST={self._route_dest(r)} "
                         f"DESTTYPE={r['desttype']} DESTMASK={r['destmask']} "
                         f"NEXTHOP={r['nexthop']} COST={r['cost']}")
        return join_lines(lines)

    def r_trafgens(self, snap: Snapshot, a: Ask) -> str:
        return join_lines([
            f"TRAFGEN={t['name']} MYNAME={t['myname']} MYPORT={t['myport']} "
            f"PEERNAME={t['peername']} PEERPORT={t['peerport']} PROTO={t['proto']} "
            f"ROLE={t['role']} GENERATOR={t['generator']}"
            for t in snap.trafgens.get(a.node.node_id, ())])

    def r_nseconfigs(self, snap: Snapshot, a: Ask) -> str:
        text = a.exp.nseconfig if a.exp else ""
        # Raw text; a final newline keeps fullconfig's end marker on its own line.
        return text if not text or text.endswith("\n") else text + "\n"

    def r_creator(self, snap: Snapshot, a: Ask) -> str:
        exp = a.exp
        assert exp is not None
        return f"CREATOR={exp.creator} SWAPPER={exp.swapper}\n"

    def r_tunnels(self, snap: Snapshot, a: Ask) -> str:
        if a.as_vnode:
            return ""  # a container sees its tunnels as plain interfaces
        return join_lines([f"TUNNEL={t['lan']} MEMBER={t['member']} KEY='{t['key']}' "
                           f"VALUE='{t['value']}'"
                           for t in snap.tunnels.get(a.node.node_id, ())])

    def r_vnodelist(self, snap: Snapshot, a: Ask) -> str:
        lines = []
        for vid in snap.vnodes.get(a.node.node_id, ()):
            v = snap.nodes.get(vid)
            if v is not None and v.allocation is not None:  # reserved vnodes only
                lines.append(f"VNODEID={vid} JAILED={int(v.jailed)}")
        return join_lines(lines)

    def r_ipodinfo(self, snap: Snapshot, a: Ask) -> str:
        # Stable per node for this server's secret, so fullconfig hashes stay put;
        # the recovery ladder sends this hash (bootherd.ipod).
        h = ipod_hash(self.s.ipod_secret, a.node.node_id)
        return f"HOST={self._address(a)} MASK=255.255.255.255 HASH={h}\n"

    def r_ntpinfo(self, snap: Snapshot, a: Ask) -> str:
        lines = [f"{'PEER' if kind == 'peer' else 'SERVER'}={host}"
                 for host, kind in snap.ntp_servers]
        lines.append(f"DRIFT={plain_number(float(a.node.ntp_drift))}")
        return join_lines(lines)

    def r_sdparams(self, snap: Snapshot, a: Ask) -> str:
        return SDPARAMS + "\n"

    def r_syncserver(self, snap: Snapshot, a: Ask) -> str:
        exp = a.exp
        if exp is None or not exp.syncserver:
            return ""
        host = ".".join(x for x in (exp.syncserver, exp.eid, exp.pid, self.s.domain) if x)
        mine = a.node.allocation is not None and a.node.allocation.vname == exp.syncserver
        return f"SYNCSERVER SERVER='{host}' ISSERVER={int(mine)}\n"

    def r_keyhash(self, snap: Snapshot, a: Ask) -> str:
        return f"KEYHASH HASH='{a.exp.keyhash}'\n" if a.exp and a.exp.keyhash else ""

    def r_eventkey(self, snap: Snapshot, a: Ask) -> str:
        return f"EVENTKEY KEY='{a.exp.eventkey}'\n" if a.exp and a.exp.eventkey else ""

    def r_role(self, snap: Snapshot, a: Ask) -> str:
        al = a.node.allocation
        return f"{al.erole}\n" if al else ""

    def r_watchdoginfo(self, snap: Snapshot, a: Ask) -> str:
        w = WATCHDOG_DEFAULTS | self.s.watchdog
        v = dict(w)
        v["ISALIVE"] = w["ISALIVE_VNODE" if a.vnode else "ISALIVE_LOCAL"] if a.local \
            else w["ISALIVE_REMOTE"]
        # tmcd's local policy: vnodes report no drift, updates or host keys;
        # nodes off the control network record no drift; local ones never cvsup.
        if a.local and a.vnode:
            v["NTPDRIFT"] = v["CVSUP"] = v["HOSTKEYS"] = 0
        if a.local:
            v["CVSUP"] = 0
        else:
            v["NTPDRIFT"] = 0
        return " ".join(f"{k}={v[k]}" for k in WATCHDOG_KEYS) + "\n"

    def r_firewallinfo(self, snap: Snapshot, a: Ask) -> str:
        return "TYPE=none\n"

    def r_localization(self, snap: Snapshot, a: Ask) -> str:
        return f"ROOTPUBKEY='{self.s.root_pubkey}'\n" if self.s.root_pubkey else ""

    def r_topomap(self, snap: Snapshot, a: Ask) -> bytes:
        """The experiment's topology, gzipped: `static` routing computes from it."""
        exp = a.exp
        assert exp is not None
        key = (exp.pid, exp.eid)
        if snap.generation == self._gen and key in self._topo:
            return self._topo[key]
        nodes, lans = [], {}
        for nid in snap.experiment_nodes.get((exp.pid, exp.eid), ()):
            n = snap.nodes.get(nid)
            if n is None or n.allocation is None:
                continue
            links = []
            for i in _ports(n):
                links.append(f"{i.lan}:{i.ip}")
                lans.setdefault(i.lan, i.mask)
            nodes.append(f"{n.allocation.vname},{' '.join(links)}")
        text = ("# nodes: vname,links\n" + "".join(x + "\n" for x in sorted(nodes))
                + "# lans: vname,mask,cost\n"
                + "".join(f"{lan},{mask},1\n" for lan, mask in sorted(lans.items())))
        data = gzip.compress(text.encode(), mtime=0)
        if snap.generation == self._gen:
            self._topo[key] = data
        return data

    def r_tmcctest(self, snap: Snapshot, a: Ask) -> str:
        return "" if a.args.startswith("noreply") else "tmcctest disabled\n"

    def r_arpinfo(self, snap: Snapshot, a: Ask) -> str:
        return "ARPTYPE=none\n"

    def r_serviceinfo(self, snap: Snapshot, a: Ask) -> str:
        b = self._address(a)
        return f"TFTP={b} DHCP={b} FRISBEE={b} PUBSUB={b}\n"

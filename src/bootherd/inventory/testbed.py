"""Testbed description files: generate, import (one transaction) and export.

A testbed file is TOML holding every configuration table of the inventory.
Export writes every field, in a fixed order, so import followed by export
gives back the same file.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import random
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from sqlalchemy import Engine, Integer, delete, insert, select

from ..config import DISK_IMAGE_NAME, did_you_mean
from ..firmware import COLUMN_SLOTS, MAP_SLOTS
from . import schema as s
from .model import natural_key, norm_mac


class TestbedError(ValueError):
    """A bad testbed description; the message names the offending entry."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class Field:
    name: str
    default: Any
    kind: str = ""  # "", "ip", "ip6", "mask", "mac", "ref:<table>", "loaders"


# Every field of every entry, in export order, with its default.
NODE_TYPE_FIELDS = [Field("name", ""), Field("class", "pc"), Field("description", ""),
                    Field("loader_bios", ""), Field("loader_uefi", ""),
                    Field("loader_http", ""), Field("loader_ipxe", ""),
                    Field("loaders", {}, "loaders")]
OS_FIELDS = [Field("name", ""), Field("kind", "part"), Field("partition", -1),
             Field("sysid", -1), Field("path", ""), Field("initrd", ""),
             Field("cmdline", ""), Field("description", ""), Field("disk_image", "")]
NTP_FIELDS = [Field("host", ""), Field("kind", "server")]
GROUP_FIELDS = [Field("name", ""), Field("gid", 0), Field("project", "")]
USER_FIELDS = [Field("login", ""), Field("uid", 0), Field("gid", 0), Field("name", ""),
               Field("email", ""), Field("shell", "/bin/sh"), Field("password_hash", "*"),
               Field("serial", 1), Field("groups", []), Field("keys", [])]
NODE_FIELDS = [Field("node_id", ""), Field("type", ""), Field("role", "testnode"),
               Field("phys_node_id", ""), Field("jailed", False),
               Field("default_os", ""), Field("temp_os", ""), Field("next_os", ""),
               Field("loader_bios", ""), Field("loader_uefi", ""), Field("loader_http", ""),
               Field("loader_ipxe", ""), Field("pxe_loader", ""), Field("boot_cmdline", ""),
               Field("bios_disk", -1), Field("privkey", ""), Field("ntp_drift", 0.0),
               Field("uuid", ""), Field("loaders", {}, "loaders")]
IFACE_FIELDS = [Field("mac", "", "mac"), Field("ip", "", "ip"), Field("mask", "", "mask"),
                Field("role", "expt"), Field("iface", ""), Field("speed", 1000),
                Field("duplex", "full"), Field("lan", ""), Field("ip6", "", "ip6")]
ROUTE_FIELDS = [Field("dest", "", "ip"), Field("desttype", "net"),
                Field("destmask", "255.255.255.0", "mask"), Field("nexthop", "", "ip"),
                Field("cost", 1), Field("src", "")]
TUNNEL_FIELDS = [Field("lan", ""), Field("member", ""), Field("key", ""), Field("value", "")]
TRAFGEN_FIELDS = [Field("name", ""), Field("myname", ""), Field("myport", 0),
                  Field("peername", ""), Field("peerport", 0), Field("proto", "udp"),
                  Field("role", "source"), Field("generator", "TG")]
DELAY_FIELDS = [Field("linkname", ""), Field("int0", "", "mac"), Field("int1", "", "mac"),
                Field("pipe0", 0), Field("delay0", 0.0), Field("bw0", 100000),
                Field("plr0", 0.0), Field("pipe1", 0), Field("delay1", 0.0),
                Field("bw1", 100000), Field("plr1", 0.0),
                *(Field(f"{name}{d}", 0.0 if name == "weight" else 0)
                  for d in (0, 1) for name in (*s.DELAY_QUEUE_INT, "weight")),
                Field("vnode0", ""), Field("vnode1", ""), Field("noshaping", 0)]
EXP_FIELDS = [Field("pid", ""), Field("eid", ""), Field("creator", ""), Field("swapper", ""),
              Field("routertype", "none"), Field("nseconfig", ""), Field("startupcmd", ""),
              Field("gid", ""), Field("keyhash", ""), Field("eventkey", ""),
              Field("syncserver", ""), Field("nfsmounts", "emulabdefault")]
NFSMOUNTS = ("emulabdefault", "genidefault", "none")
MEMBER_FIELDS = [Field("login", ""), Field("root", False)]
ALLOC_FIELDS = [Field("node_id", ""), Field("vname", ""), Field("startupcmd", ""),
                Field("erole", "node")]
MOUNT_FIELDS = [Field("fstype", "NFS"), Field("remote", ""), Field("local", "")]
TARBALL_FIELDS = [Field("vname", ""), Field("dir", ""), Field("path", "")]
RPM_FIELDS = [Field("vname", ""), Field("path", "")]

# A node's out-of-band power and console ([nodes.power]); `password` is a reference
# (see resolve_password), and export never writes the password itself.
POWER_FIELDS = [Field("driver", ""), Field("address", ""), Field("port", 0), Field("user", ""),
                Field("password", ""), Field("system", ""), Field("console", "")]
POWER_DRIVERS = ("ipmi", "ipmitool", "redfish", "wol", "manual")

NODE_CHILDREN = {"interfaces": IFACE_FIELDS, "routes": ROUTE_FIELDS, "tunnels": TUNNEL_FIELDS,
                 "trafgens": TRAFGEN_FIELDS, "link_delays": DELAY_FIELDS}
EXP_CHILDREN = {"members": MEMBER_FIELDS, "nodes": ALLOC_FIELDS, "mounts": MOUNT_FIELDS,
                "tarballs": TARBALL_FIELDS, "rpms": RPM_FIELDS}
# The table each experiment child list is stored in (node children: the same name).
EXP_CHILD_TABLES = {"members": "experiment_members", "nodes": "allocations", "mounts": "mounts",
                    "tarballs": "tarballs", "rpms": "rpms"}
TOP = {"node_types": NODE_TYPE_FIELDS, "os_images": OS_FIELDS, "ntp_servers": NTP_FIELDS,
       "groups": GROUP_FIELDS, "users": USER_FIELDS, "nodes": NODE_FIELDS,
       "experiments": EXP_FIELDS}
# Free text that may span lines; every other string is one line of a TMCD reply.
MULTILINE = frozenset({"nseconfig", "description"})
# Columns stored as NULL in the database are written as these sentinels in files.
NULLABLE = {"partition": -1, "sysid": -1, "bios_disk": -1, "phys_node_id": "", "privkey": "",
            "default_os": "", "temp_os": "", "next_os": "", "gid": "", "ip": "", "ip6": ""}


# What each column holds: PostgreSQL refuses longer text, NUL characters and integers
# beyond 32 bits, SQLite would store them (and refuses NaN, which PostgreSQL stores);
# the parser refuses all of them, naming the entry, so both backends take the same files.
MAX_LENGTH = {(t.name, c.name): c.type.length for t in s.metadata.tables.values()
              for c in t.c if getattr(c.type, "length", None)}
INT32 = {(t.name, c.name) for t in s.metadata.tables.values() for c in t.c
         if type(c.type) is Integer}


def _normalize(where: str, entry: Any, fields: list[Field], table: str,
               children: dict[str, list[Field]] | None = None,
               tables: dict[str, tuple[str, list[Field]]] | None = None) -> dict[str, Any]:
    """Check and fill one entry; `tables` are optional sub-tables (name -> database
    table, fields), kept only when given."""
    if not isinstance(entry, dict):
        raise TestbedError(f"{where}: expected a table")
    known = {f.name for f in fields} | set(children or ()) | set(tables or ())
    for k in entry:
        if k not in known:
            raise TestbedError(f"{where}: unknown field {k!r}{did_you_mean(k, known)}")
    out: dict[str, Any] = {}
    for f in fields:
        v = entry.get(f.name, f.default)
        if isinstance(f.default, bool):
            ok = isinstance(v, bool)
        elif isinstance(f.default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v) if ok else v
        elif isinstance(f.default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(f.default, list):
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        elif isinstance(f.default, dict):
            ok = isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
        else:
            ok = isinstance(v, str)
        if not ok:
            raise TestbedError(f"{where}.{f.name}: expected {type(f.default).__name__}, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise TestbedError(f"{where}.{f.name}: expected a finite number, got {v!r}")
        text = v if isinstance(v, str) else "".join(v) if isinstance(v, list) else \
            "".join([*v, *v.values()]) if isinstance(v, dict) else ""
        if "\0" in text:
            raise TestbedError(f"{where}.{f.name}: contains a NUL character")
        if f.name not in MULTILINE and any(c < " " for x in (v if isinstance(v, list) else [v])
                                           if isinstance(x, str) for c in x):
            # Node configuration goes out one record per line: a newline inside a
            # value would forge another record.
            raise TestbedError(f"{where}.{f.name}: control characters (newline, tab, ...) "
                               f"are not allowed, got {v!r}")
        if f.kind in ("ip", "mask") and v:
            try:
                addr = int(ipaddress.IPv4Address(v))
            except ValueError:
                raise TestbedError(f"{where}.{f.name}: bad address {v!r}") from None
            host_bits = ~addr & 0xFFFFFFFF
            if f.kind == "mask" and host_bits & (host_bits + 1):
                raise TestbedError(f"{where}.{f.name}: {v} is not a netmask (its one bits "
                                   "must be contiguous, e.g. 255.255.0.0)")
        if f.kind == "ip6" and v:
            try:
                v = str(ipaddress.IPv6Address(v))
            except ValueError:
                raise TestbedError(f"{where}.{f.name}: bad IPv6 address {v!r}") from None
        if f.kind == "loaders":
            _check_loaders(f"{where}.{f.name}", v)
        if f.kind == "mac" and v:
            try:
                v = norm_mac(v)
            except ValueError:
                raise TestbedError(f"{where}.{f.name}: bad MAC address {v!r}") from None
        limit = MAX_LENGTH.get((table, f.name))
        if limit is not None and isinstance(v, str) and len(v) > limit:
            raise TestbedError(f"{where}.{f.name}: longer than {limit} characters")
        if (table, f.name) in INT32 and not -2**31 <= v < 2**31:
            raise TestbedError(f"{where}.{f.name}: {v} is out of range")
        out[f.name] = v
    for cname, cfields in (children or {}).items():
        items = entry.get(cname, [])
        if not isinstance(items, list):
            raise TestbedError(f"{where}.{cname}: expected a list")
        ctable = EXP_CHILD_TABLES.get(cname, cname) if table == "experiments" else cname
        out[cname] = [_normalize(f"{where}.{cname}[{i}]", c, cfields, ctable)
                      for i, c in enumerate(items)]
    for tname, (ttable, tfields) in (tables or {}).items():
        if tname in entry:
            out[tname] = _normalize(f"{where}.{tname}", entry[tname], tfields, ttable)
    return out


LOADER_PATH_MAX = 255  # as the loader_<slot> columns


def _check_loaders(where: str, loaders: dict[str, str]) -> None:
    for slot, path in loaders.items():
        if slot in COLUMN_SLOTS:
            raise TestbedError(f"{where}.{slot}: set it with loader_{slot}")
        if slot not in MAP_SLOTS:
            raise TestbedError(f"{where}.{slot}: unknown loader slot (slots: "
                               f"{', '.join(sorted(MAP_SLOTS))})")
        if not path:
            raise TestbedError(f"{where}.{slot}: must not be empty (leave the slot out)")
        if any(c < " " for c in path):
            raise TestbedError(f"{where}.{slot}: control characters are not allowed")
        if len(path) > LOADER_PATH_MAX:
            raise TestbedError(f"{where}.{slot}: longer than {LOADER_PATH_MAX} characters")


def loaders_to_db(loaders: dict[str, str]) -> str:
    """The `loaders` column's text for a slot -> path map ("" when empty)."""
    return json.dumps(dict(sorted(loaders.items())), separators=(",", ":")) if loaders else ""


def loaders_from_db(text: str | None) -> dict[str, str]:
    """The slot -> path map a `loaders` column holds; a value bootherd did not write
    (operator SQL) that is not such a map reads as empty rather than failing a load."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if k in MAP_SLOTS and isinstance(v, str) and v}


def _label(kind: str, i: int, e: Any, key: str) -> str:
    name = e.get(key) if isinstance(e, dict) else None
    return f"{kind}[{i}]" + (f" ({name})" if name else "")


def parse(text: str) -> dict[str, list[dict[str, Any]]]:
    """Parse and validate a testbed description; raise TestbedError naming the entry."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TestbedError(f"not valid TOML: {e}") from None
    return validate(doc)


def validate(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Check a testbed document (a file's, or the inventory's with one entry changed)
    by the rules of import: every entry filled in, every reference resolved."""
    data = normalize(doc)
    _check_references(data)
    _check_interfaces(doc.get("nodes", []), data["nodes"])
    return data


def normalize(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every entry of a document checked and filled in; references not checked."""
    for k in doc:
        if k not in TOP and k != "testbed":
            raise TestbedError(f"unknown section {k!r}{did_you_mean(k, TOP)}")
    keys = {"node_types": "name", "os_images": "name", "ntp_servers": "host", "groups": "name",
            "users": "login", "nodes": "node_id", "experiments": "eid"}
    data: dict[str, list[dict[str, Any]]] = {}
    for kind, fields in TOP.items():
        children = NODE_CHILDREN if kind == "nodes" else EXP_CHILDREN if kind == "experiments" \
            else None
        items = doc.get(kind, [])
        if not isinstance(items, list):
            raise TestbedError(f"{kind}: expected an array of tables")
        tables = {"power": ("node_power", POWER_FIELDS)} if kind == "nodes" else None
        data[kind] = [_normalize(_label(kind, i, e, keys[kind]), e, fields, kind, children, tables)
                      for i, e in enumerate(items)]
    return data


def _check_interfaces(raw_nodes: list[dict[str, Any]], nodes: list[dict[str, Any]]) -> None:
    """What DHCP and the nodes' ifconfig need of an interface: a mask with an address,
    an address that is a host of its network, and a control interface on every
    physical node that omits roles (role defaults to expt, and an expt-only node never
    gets a DHCP answer: say so rather than import a node that cannot boot)."""
    for i, (raw, n) in enumerate(zip(raw_nodes, nodes, strict=True)):
        where = f"nodes[{i}] ({n['node_id']})"
        for j, itf in enumerate(n["interfaces"]):
            w = f"{where}.interfaces[{j}]"
            if itf["ip"] and not itf["mask"]:
                raise TestbedError(f"{w}.mask: required with ip {itf['ip']} (DHCP and the "
                                   "node's interface configuration carry it)")
            if itf["ip"]:
                net = ipaddress.IPv4Network(f"{itf['ip']}/{itf['mask']}", strict=False)
                if net.prefixlen < 31 and itf["ip"] in (str(net.network_address),
                                                        str(net.broadcast_address)):
                    raise TestbedError(f"{w}.ip: {itf['ip']} is the network or broadcast "
                                       f"address of {net}")
        if n["phys_node_id"] or not n["interfaces"]:
            continue  # vnodes boot through their host; a node with no NIC is not booted
        if any(itf["role"] == "ctrl" for itf in n["interfaces"]):
            continue
        unset = [j for j, itf in enumerate(raw.get("interfaces", []))
                 if isinstance(itf, dict) and "role" not in itf]
        if unset:
            raise TestbedError(
                f"{where}.interfaces[{unset[0]}].role: not set, and {n['node_id']} has no "
                "control interface: it would never get a DHCP answer. Set role = \"ctrl\" "
                "on the interface it boots from (role = \"expt\" is the default)")


def _check_references(data: dict[str, list[dict[str, Any]]]) -> None:
    def unique(kind: str, key: str) -> set:
        seen: set = set()
        for i, e in enumerate(data[kind]):
            if not e[key]:
                raise TestbedError(f"{kind}[{i}].{key}: must not be empty")
            if e[key] in seen:
                raise TestbedError(f"{kind}[{i}] ({e[key]}): duplicate {key} {e[key]!r}")
            seen.add(e[key])
        return seen

    types = unique("node_types", "name")
    images = unique("os_images", "name")
    for i, o in enumerate(data["os_images"]):
        if o["disk_image"] and not DISK_IMAGE_NAME.fullmatch(o["disk_image"]):
            raise TestbedError(f"os_images[{i}] ({o['name']}).disk_image: not a disk image "
                               f"name: {o['disk_image']!r}")
    unique("ntp_servers", "host")
    groups = unique("groups", "name")
    gids: dict[int, str] = {}
    for i, g in enumerate(data["groups"]):
        if g["gid"] in gids:
            raise TestbedError(f"groups[{i}] ({g['name']}): duplicate gid {g['gid']}")
        gids[g["gid"]] = g["name"]
    for i, g in enumerate(data["groups"]):
        if g["project"] and g["project"] not in groups:
            raise TestbedError(f"groups[{i}] ({g['name']}).project: unknown project group "
                               f"{g['project']!r}")
    logins = unique("users", "login")
    uids: dict[int, str] = {}
    for i, u in enumerate(data["users"]):
        where = f"users[{i}] ({u['login']})"
        if u["uid"] in uids:
            raise TestbedError(f"{where}: duplicate uid {u['uid']} (also {uids[u['uid']]})")
        uids[u["uid"]] = u["login"]
        for j, g in enumerate(u["groups"]):
            if g not in groups:
                raise TestbedError(f"{where}.groups: unknown group {g!r}")
            if g in u["groups"][:j]:
                raise TestbedError(f"{where}.groups: duplicate group {g!r}")
    node_ids = unique("nodes", "node_id")
    macs: dict[str, str] = {}
    ips: dict[str, str] = {}
    ip6s: dict[str, str] = {}
    for i, n in enumerate(data["nodes"]):
        where = f"nodes[{i}] ({n['node_id']})"
        if n["type"] not in types:
            raise TestbedError(f"{where}.type: unknown type {n['type']!r}")
        for f in ("default_os", "temp_os", "next_os"):
            if n[f] and n[f] not in images:
                raise TestbedError(f"{where}.{f}: unknown OS image {n[f]!r}")
        if n["phys_node_id"] and n["phys_node_id"] not in node_ids:
            raise TestbedError(f"{where}.phys_node_id: unknown node {n['phys_node_id']!r}")
        if "power" in n:
            _check_power(f"{where}.power", n["power"])
        for j, itf in enumerate(n["interfaces"]):
            w = f"{where}.interfaces[{j}]"
            if not itf["mac"]:
                raise TestbedError(f"{w}.mac: must not be empty")
            if itf["mac"] in macs:
                raise TestbedError(f"{w}: duplicate MAC {itf['mac']} (also on {macs[itf['mac']]})")
            macs[itf["mac"]] = n["node_id"]
            if itf["role"] not in ("ctrl", "expt"):
                raise TestbedError(f"{w}.role: must be ctrl or expt, got {itf['role']!r}")
            if itf["ip"]:
                if itf["ip"] in ips:
                    raise TestbedError(f"{w}: duplicate IP {itf['ip']} (also on {ips[itf['ip']]})")
                ips[itf["ip"]] = n["node_id"]
            if itf["ip6"]:
                if itf["ip6"] in ip6s:
                    raise TestbedError(f"{w}: duplicate IPv6 address {itf['ip6']} "
                                       f"(also on {ip6s[itf['ip6']]})")
                ip6s[itf["ip6"]] = n["node_id"]
    exps: set = set()
    allocated: dict[str, str] = {}
    for i, e in enumerate(data["experiments"]):
        where = f"experiments[{i}] ({e['pid']}/{e['eid']})"
        if not e["pid"] or not e["eid"]:
            raise TestbedError(f"{where}: pid and eid must not be empty")
        if (e["pid"], e["eid"]) in exps:
            raise TestbedError(f"{where}: duplicate experiment")
        exps.add((e["pid"], e["eid"]))
        for f in ("creator", "swapper"):
            if e[f] not in logins:
                raise TestbedError(f"{where}.{f}: unknown user {e[f]!r}")
        if e["gid"] and e["gid"] not in groups:
            raise TestbedError(f"{where}.gid: unknown group {e['gid']!r}")
        members: set = set()
        if e["nfsmounts"] not in NFSMOUNTS:
            raise TestbedError(f"{where}.nfsmounts: must be one of {', '.join(NFSMOUNTS)}, "
                               f"got {e['nfsmounts']!r}")
        for f in ("keyhash", "eventkey"):
            if e[f] and not e[f].isalnum():
                raise TestbedError(f"{where}.{f}: letters and digits only, got {e[f]!r}")
        for j, m in enumerate(e["members"]):
            if m["login"] not in logins:
                raise TestbedError(f"{where}.members[{j}]: unknown user {m['login']!r}")
            if m["login"] in members:
                raise TestbedError(f"{where}.members[{j}]: duplicate member {m['login']!r}")
            members.add(m["login"])
        vnames: set = set()
        for j, a in enumerate(e["nodes"]):
            w = f"{where}.nodes[{j}]"
            if a["node_id"] not in node_ids:
                raise TestbedError(f"{w}: unknown node {a['node_id']!r}")
            if a["node_id"] in allocated:
                raise TestbedError(f"{w}: node {a['node_id']} already allocated to "
                                   f"{allocated[a['node_id']]}")
            if a["vname"] in vnames:
                raise TestbedError(f"{w}: duplicate vname {a['vname']!r}")
            vnames.add(a["vname"])
            allocated[a["node_id"]] = f"{e['pid']}/{e['eid']}"
            if not a["erole"] or not a["erole"].replace("-", "").replace("_", "").isalnum():
                raise TestbedError(f"{w}.erole: a word (node, virthost, delaynode, ...), "
                                   f"got {a['erole']!r}")
        if e["syncserver"] and e["syncserver"] not in vnames:
            raise TestbedError(f"{where}.syncserver: no node with vname {e['syncserver']!r}")


def _check_power(where: str, p: dict[str, Any]) -> None:
    if p["driver"] not in POWER_DRIVERS:
        raise TestbedError(f"{where}.driver: must be one of {', '.join(POWER_DRIVERS)}, "
                           f"got {p['driver']!r}")
    if not 0 <= p["port"] <= 65535:
        raise TestbedError(f"{where}.port: must be 0-65535, got {p['port']}")
    if p["driver"] in ("ipmi", "ipmitool", "redfish") and not p["address"]:
        raise TestbedError(f"{where}.address: the {p['driver']} driver needs the BMC's address")
    console = p["console"]
    if console == "sol":
        if p["driver"] not in ("ipmi", "ipmitool"):
            raise TestbedError(f"{where}.console: serial-over-LAN needs an IPMI driver, "
                               f"not {p['driver']!r}")
    elif console:
        kind, _, rest = console.partition(":")
        host, _, port = rest.rpartition(":")
        if kind != "tcp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TestbedError(f"{where}.console: expected \"\", \"sol\" or "
                               f"\"tcp:HOST:PORT\", got {console!r}")


class _Secrets:
    """Resolves password references during one import (files read once)."""

    def __init__(self, base_dir: Path, env: Mapping[str, str], stored: dict[str, str]):
        self.base_dir = base_dir
        self.env = env
        self.stored = stored
        self._files: dict[Path, dict[str, str]] = {}

    def resolve(self, where: str, node_id: str, ref: str) -> str:
        kind, sep, arg = ref.partition(":")
        if not sep or kind not in ("inventory", "env", "file", "secrets"):
            return ref  # a literal password (docs/power.md advises a reference)
        if kind == "inventory":
            if node_id not in self.stored:
                raise TestbedError(f"{where}.password: \"inventory:\" keeps the stored password, "
                                   f"but the inventory holds none for {node_id}")
            return self.stored[node_id]
        if kind == "env":
            if arg not in self.env:
                raise TestbedError(f"{where}.password: environment variable {arg!r} is not set")
            return self.env[arg]
        path = Path(arg) if Path(arg).is_absolute() else self.base_dir / arg
        if kind == "file":
            return self._read(where, path).strip()
        table = self._secrets(where, path)
        if node_id not in table:
            raise TestbedError(f"{where}.password: {path} has no password for {node_id}")
        return table[node_id]

    def _read(self, where: str, path: Path) -> str:
        try:
            st = path.stat()
            text = path.read_text()
        except OSError as e:
            raise TestbedError(f"{where}.password: cannot read {path}: {e.strerror}") from None
        if st.st_mode & 0o077:
            raise TestbedError(f"{where}.password: {path} is readable by others "
                               f"(mode {st.st_mode & 0o777:o}); chmod 600 it")
        return text

    def _secrets(self, where: str, path: Path) -> dict[str, str]:
        if path not in self._files:
            try:
                doc = tomllib.loads(self._read(where, path))
            except tomllib.TOMLDecodeError as e:
                raise TestbedError(f"{where}.password: {path} is not valid TOML: {e}") from None
            table = doc.get("passwords", {})
            if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
                raise TestbedError(f"{where}.password: {path}: expected a [passwords] table "
                                   "of node = \"password\"")
            self._files[path] = table
        return self._files[path]


def _to_db(row: dict[str, Any], fields: list[Field]) -> dict[str, Any]:
    out = {}
    for f in fields:
        v = row[f.name]
        if f.name in NULLABLE and v == NULLABLE[f.name]:
            v = None
        elif f.kind == "loaders":
            v = loaders_to_db(v)
        out[f.name] = v
    return out


def table_rows(data: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The rows a parsed testbed puts in each configuration table, in an order that
    satisfies the foreign keys.  Import writes exactly these; an in-memory snapshot is
    built from exactly these (inventory.memory)."""
    ufields = [f for f in USER_FIELDS if f.name not in ("groups", "keys")]
    rows: dict[str, list[dict[str, Any]]] = {
        "node_types": [_to_db(r, NODE_TYPE_FIELDS) for r in data["node_types"]],
        "os_images": [_to_db(r, OS_FIELDS) for r in data["os_images"]],
        "ntp_servers": [_to_db(r, NTP_FIELDS) for r in data["ntp_servers"]],
        "groups": [_to_db(r, GROUP_FIELDS) for r in data["groups"]],
        "users": [_to_db(r, ufields) for r in data["users"]],
        "user_groups": [{"login": u["login"], "group_name": g}
                        for u in data["users"] for g in u["groups"]],
        "ssh_keys": [{"login": u["login"], "key": k} for u in data["users"] for k in u["keys"]],
        # Physical hosts first, so vnodes' phys_node_id references resolve.
        "nodes": [_to_db(n, NODE_FIELDS)
                  for n in sorted(data["nodes"], key=lambda n: bool(n["phys_node_id"]))],
    }
    for cname, cfields in NODE_CHILDREN.items():
        rows[cname] = [{"node_id": n["node_id"], **_to_db(c, cfields)}
                       for n in data["nodes"] for c in n[cname]]
    rows["experiments"] = [_to_db(e, EXP_FIELDS) for e in data["experiments"]]
    for cname, cfields in EXP_CHILDREN.items():
        rows[EXP_CHILD_TABLES[cname]] = [{"pid": e["pid"], "eid": e["eid"], **_to_db(c, cfields)}
                                         for e in data["experiments"] for c in e[cname]]
    return rows


def import_testbed(engine: Engine, text: str, base_dir: Path | None = None,
                   env: Mapping[str, str] | None = None,
                   check: Callable[[Any, dict[str, list[dict[str, Any]]]], None] | None = None
                   ) -> dict[str, int]:
    """Replace the inventory's configuration with the file's, in one transaction.

    Runtime data (leases, states, events) is kept.  On any error nothing is
    written and TestbedError names the offending entry.  BMC password
    references (`file:`, `secrets:`) are taken relative to `base_dir`, `env:`
    from `env` (default: this process's environment).  `check(conn, data)` runs in the
    transaction before anything is written, with the passwords resolved (inventory.edit
    compares, refuses or audits there; an exception it raises writes nothing).
    """
    data = parse(text)
    with engine.begin() as conn:
        stored = {r.node_id: r.password for r in conn.execute(
            select(s.node_power.c.node_id, s.node_power.c.password))}
        secrets = _Secrets(base_dir or Path.cwd(), os.environ if env is None else env, stored)
        power = []
        for i, n in enumerate(data["nodes"]):
            if "power" in n:
                row = dict(n["power"])
                where = f"nodes[{i}] ({n['node_id']}).power"
                row["password"] = secrets.resolve(where, n["node_id"], row["password"])
                if len(row["password"]) > MAX_LENGTH[("node_power", "password")] \
                        or "\0" in row["password"]:
                    raise TestbedError(f"{where}.password: the password it names is longer "
                                       "than 255 characters or holds a NUL")
                power.append({"node_id": n["node_id"], **row})
                n["power"] = row
        if check is not None:
            check(conn, data)
        conn.execute(delete(s.node_power))
        for t in reversed(s.metadata.sorted_tables):
            if t.name in s.WATCHED_TABLES:
                conn.execute(delete(t))
        for name, rows in table_rows(data).items():
            if rows:
                conn.execute(insert(s.metadata.tables[name]), rows)
        if power:
            conn.execute(insert(s.node_power), power)
    return {k: len(v) for k, v in data.items()}


def _from_db(row: Any, fields: list[Field]) -> dict[str, Any]:
    out = {}
    for f in fields:
        v = row[f.name]
        if v is None:
            v = NULLABLE.get(f.name, f.default)
        if isinstance(f.default, bool):
            v = bool(v)
        elif isinstance(f.default, float):
            v = float(v)
        elif f.kind == "loaders":
            v = loaders_from_db(v)
        out[f.name] = v
    return out


def export_testbed(engine: Engine, secrets_ref: str = "") -> str:
    """The inventory's configuration as a testbed file (import's exact inverse).

    BMC passwords are never written: each says where it is kept, `inventory:`
    (the database; re-import keeps it) or, with `secrets_ref`, `secrets:REF`, the
    file that export_secrets() gives the contents of."""
    with engine.connect() as conn, conn.begin():
        return dump(load_doc(conn, secrets_ref))


def load_doc(conn: Any, secrets_ref: str = "", passwords: bool = False
             ) -> dict[str, list[dict[str, Any]]]:
    """The inventory's configuration as a testbed document, read on `conn`.  BMC
    passwords as references (see export_testbed), or with `passwords` as they are
    stored (for changes that write them back, never for output)."""
    def rows(table, *order):  # noqa: ANN001, ANN202
        q = select(table)
        if order:
            q = q.order_by(*order)
        return conn.execute(q).mappings().all()

    ugroups: dict[str, list[str]] = {}
    for r in rows(s.user_groups, s.user_groups.c.login, s.user_groups.c.group_name):
        ugroups.setdefault(r["login"], []).append(r["group_name"])
    ukeys: dict[str, list[str]] = {}
    for r in rows(s.ssh_keys, s.ssh_keys.c.id):
        ukeys.setdefault(r["login"], []).append(r["key"])
    ufields = [f for f in USER_FIELDS if f.name not in ("groups", "keys")]
    users = []
    for r in rows(s.users, s.users.c.uid):
        u = _from_db(r, ufields)
        u["groups"] = ugroups.get(r["login"], [])
        u["keys"] = ukeys.get(r["login"], [])
        users.append(u)
    children: dict[str, dict[str, list]] = {c: {} for c in NODE_CHILDREN}
    for cname, cfields in NODE_CHILDREN.items():
        t = s.metadata.tables[cname]
        for r in rows(t, *(() if cname == "interfaces" else (t.c.id,))):
            children[cname].setdefault(r["node_id"], []).append(_from_db(r, cfields))
    for ifs in children["interfaces"].values():
        ifs.sort(key=_iface_order)
    power = {r["node_id"]: r for r in rows(s.node_power)}
    nodes = []
    for r in rows(s.nodes):
        n = _from_db(r, NODE_FIELDS)
        for cname in NODE_CHILDREN:
            n[cname] = children[cname].get(r["node_id"], [])
        if r["node_id"] in power:
            p = _from_db(power[r["node_id"]], POWER_FIELDS)
            if p["password"] and not passwords:
                p["password"] = f"secrets:{secrets_ref}" if secrets_ref else "inventory:"
            n["power"] = p
        nodes.append(n)
    nodes.sort(key=lambda n: natural_key(n["node_id"]))
    order = {"members": "login", "nodes": "vname", "mounts": "id", "tarballs": "id",
             "rpms": "id"}
    echildren: dict[str, dict[tuple, list]] = {c: {} for c in EXP_CHILDREN}
    for cname, cfields in EXP_CHILDREN.items():
        t = s.metadata.tables[EXP_CHILD_TABLES[cname]]
        for r in rows(t, t.c[order[cname]]):
            echildren[cname].setdefault((r["pid"], r["eid"]), []).append(_from_db(r, cfields))
    exps = []
    for r in rows(s.experiments, s.experiments.c.pid, s.experiments.c.eid):
        e = _from_db(r, EXP_FIELDS)
        for cname in EXP_CHILDREN:
            e[cname] = echildren[cname].get((r["pid"], r["eid"]), [])
        exps.append(e)
    doc = {
        "node_types": [_from_db(r, NODE_TYPE_FIELDS) for r in rows(s.node_types, s.node_types.c.name)],
        "os_images": [_from_db(r, OS_FIELDS) for r in rows(s.os_images, s.os_images.c.name)],
        "ntp_servers": [_from_db(r, NTP_FIELDS) for r in rows(s.ntp_servers, s.ntp_servers.c.host)],
        "groups": [_from_db(r, GROUP_FIELDS) for r in rows(s.groups, s.groups.c.gid)],
        "users": users,
        "nodes": nodes,
        "experiments": exps,
    }
    return doc


def export_secrets(engine: Engine) -> dict[str, str]:
    """Node -> BMC password, for a secrets file beside an export (write_secrets)."""
    with engine.connect() as conn:
        return {r.node_id: r.password for r in conn.execute(
            select(s.node_power.c.node_id, s.node_power.c.password)
            .where(s.node_power.c.password != "")) if r.password}


def write_secrets(path: Path, passwords: Mapping[str, str]) -> None:
    """A secrets file (`[passwords]` node = "..."), created mode 0600 before any byte."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode under O_CREAT
        body = "# bootherd BMC passwords: keep this file mode 0600\n" + tomli_w.dumps(
            {"passwords": dict(sorted(passwords.items(), key=lambda kv: natural_key(kv[0])))})
        os.write(fd, body.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _iface_order(i: dict[str, Any]) -> tuple:
    return (i["role"] != "ctrl", i["iface"], i["mac"])


def dump(doc: dict[str, list[dict[str, Any]]]) -> str:
    """Write a testbed document in canonical form (sections in fixed order)."""
    ordered = {k: doc.get(k, []) for k in TOP}
    # An empty loaders map would be a table header of its own under every entry.
    for kind in ("node_types", "nodes"):
        ordered[kind] = [{k: v for k, v in e.items() if k != "loaders" or v}
                         for e in ordered[kind]]
    return "# bootherd testbed description\n" + tomli_w.dumps(ordered)


def canonical(text: str) -> str:
    """The canonical form of a testbed file: every field present, fixed order."""
    data = parse(text)
    for n in data["nodes"]:
        n["interfaces"].sort(key=_iface_order)
    data["node_types"].sort(key=lambda r: r["name"])
    data["os_images"].sort(key=lambda r: r["name"])
    data["ntp_servers"].sort(key=lambda r: r["host"])
    data["groups"].sort(key=lambda r: r["gid"])
    data["users"].sort(key=lambda r: r["uid"])
    for u in data["users"]:
        u["groups"].sort()
    data["nodes"].sort(key=lambda n: natural_key(n["node_id"]))
    data["experiments"].sort(key=lambda e: (e["pid"], e["eid"]))
    for e in data["experiments"]:
        e["members"].sort(key=lambda m: m["login"])
        e["nodes"].sort(key=lambda a: a["vname"])
    return dump(data)


# --- generation ----------------------------------------------------------------

def generate(nodes: int, subnet: str = "10.10.0.0/16", seed: int = 1,
             allocated_share: float = 0.6, server: str = "", bmc: str = "",
             bmc_subnet: str = "10.11.0.0/16", subnet6: str = "") -> str:
    """A realistic testbed: node types, images, users, and experiments using
    `allocated_share` of the nodes, with interfaces, routes, tarballs and RPMs.
    With `bmc` (a power driver), every node gets a BMC on `bmc_subnet` whose
    password is read from $BOOTHERD_BMC_PASSWORD at import.

    Control addresses come from `subnet`, skipping its first address (the boot server's
    or gateway's) and `server`.  With `subnet6` (an IPv6 prefix), every control
    interface also gets an IPv6 address there (the first is left to the server).  MFS
    paths name `server` when given ("ip:/path");
    without it they are bare paths, which mean "the server that answers" (replies
    then carry the address the request reached).  Experiment LANs and routes use
    networks of 10.200.0.0/13 and 10.248.0.0/13 that do not overlap `subnet`."""
    if bmc and bmc not in POWER_DRIVERS:
        raise ValueError(f"bmc: must be one of {', '.join(POWER_DRIVERS)}, got {bmc!r}")
    rng = random.Random(seed)
    try:
        net = ipaddress.IPv4Network(subnet)
    except ValueError as e:
        raise TestbedError(f"--subnet {subnet!r}: {e}") from None
    if server:
        try:
            ipaddress.IPv4Address(server)
        except ValueError:
            raise TestbedError(f"--server {server!r}: not an IPv4 address") from None
    bmc_hosts = ipaddress.IPv4Network(bmc_subnet).hosts()
    taken = {server} if server else set()
    hosts = (str(h) for h in net.hosts() if str(h) not in taken)
    if net.num_addresses > 2:
        next(hosts)  # the first address is the boot server's / gateway's
    try:
        net6 = ipaddress.IPv6Network(subnet6) if subnet6 else None
    except ValueError as e:
        raise TestbedError(f"--subnet6 {subnet6!r}: {e}") from None
    if net6 is not None and net6.num_addresses < nodes + 2:
        raise TestbedError(f"--subnet6 {subnet6}: too small for {nodes} nodes")
    mask = str(net.netmask)
    spare = (n for n in ipaddress.IPv4Network("10.200.0.0/13").subnets(new_prefix=24)
             if not n.overlaps(net))
    remote_net = next(n for n in (ipaddress.IPv4Network(f"10.{b}.0.0/16") for b in
                                  (250, 251, 252, 253, 248, 249)) if not n.overlaps(net))
    mfs_prefix = f"{server}:" if server else ""
    doc: dict[str, list[dict[str, Any]]] = {k: [] for k in TOP}
    doc["node_types"] = [
        {"name": "d430", "class": "pc", "description": "Dell R430, 2x Xeon E5-2630v3",
         "loader_bios": "undionly.kpxe", "loader_uefi": "snponly.efi",
         "loader_http": "ipxe.efi", "loader_ipxe": ""},
        {"name": "pc3000", "class": "pc", "description": "Dell 2850, 3 GHz Xeon",
         "loader_bios": "undionly.kpxe", "loader_uefi": "snponly.efi",
         "loader_http": "ipxe.efi", "loader_ipxe": ""},
    ]
    doc["os_images"] = [
        {"name": "UBUNTU22-64-STD", "kind": "part", "partition": 1, "sysid": 131,
         "cmdline": "", "description": "Ubuntu 22.04 standard image"},
        {"name": "FBSD13-64-STD", "kind": "part", "partition": 2, "sysid": 165,
         "cmdline": "", "description": "FreeBSD 13 standard image"},
        {"name": "FRISBEE-MFS", "kind": "mfs", "path": f"{mfs_prefix}/tftpboot/frisbee",
         "cmdline": "console=ttyS0", "description": "Frisbee disk loader MFS"},
        {"name": "NEWNODE-MFS", "kind": "mfs", "path": f"{mfs_prefix}/tftpboot/newnode",
         "description": "Enrollment MFS for new hardware"},
        {"name": "LINUX-NETBOOT", "kind": "kernel", "path": "kernels/vmlinuz",
         "initrd": "kernels/initrd.img", "cmdline": "console=ttyS0 quiet",
         "description": "Network-booted Linux kernel"},
    ]
    doc["ntp_servers"] = [{"host": "ntp1", "kind": "server"}, {"host": "ntp2", "kind": "peer"}]
    nexp = max(1, int(nodes * allocated_share) // 12) if nodes else 0
    groups, users = [], []
    uid = 10000
    for p in range(max(1, nexp // 2 + 1)):
        groups.append({"name": f"proj{p}", "gid": 6000 + p})
    for p, g in enumerate(groups):
        for k in range(3):
            login = f"user{p}x{k}"
            users.append({
                "login": login, "uid": uid, "gid": g["gid"], "name": f"User {p}-{k}",
                "email": f"{login}@example.org", "shell": rng.choice(["/bin/bash", "/bin/tcsh"]),
                "password_hash": "$6$" + "".join(rng.choice("abcdefghijklmnop") for _ in range(8))
                + "$" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(40)),
                "serial": 1, "groups": [g["name"]],
                "keys": [f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA{rng.getrandbits(128):032x} {login}@ops"],
            })
            uid += 1
    # Awkward but legal data, as real sites have it: quotes of both kinds in
    # names and key comments, subgroups, users in several projects' groups.
    # Drawn from a second generator so the values above stay what they were.
    awk = random.Random(seed * 7919 + 1)
    projects = list(groups)
    for p, g in enumerate(projects):
        sub = {"name": f"{g['name']}-ops", "gid": 16000 + p, "project": g["name"]}
        groups.append(sub)
        first, second, third = users[3 * p:3 * p + 3]
        first["groups"].append(sub["name"])
        second["name"] = f'Pat "Quotes" O\'Neil {p}'
        third["keys"].append(f"ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB{awk.getrandbits(96):024x} "
                             f'"{third["login"]}" it\'s-laptop')
        if p + 1 < len(projects):  # also a member of the next project
            third["groups"].append(f"proj{p + 1}")
    doc["groups"], doc["users"] = groups, users
    mac_base = 0x020000000000 + (seed << 24)
    all_nodes = []
    for i in range(1, nodes + 1):
        try:
            ctrl_ip = next(hosts)
        except StopIteration:
            raise TestbedError(f"--subnet {subnet}: too small for {nodes} nodes") from None
        ifs = [{"mac": _mac(mac_base + i * 8), "ip": ctrl_ip, "mask": mask, "role": "ctrl",
                "iface": "eth0", "speed": 1000, "duplex": "full", "lan": ""}]
        if net6 is not None:
            ifs[0]["ip6"] = str(net6[i + 1])
        for k in range(1, 4):
            ifs.append({"mac": _mac(mac_base + i * 8 + k), "ip": "", "mask": "", "role": "expt",
                        "iface": f"eth{k}", "speed": 10000, "duplex": "full", "lan": ""})
        node = {
            "node_id": f"pc{i}", "type": "d430" if i % 3 else "pc3000",
            "default_os": "UBUNTU22-64-STD", "pxe_loader": "", "boot_cmdline": "",
            "ntp_drift": round(rng.uniform(-20, 20), 3), "interfaces": ifs,
            "routes": [], "tunnels": [], "trafgens": [], "link_delays": [],
        }
        if bmc:
            remote = bmc in ("ipmi", "ipmitool", "redfish")
            node["power"] = {
                "driver": bmc, "address": str(next(bmc_hosts)) if remote else "",
                "user": "admin" if remote else "",
                "password": "env:BOOTHERD_BMC_PASSWORD" if remote else "",
                "console": "sol" if bmc in ("ipmi", "ipmitool") else ""}
        all_nodes.append(node)
    doc["nodes"] = all_nodes
    free = list(range(len(all_nodes)))
    rng.shuffle(free)
    for e in range(nexp):
        g = groups[e % len(groups)]
        members = [u for u in users if g["name"] in u["groups"]]
        size = min(len(free), rng.randint(4, 20))
        if size == 0:
            break
        pid, eid = g["name"], f"exp{e}"
        picked = [free.pop() for _ in range(size)]
        allocs, lan_members = [], []
        lan_net = next(spare)
        lan_hosts = lan_net.hosts()
        for k, idx in enumerate(picked):
            n = all_nodes[idx]
            allocs.append({"node_id": n["node_id"], "vname": f"node{k}", "startupcmd": ""})
            itf = n["interfaces"][1]
            itf["ip"], itf["mask"], itf["lan"] = str(next(lan_hosts)), "255.255.255.0", "lan0"
            lan_members.append((n, itf))
        for k, (n, itf) in enumerate(lan_members):
            if k % 4 == 0:
                n["routes"].append({"dest": str(remote_net.network_address),
                                    "desttype": "net", "destmask": str(remote_net.netmask),
                                    "nexthop": lan_members[0][1]["ip"], "cost": 1, "src": itf["ip"]})
            if k == 0 and len(lan_members) > 1:
                peer = lan_members[1]
                n["trafgens"].append({"name": "cbr0", "myname": "node0", "myport": 6000,
                                      "peername": "node1", "peerport": 6001, "proto": "udp",
                                      "role": "source", "generator": "TG"})
                n["link_delays"].append({
                    "linkname": "link0", "int0": itf["mac"], "int1": peer[1]["mac"],
                    "pipe0": 100 + e * 2, "delay0": 10.0, "bw0": 100000, "plr0": 0.0,
                    "pipe1": 101 + e * 2, "delay1": 10.0, "bw1": 100000, "plr1": 0.0,
                    # RED on the way out, gentle RED and a lossy way back.
                    "red0": 1, "limit0": 50, "maxthresh0": 15, "minthresh0": 5,
                    "weight0": 0.002, "linterm0": 10, "meanpsize0": 1000,
                    "gentle1": 1, "red1": 1, "limit1": 100, "maxthresh1": 30,
                    "minthresh1": 10, "weight1": 0.004, "linterm1": 10, "meanpsize1": 1500,
                    "vnode0": "node0", "vnode1": "node1", "backfill0": 1000})
        doc["experiments"].append({
            "pid": pid, "eid": eid, "creator": members[0]["login"],
            "swapper": members[e % len(members)]["login"],
            "routertype": ("manual" if e % 4 == 3 else "static") if e % 2 else "none",
            "nseconfig": "", "gid": g["name"],
            "startupcmd": f"/proj/{pid}/start.sh" + (
                f""" --say "it's {eid}" 'and "more"'""" if e % 3 == 1 else ""),
            "keyhash": f"{awk.getrandbits(160):040x}", "eventkey": f"{awk.getrandbits(128):032x}",
            "syncserver": "node0", "nfsmounts": "none" if e % 3 == 1 else "emulabdefault",
            "members": [{"login": u["login"], "root": i == 0} for i, u in enumerate(members)],
            "nodes": allocs,
            "mounts": [{"fstype": "NFS", "remote": f"fs:/proj/{pid}", "local": f"/proj/{pid}"},
                       {"fstype": "NFS", "remote": f"fs:/users/{members[0]['login']}",
                        "local": f"/users/{members[0]['login']}"}],
            "tarballs": [{"vname": "", "dir": "/usr/local", "path": f"tarballs/{pid}-tools.tar.gz"}],
            "rpms": [{"vname": "node0", "path": f"rpms/{pid}-agent-1.0-1.x86_64.rpm"}],
        })
    # Fill every field so the generated text is already canonical.
    return canonical(dump(doc))


def _mac(value: int) -> str:
    return ":".join(f"{(value >> (8 * k)) & 0xff:02x}" for k in range(5, -1, -1))

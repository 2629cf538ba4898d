"""The inventory entry by entry: add, change and remove nodes, interfaces, users, groups,
OS images, node types and experiments, with exactly the rules of a testbed import.

Each change reads the inventory as a testbed document, changes one entry of it,
validates the whole document as import would (`testbed.validate`: one set of
rules), and writes only the rows of the entries that differ, in one transaction
with an audit row naming who made it.  `diff` and `live_losses` also tell an
operator what a whole import would change and which live allocations it would drop.
"""

from __future__ import annotations

import copy
import getpass
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, delete, insert, update

from . import schema as s
from .ops import MAP_LOADER_FIELDS, Conflict, NotFound
from .testbed import (
    EXP_CHILD_TABLES,
    EXP_CHILDREN,
    NODE_CHILDREN,
    NODE_FIELDS,
    TOP,
    Field,
    TestbedError,
    load_doc,
    normalize,
    table_rows,
    validate,
)


@dataclass(frozen=True)
class Origin:
    """Where a change comes from: cli, api or import, and who (a login, an address)."""

    kind: str
    who: str = ""

    @classmethod
    def cli(cls) -> Origin:
        return cls("cli", os.environ.get("SUDO_USER") or _login())


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


@dataclass(frozen=True)
class Kind:
    """One kind of entry: its section of the testbed document and its key fields."""

    name: str  # as operators say it: node, user, ...
    section: str  # testbed section
    keys: tuple[str, ...]
    fields: list[Field]
    add_hint: str  # how to add one, for "no such ..." messages

    def key_of(self, entry: dict[str, Any]) -> str:
        return "/".join(str(entry[k]) for k in self.keys)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("type", "node_types", ("name",), TOP["node_types"],
         "bootherd type add {key} class=pc loader_bios=undionly.kpxe"),
    Kind("os", "os_images", ("name",), TOP["os_images"],
         "bootherd os add {key} kind=part partition=1"),
    Kind("group", "groups", ("name",), TOP["groups"], "bootherd group add {key} gid=GID"),
    Kind("user", "users", ("login",), TOP["users"],
         "bootherd user add {key} uid=UID gid=GID name='Full Name' groups=GROUP"),
    Kind("node", "nodes", ("node_id",), NODE_FIELDS, "bootherd node add {key} type=TYPE"),
    Kind("experiment", "experiments", ("pid", "eid"), TOP["experiments"],
         "bootherd experiment create {pid} {eid} --creator USER"),
)}
# Interfaces are children of their node, addressed by MAC.
INTERFACE_FIELDS = NODE_CHILDREN["interfaces"]
SECTION_KIND = {k.section: k for k in KINDS.values()}


def missing(kind: str, key: str) -> NotFound:
    """'no user 'alice'' with the command that adds one."""
    k = KINDS[kind]
    if kind == "experiment":
        pid, _, eid = key.partition("/")
        return NotFound(f"no experiment {key}",
                        "create it with '" + k.add_hint.format(pid=pid, eid=eid) + "'")
    return NotFound(f"no {kind} {key!r}", "add it with '" + k.add_hint.format(key=key) + "'")


# --- values from the command line -------------------------------------------------

def coerce(fields: list[Field], name: str, text: str) -> Any:
    """A field=value argument as the field's type (bool, int, float, list: comma-separated)."""
    f = next((f for f in fields if f.name == name), None)
    if f is None and name in MAP_LOADER_FIELDS and any(f.name == "loaders" for f in fields):
        return text  # a slot of the loaders map (loader_uefi-arm64=PATH)
    if f is None:
        from ..config import did_you_mean

        raise ValueError(f"unknown field {name!r}{did_you_mean(name, [f.name for f in fields])} "
                         f"(fields: {', '.join(f.name for f in fields)})")
    d = f.default
    if isinstance(d, bool):
        low = text.strip().lower()
        if low not in ("true", "false", "yes", "no", "1", "0"):
            raise ValueError(f"{name}: expected true or false, got {text!r}")
        return low in ("true", "yes", "1")
    if isinstance(d, int):
        try:
            return int(text, 0)
        except ValueError:
            raise ValueError(f"{name}: expected a whole number, got {text!r}") from None
    if isinstance(d, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {text!r}") from None
    if isinstance(d, list):
        return [x.strip() for x in text.split(",") if x.strip()]
    return text


def parse_assignments(fields: list[Field], items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{item!r}: expected field=value")
        k, v = item.split("=", 1)
        out[k.strip()] = coerce(fields, k.strip(), v)
    return out


# --- what differs between two documents --------------------------------------------

@dataclass
class Change:
    action: str  # add | change | remove
    kind: str  # node, user, ...
    key: str
    fields: list[str] = field(default_factory=list)  # changed fields (change)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        mark = {"add": "+", "remove": "-", "change": "~"}[self.action]
        line = f"{mark} {self.kind} {self.key}"
        if self.action == "change":
            line += ": " + "; ".join(_field_change(n, self.before.get(n), self.after.get(n))
                                     for n in self.fields)
        return line

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "kind": self.kind, "key": self.key,
                "fields": self.fields}


# How a list entry is named in a change line (interfaces by MAC, allocations by node, ...).
_ITEM_LABEL = {"interfaces": "mac", "nodes": "node_id", "members": "login", "routes": "dest",
               "tunnels": "member", "trafgens": "name", "link_delays": "linkname",
               "mounts": "local", "tarballs": "path", "rpms": "path"}


def _field_change(name: str, old: Any, new: Any) -> str:
    if name == "power" and isinstance(old, dict) and isinstance(new, dict):
        parts = [k for k in old if k != "password" and old.get(k) != new.get(k)]
        if old.get("password") != new.get("password"):
            parts.append("password")  # never its value
        return f"power ({', '.join(parts)})"
    if isinstance(old, list) or isinstance(new, list):
        old, new = old or [], new or []
        label = _ITEM_LABEL.get(name)
        gone = [x for x in old if x not in new]
        came = [x for x in new if x not in old]
        if label or all(isinstance(x, str) for x in (*old, *new)):
            def show(x: Any) -> str:
                return x if isinstance(x, str) else str(x.get(label, "?"))
            return f"{name} " + " ".join([*(f"+{show(x)}" for x in came),
                                          *(f"-{show(x)}" for x in gone)])
        return f"{name} (+{len(came)} -{len(gone)})"
    if name == "password_hash" or name == "privkey":
        return f"{name} (changed)"
    return f"{name} {old!r} -> {new!r}"


def _entries(data: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for section, kind in [(k.section, k) for k in KINDS.values()] + [("ntp_servers", None)]:
        for e in data.get(section, []):
            key = kind.key_of(e) if kind else e["host"]
            out[(kind.name if kind else "ntp", key)] = e
    return out


def diff(old: dict[str, list[dict[str, Any]]], new: dict[str, list[dict[str, Any]]]
         ) -> list[Change]:
    """Entries added, changed (with the fields that differ) and removed, old -> new."""
    a, b = _entries(old), _entries(new)
    out = []
    for (kind, key), e in b.items():
        if (kind, key) not in a:
            out.append(Change("add", kind, key, after=e))
        elif a[(kind, key)] != e:
            before = a[(kind, key)]
            names = [n for n in dict.fromkeys([*before, *e]) if before.get(n) != e.get(n)]
            out.append(Change("change", kind, key, names, before, e))
    out += [Change("remove", kind, key, before=e) for (kind, key), e in a.items()
            if (kind, key) not in b]
    order = {"type": 0, "os": 1, "ntp": 2, "group": 3, "user": 4, "node": 5, "experiment": 6}
    out.sort(key=lambda c: (order[c.kind], c.action != "remove", c.key))
    return out


def live_losses(old: dict[str, list[dict[str, Any]]], new: dict[str, list[dict[str, Any]]]
                ) -> list[str]:
    """What replacing `old` by `new` would take from running experiments: experiments
    with nodes, their allocations, and nodes' pending next_os."""
    losses = []
    new_exps = {(e["pid"], e["eid"]): e for e in new["experiments"]}
    for e in old["experiments"]:
        if not e["nodes"]:
            continue
        name = f"{e['pid']}/{e['eid']}"
        kept = new_exps.get((e["pid"], e["eid"]))
        if kept is None:
            n = len(e["nodes"])
            losses.append(f"running experiment {name} ({n} node{'s' if n != 1 else ''}) would "
                          "be removed")
            continue
        now = {(a["node_id"], a["vname"]) for a in kept["nodes"]}
        for a in e["nodes"]:
            if (a["node_id"], a["vname"]) not in now:
                losses.append(f"allocation of {a['node_id']} to {name} as {a['vname']} would "
                              "be dropped")
    new_nodes = {n["node_id"]: n for n in new["nodes"]}
    for n in old["nodes"]:
        if n["next_os"] and new_nodes.get(n["node_id"], {}).get("next_os") != n["next_os"]:
            losses.append(f"pending next_os {n['next_os']} of {n['node_id']} would be dropped")
    return losses


# --- writing only what differs ------------------------------------------------------

_PARENTS = {"type": (s.node_types, ("name",)), "os": (s.os_images, ("name",)),
            "ntp": (s.ntp_servers, ("host",)), "group": (s.groups, ("name",)),
            "user": (s.users, ("login",)), "node": (s.nodes, ("node_id",)),
            "experiment": (s.experiments, ("pid", "eid"))}
_ORDER = ["type", "os", "ntp", "group", "user", "node", "experiment"]
_CHILDREN = {"user": ["user_groups", "ssh_keys"],
             "node": [*NODE_CHILDREN, "node_power"],
             "experiment": [EXP_CHILD_TABLES[c] for c in EXP_CHILDREN]}
_SECTIONS = {"type": "node_types", "os": "os_images", "ntp": "ntp_servers", "group": "groups",
             "user": "users", "node": "nodes", "experiment": "experiments"}


def _rows(kind: str, entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows these entries of one kind put in each table (import's table_rows)."""
    doc: dict[str, list] = {k: [] for k in TOP}
    doc[_SECTIONS[kind]] = entries
    rows = table_rows(doc)
    if kind == "node":
        rows["node_power"] = [{"node_id": n["node_id"], **n["power"]}
                              for n in entries if "power" in n]
    return rows


def _where(table: Any, cols: tuple[str, ...], row: dict[str, Any]) -> Any:
    return and_(*(table.c[c] == row[c] for c in cols))


def apply(conn: Any, changes: list[Change]) -> None:
    """Write `changes` (from diff) in an order the foreign keys accept: the children of
    changed and removed entries out, parents added and updated (referenced kinds first,
    physical nodes before their vnodes), children back in, removed parents out last."""
    by_kind: dict[str, list[Change]] = {k: [] for k in _ORDER}
    for c in changes:
        by_kind[c.kind].append(c)
    for kind in _ORDER:
        for c in by_kind[kind]:
            if c.action in ("change", "remove") and kind in _CHILDREN:
                parent, cols = _PARENTS[kind]
                for tname in _CHILDREN[kind]:
                    t = s.metadata.tables[tname]
                    conn.execute(delete(t).where(_where(t, cols, c.before)))
    for kind in _ORDER:
        table, cols = _PARENTS[kind]
        added = [c.after for c in by_kind[kind] if c.action == "add"]
        changed = [c.after for c in by_kind[kind] if c.action == "change"]
        if kind == "node":
            added.sort(key=lambda n: bool(n["phys_node_id"]))
        section = table.name
        if added:
            conn.execute(insert(table), _rows(kind, added)[section])
        for row in _rows(kind, changed)[section] if changed else []:
            conn.execute(update(table).where(_where(table, cols, row)).values(**row))
    for kind in _ORDER:
        entries = [c.after for c in by_kind[kind] if c.action in ("add", "change")]
        if entries and kind in _CHILDREN:
            for tname, rows in _rows(kind, entries).items():
                if tname in _CHILDREN[kind] and rows:
                    conn.execute(insert(s.metadata.tables[tname]), rows)
    for kind in reversed(_ORDER):
        table, cols = _PARENTS[kind]
        removed = [c.before for c in by_kind[kind] if c.action == "remove"]
        if kind == "node":
            removed.sort(key=lambda n: not n["phys_node_id"])  # vnodes first
        for row in removed:
            conn.execute(delete(table).where(_where(table, cols, row)))


def audit(conn: Any, origin: Origin, action: str, kind: str, key: str, detail: str = "") -> None:
    conn.execute(insert(s.inventory_audit).values(
        ts=time.time(), origin=origin.kind[:16], who=origin.who[:128], action=action[:16],
        kind=kind[:32], key=key[:255], detail=detail))


# --- a whole import ------------------------------------------------------------------

class DryRun(Exception):
    """Raised inside the import's transaction to write nothing."""


@dataclass
class ImportPlan:
    changes: list[Change]
    losses: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    written: bool = False


def import_file(engine: Engine, text: str, origin: Origin, name: str = "",
                base_dir: Path | None = None, env: Any = None, dry_run: bool = False,
                force: bool = False) -> ImportPlan:
    """Import a testbed file (testbed.import_testbed) after comparing it with the
    inventory: the plan lists what it adds, changes and removes, and what it would
    take from running experiments; those losses refuse the import (Conflict) unless
    `force`.  `dry_run` compares and writes nothing."""
    from .testbed import import_testbed

    plan = ImportPlan([], [])

    def check(conn: Any, data: dict) -> None:
        _, old = _current(conn)
        plan.changes = diff(old, data)
        plan.losses = live_losses(old, data)
        if dry_run:
            raise DryRun()
        if plan.losses and not force:
            raise Conflict(f"{name or 'the file'} would drop what running experiments use: "
                           + "; ".join(plan.losses),
                           "add them to the file (bootherd testbed export shows them), "
                           "see what changes with --dry-run, or import with --force")
        counts = {a: sum(c.action == a for c in plan.changes) for a in ("add", "change",
                                                                         "remove")}
        audit(conn, origin, "import", "testbed", name,
              f"{counts['add']} added, {counts['change']} changed, {counts['remove']} "
              f"removed" + (f"; forced: {'; '.join(plan.losses)}" if plan.losses else ""))

    try:
        plan.counts = import_testbed(engine, text, base_dir=base_dir, env=env, check=check)
        plan.written = True
    except DryRun:
        pass
    return plan


# --- one entry at a time -------------------------------------------------------------

def _current(conn: Any) -> tuple[dict, dict]:
    """The inventory as stored (passwords included, to write them back unchanged):
    the document to change and its normalized form to compare against."""
    doc = load_doc(conn, passwords=True)
    return doc, normalize(copy.deepcopy(doc))


def _find(doc: dict, kind: str, key: str) -> dict[str, Any] | None:
    k = KINDS[kind]
    return next((e for e in doc[k.section] if k.key_of(e) == key), None)


# (kind, field) -> the kind of entry it names; checked first so that a missing one
# says how to add it (validate would name the entry's position instead).
_REFS = {("node", "type"): "type", ("node", "default_os"): "os", ("node", "temp_os"): "os",
         ("node", "next_os"): "os", ("node", "phys_node_id"): "node",
         ("experiment", "creator"): "user", ("experiment", "swapper"): "user",
         ("experiment", "gid"): "group", ("user", "groups"): "group",
         ("group", "project"): "group"}


def _check_refs(doc: dict, kind: str, entry: dict[str, Any]) -> None:
    for (k, f), target in _REFS.items():
        if k != kind or not entry.get(f):
            continue
        for name in entry[f] if isinstance(entry[f], list) else [entry[f]]:
            if isinstance(name, str) and _find(doc, target, name) is None:
                raise missing(target, name)


def _loader_slots(kind: str, entry: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Move loader_<slot>=PATH for the slots without a column of their own into the
    entry's loaders map ("" clears the slot); the other fields are returned."""
    if kind not in ("node", "type"):
        return fields
    rest = {}
    for name, value in fields.items():
        slot = MAP_LOADER_FIELDS.get(name)
        if slot is None:
            rest[name] = value
            continue
        loaders = dict(entry.get("loaders") or {})
        if value:
            loaders[slot] = value
        else:
            loaders.pop(slot, None)
        entry["loaders"] = loaders
    return rest


def _commit(conn: Any, old: dict, doc: dict, origin: Origin, action: str, kind: str,
            key: str, entry: dict[str, Any] | None = None) -> list[Change]:
    if entry is not None:
        _check_refs(doc, kind, entry)
    new = validate(doc)
    changes = diff(old, new)
    if changes:  # setting what is already there changes nothing and says nothing
        apply(conn, changes)
        audit(conn, origin, action, kind, key, "; ".join(c.describe() for c in changes))
    return changes


def add(engine: Engine, kind: str, entry: dict[str, Any], origin: Origin) -> list[Change]:
    """Add one entry (its fields as import takes them; the rest default)."""
    k = KINDS[kind]
    for f in k.keys:
        if not entry.get(f):
            raise ValueError(f"{kind}: {f} must not be empty")
    key = k.key_of(entry)
    with engine.begin() as conn:
        doc, old = _current(conn)
        if _find(doc, kind, key) is not None:
            raise Conflict(f"{kind} {key!r} exists",
                           f"change it with 'bootherd {kind} set {key.replace('/', ' ')} "
                           "FIELD=VALUE'")
        if kind == "node":
            entry = {c: [] for c in NODE_CHILDREN} | entry
        if kind == "experiment":
            entry = {c: [] for c in EXP_CHILDREN} | entry
        entry = dict(entry)
        slots = {k: entry.pop(k) for k in list(entry) if k in MAP_LOADER_FIELDS}
        entry.update(_loader_slots(kind, entry, slots))
        doc[k.section].append(entry)
        return _commit(conn, old, doc, origin, "add", kind, key, entry)


def change(engine: Engine, kind: str, key: str, fields: dict[str, Any],
           origin: Origin) -> list[Change]:
    """Change fields of one entry; its key fields stay."""
    k = KINDS[kind]
    bad = set(fields) & set(k.keys)
    if bad:
        raise ValueError(f"{', '.join(sorted(bad))}: the key of a {kind} cannot change; "
                         f"remove it and add it again")
    with engine.begin() as conn:
        doc, old = _current(conn)
        e = _find(doc, kind, key)
        if e is None:
            raise missing(kind, key)
        e.update(_loader_slots(kind, e, fields))
        return _commit(conn, old, doc, origin, "change", kind, key, e)


def remove(engine: Engine, kind: str, key: str, origin: Origin,
           force: bool = False) -> list[Change]:
    """Remove one entry.  A node allocated to an experiment or an experiment with nodes
    is refused unless `force` (which also frees the node)."""
    k = KINDS[kind]
    with engine.begin() as conn:
        doc, old = _current(conn)
        e = _find(doc, kind, key)
        if e is None:
            raise missing(kind, key)
        if kind == "node":
            for x in doc["experiments"]:
                held = [a for a in x["nodes"] if a["node_id"] == key]
                if held and not force:
                    raise Conflict(f"node {key} is allocated to {x['pid']}/{x['eid']}",
                                   f"free it first ('bootherd experiment free {key}') "
                                   "or remove it with --force")
                x["nodes"] = [a for a in x["nodes"] if a["node_id"] != key]
        if kind == "experiment" and e["nodes"] and not force:
            raise Conflict(f"experiment {key} has {len(e['nodes'])} nodes allocated",
                           "free them first ('bootherd experiment free NODE ...') or "
                           "remove it with --force")
        doc[k.section].remove(e)
        return _commit(conn, old, doc, origin, "remove", kind, key)


def _node_of_interface(doc: dict, mac: str) -> tuple[dict, dict] | None:
    for n in doc["nodes"]:
        for i in n["interfaces"]:
            if i["mac"] == mac:
                return n, i
    return None


def _mac(mac: str) -> str:
    from .model import norm_mac

    try:
        return norm_mac(mac)
    except ValueError:
        raise ValueError(f"bad MAC address {mac!r}") from None


def add_interface(engine: Engine, node_id: str, entry: dict[str, Any],
                  origin: Origin) -> list[Change]:
    if not entry.get("mac"):
        raise ValueError("interface: mac must not be empty")
    mac = _mac(entry["mac"])
    with engine.begin() as conn:
        doc, old = _current(conn)
        n = _find(doc, "node", node_id)
        if n is None:
            raise missing("node", node_id)
        if _node_of_interface(doc, mac) is not None:
            raise Conflict(f"interface {mac} exists",
                           f"change it with 'bootherd interface set {mac} FIELD=VALUE'")
        n["interfaces"].append({**entry, "mac": mac})
        return _commit(conn, old, doc, origin, "add", "interface", mac)


def change_interface(engine: Engine, mac: str, fields: dict[str, Any],
                     origin: Origin) -> list[Change]:
    mac = _mac(mac)
    if "mac" in fields:
        raise ValueError("mac: the key of an interface cannot change; remove it and add it "
                         "again")
    with engine.begin() as conn:
        doc, old = _current(conn)
        found = _node_of_interface(doc, mac)
        if found is None:
            raise NotFound(f"no interface {mac}",
                           f"add it with 'bootherd interface add NODE mac={mac} ...'")
        found[1].update(fields)
        return _commit(conn, old, doc, origin, "change", "interface", mac)


def remove_interface(engine: Engine, mac: str, origin: Origin) -> list[Change]:
    mac = _mac(mac)
    with engine.begin() as conn:
        doc, old = _current(conn)
        found = _node_of_interface(doc, mac)
        if found is None:
            raise NotFound(f"no interface {mac}")
        found[0]["interfaces"].remove(found[1])
        return _commit(conn, old, doc, origin, "remove", "interface", mac)


def entries(engine: Engine, kind: str) -> list[dict[str, Any]]:
    """Every entry of a kind, as the testbed file has them (no BMC passwords)."""
    with engine.connect() as conn, conn.begin():
        return load_doc(conn)[KINDS[kind].section]


# --- checks that need the configuration ----------------------------------------------

def missing_boot_files(cfg: Any, image: dict[str, Any]) -> list[Path]:
    """Files a kernel image names that this server would serve (http.root) but lacks."""
    from ..policy import split_server_path

    if image.get("kind") != "kernel":
        return []
    public = cfg.server.public_address
    root = cfg.path(cfg.http.root)
    out = []
    for spec in (image.get("path", ""), image.get("initrd", "")):
        if not spec:
            continue
        server, path = split_server_path(spec, public)
        if server == public and not (root / path.lstrip("/")).is_file():
            out.append(root / path.lstrip("/"))
    return out


def check_boot_files(cfg: Any, engine: Engine, fields: dict[str, Any]) -> None:
    """Refuse a default_os / temp_os / next_os whose kernel or initrd file is missing."""
    names = [fields[f] for f in ("default_os", "temp_os", "next_os") if fields.get(f)]
    if not names:
        return
    images = {e["name"]: e for e in entries(engine, "os")}
    for name in names:
        if name not in images:
            raise missing("os", name)
        gone = missing_boot_files(cfg, images[name])
        if gone:
            raise Conflict(f"OS image {name}: missing {', '.join(str(p) for p in gone)} "
                           "(nodes would fail to boot it)",
                           "put the file there (http.root), or pass --force")


__all__ = ["Change", "Conflict", "KINDS", "NotFound", "Origin", "TestbedError", "add",
           "add_interface", "apply", "audit", "change", "change_interface", "diff",
           "entries", "live_losses", "remove", "remove_interface"]

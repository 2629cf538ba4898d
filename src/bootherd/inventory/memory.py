"""Snapshots built from table rows, wherever the rows come from.

`snapshot.load` reads the rows from the database; `snapshot_from_text` takes
them from a testbed file (the rows `bootherd testbed import` would write), so a
protocol core can be specified against a whole inventory with no database:

    snap = snapshot_from_text(generate(20))
    snap = with_nodes(snap, dataclasses.replace(snap.nodes["pc1"], next_os="FRISBEE-MFS"))

Both sources go through the same builders below, and a test checks that a
file imported and loaded gives the snapshot built from its text, field by field.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from ..firmware import COLUMN_SLOTS
from .model import Allocation, Experiment, Interface, Node, OSImage, Snapshot, User
from .testbed import loaders_from_db, parse, table_rows

# Column order of the tuples the node builder takes (the database path selects them
# in this order through the raw driver cursor: at 10,000 nodes it halves the build).
NODE_COLUMNS = ("node_id", "type", "role", "phys_node_id", "jailed", "default_os", "temp_os",
                "next_os", "loader_bios", "loader_uefi", "loader_http", "loader_ipxe",
                "pxe_loader", "boot_cmdline", "bios_disk", "privkey", "ntp_drift", "uuid",
                "loaders")
IFACE_COLUMNS = ("mac", "node_id", "ip", "mask", "role", "iface", "speed", "duplex", "lan",
                 "ip6")
NODE_CHILD_TABLES = ("routes", "tunnels", "trafgens", "link_delays")

Rows = Iterable[Mapping[str, Any]]


def iface_order(node_id: str, role: str, iface: str, mac: str) -> tuple:
    """A node's interfaces: control first, then by name (the database's ORDER BY too)."""
    return (node_id, role != "ctrl", iface, mac)


def type_loaders(row: Mapping[str, Any]) -> dict[str, str]:
    """A node type's (or node's) loaders by slot: its loader_<slot> columns and its
    `loaders` map, empty slots left out."""
    out = loaders_from_db(row.get("loaders"))
    for slot in COLUMN_SLOTS:
        if row.get(f"loader_{slot}"):
            out[slot] = row[f"loader_{slot}"]
    return out


def build_nodes(types: Mapping[str, Mapping[str, Any]], node_rows: Iterable[tuple],
                iface_rows: Iterable[tuple], alloc_rows: Rows) -> dict[str, Node]:
    """Node objects from node and interface tuples (NODE_COLUMNS, IFACE_COLUMNS order;
    interfaces already in `iface_order`) and allocation rows."""
    ifaces: dict[str, list[Interface]] = defaultdict(list)
    for row in iface_rows:
        ifaces[row[1]].append(Interface(*row))
    allocs = {r["node_id"]: Allocation(r["pid"], r["eid"], r["vname"], r["startupcmd"],
                                       r["erole"])
              for r in alloc_rows}
    by_type = {name: type_loaders(t) for name, t in types.items()}
    nodes: dict[str, Node] = {}
    for (node_id, ntype, role, phys, jailed, default_os, temp_os, next_os, lb, lu, lh, li,
         pxe_loader, cmdline, bios_disk, privkey, drift, uuid, extra) in node_rows:
        # The node's own loader of a slot, else its type's; every column slot present
        # (maybe ""), map slots only where set.
        loaders = {**dict.fromkeys(COLUMN_SLOTS, ""), **by_type.get(ntype, {})}
        own = loaders_from_db(extra)
        for slot, path in zip(COLUMN_SLOTS, (lb, lu, lh, li), strict=True):
            if path:
                own[slot] = path
        loaders.update(own)
        nodes[node_id] = Node(
            node_id, ntype, role, phys, bool(jailed), default_os, temp_os, next_os,
            loaders, pxe_loader, cmdline, bios_disk, privkey, drift,
            tuple(ifaces.get(node_id, ())), allocs.get(node_id), uuid)
    return nodes


def group_by_node(rows: Rows) -> dict[str, tuple[dict, ...]]:
    """A node child table's rows (in id order) by node, without their id and node_id."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        d = dict(r)
        d.pop("id", None)
        out[d.pop("node_id")].append(d)
    return {k: tuple(v) for k, v in out.items()}


def indexes(nodes: dict[str, Node]) -> dict[str, dict]:
    """Everything derived from the nodes alone, rebuilt in one pass."""
    by_mac, by_ip, by_privkey = {}, {}, {}
    vnodes: dict[str, list[str]] = defaultdict(list)
    exp_nodes: dict[tuple[str, str], list[str]] = defaultdict(list)
    for n in nodes.values():
        for i in n.interfaces:
            by_mac[i.mac] = n
            if i.role == "ctrl" and i.ip:
                by_ip[i.ip] = n
            if i.role == "ctrl" and i.ip6:
                by_ip[i.ip6] = n
        if n.privkey:
            by_privkey[n.privkey] = n
        if n.phys_node_id:
            vnodes[n.phys_node_id].append(n.node_id)
        if n.allocation:
            exp_nodes[(n.allocation.pid, n.allocation.eid)].append(n.node_id)
    return {"by_mac": by_mac, "by_ip": by_ip, "by_privkey": by_privkey,
            "vnodes": {k: tuple(sorted(v)) for k, v in vnodes.items()},
            "experiment_nodes": {k: tuple(sorted(v)) for k, v in exp_nodes.items()}}


def build_rest(tables: Mapping[str, Rows]) -> dict[str, Any]:
    """The Snapshot fields that are not nodes, from the other tables' rows (children of
    users and experiments in id order, as the database path selects them)."""
    images = {r["name"]: OSImage(r["name"], r["kind"], r["partition"], r["sysid"],
                                 r["path"], r["initrd"], r["cmdline"], r["disk_image"])
              for r in tables["os_images"]}
    ugroups: dict[str, list[str]] = defaultdict(list)
    for r in tables["user_groups"]:
        ugroups[r["login"]].append(r["group_name"])
    keys: dict[str, list[str]] = defaultdict(list)
    for r in tables["ssh_keys"]:
        keys[r["login"]].append(r["key"])
    users = {r["login"]: User(r["login"], r["uid"], r["gid"], r["name"], r["email"],
                              r["shell"], r["password_hash"], r["serial"],
                              tuple(sorted(ugroups.get(r["login"], ()))),
                              tuple(keys.get(r["login"], ())))
             for r in tables["users"]}
    members: dict[tuple[str, str], list[tuple[str, bool]]] = defaultdict(list)
    for r in tables["experiment_members"]:
        members[(r["pid"], r["eid"])].append((r["login"], bool(r["root"])))
    exps = {(r["pid"], r["eid"]): Experiment(
                r["pid"], r["eid"], r["creator"], r["swapper"], r["routertype"],
                r["nseconfig"], r["startupcmd"], r["gid"],
                tuple(sorted(members.get((r["pid"], r["eid"]), ()))),
                r["keyhash"], r["eventkey"], r["syncserver"], r["nfsmounts"])
            for r in tables["experiments"]}
    per_exp: dict[str, dict[tuple[str, str], list]] = {
        "mounts": defaultdict(list), "tarballs": defaultdict(list), "rpms": defaultdict(list)}
    for r in tables["mounts"]:
        per_exp["mounts"][(r["pid"], r["eid"])].append((r["fstype"], r["remote"], r["local"]))
    for r in tables["tarballs"]:
        per_exp["tarballs"][(r["pid"], r["eid"])].append((r["vname"], r["dir"], r["path"]))
    for r in tables["rpms"]:
        per_exp["rpms"][(r["pid"], r["eid"])].append((r["vname"], r["path"]))
    return {
        "os_images": images, "node_types": {r["name"]: dict(r) for r in tables["node_types"]},
        "users": users, "groups": {r["name"]: r["gid"] for r in tables["groups"]},
        "group_projects": {r["name"]: r["project"] or r["name"] for r in tables["groups"]},
        "experiments": exps,
        **{name: {k: tuple(v) for k, v in d.items()} for name, d in per_exp.items()},
        # By host, as export writes them: the table itself keeps no order.
        "ntp_servers": tuple(sorted((r["host"], r["kind"]) for r in tables["ntp_servers"])),
    }


def snapshot_from_rows(tables: Mapping[str, list[Mapping[str, Any]]], generation: int = 1,
                       change_id: int = 0) -> Snapshot:
    """A whole Snapshot from every configuration table's rows (as dicts, by table name)."""
    rest = build_rest(tables)
    ifaces = sorted((tuple(r[c] for c in IFACE_COLUMNS) for r in tables["interfaces"]),
                    key=lambda t: iface_order(t[1], t[4], t[5], t[0]))
    nodes = build_nodes(rest["node_types"],
                        (tuple(r[c] for c in NODE_COLUMNS) for r in tables["nodes"]),
                        ifaces, tables["allocations"])
    return Snapshot(generation=generation, change_id=change_id, nodes=nodes, **rest,
                    **indexes(nodes),
                    **{name: group_by_node(tables[name]) for name in NODE_CHILD_TABLES})


def snapshot_from_text(text: str, generation: int = 1) -> Snapshot:
    """The snapshot a server would load after `bootherd testbed import` of `text`, built
    without a database.  Raises TestbedError exactly as the import would."""
    return snapshot_from_rows(table_rows(parse(text)), generation)


def with_nodes(snap: Snapshot, *nodes: Node, removed: Iterable[str] = ()) -> Snapshot:
    """`snap` with these nodes replaced or added (and `removed` dropped), its indexes
    rebuilt and its generation moved on, as a server sees an operator's change."""
    all_nodes = dict(snap.nodes)
    for nid in removed:
        all_nodes.pop(nid, None)
    for n in nodes:
        all_nodes[n.node_id] = n
    return dataclasses.replace(snap, generation=snap.generation + 1, nodes=all_nodes,
                               **indexes(all_nodes))

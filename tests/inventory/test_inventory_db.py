"""The inventory on SQLite and PostgreSQL: schema, testbed files, operator actions."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from bootherd.inventory import ops
from bootherd.inventory import schema as s
from bootherd.inventory.db import check_current, current_revision, head_revision, upgrade
from bootherd.inventory.snapshot import load
from bootherd.inventory.testbed import (
    TestbedError,
    canonical,
    export_testbed,
    generate,
    import_testbed,
)


def count(engine, table) -> int:  # noqa: ANN001
    with engine.connect() as c:
        return c.execute(select(func.count()).select_from(table)).scalar()


def test_upgrade_is_idempotent(engine):
    assert current_revision(engine) == head_revision(engine)
    upgrade(engine)
    check_current(engine)


def test_testbed_round_trip(engine):
    text = generate(60, subnet="10.20.0.0/24", seed=3)
    counts = import_testbed(engine, text)
    assert counts["nodes"] == 60
    assert export_testbed(engine) == text


def test_import_replaces_config_but_keeps_runtime_data(engine):
    import_testbed(engine, generate(10))
    with engine.begin() as c:
        c.execute(s.node_events.insert().values(node_id="pc1", ts=1.0, state="ISUP", source="t"))
    import_testbed(engine, generate(5, seed=2))
    assert count(engine, s.nodes) == 5
    assert count(engine, s.node_events) == 1


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.replace('mac = "02:00:01:00:00:10"', 'mac = "02:00:01:00:00:08"', 1),
     "duplicate MAC 02:00:01:00:00:08"),
    (lambda t: t.replace('ip = "10.10.0.3"', 'ip = "10.10.0.2"', 1), "duplicate IP 10.10.0.2"),
    (lambda t: t.replace('type = "pc3000"', 'type = "nosuchtype"', 1), "unknown type 'nosuchtype'"),
    (lambda t: t.replace('ip = "10.10.0.4"', 'ip = "10.10.0.999"', 1), "bad address '10.10.0.999'"),
    (lambda t: t.replace('node_id = "pc2"\n', 'node_id = "pc2"\ncolour = "red"\n', 1),
     "unknown field 'colour'"),
    (lambda t: t.replace('mac = "02:00:01:00:00:18"', 'mac = "02:00:01:00:00:zz"', 1),
     "bad MAC address"),
])
def test_bad_import_writes_nothing_and_names_the_entry(engine, mutate, message):
    good = generate(5)
    import_testbed(engine, good)
    bad = mutate(generate(8))
    assert bad != generate(8), "the mutation must apply"
    with pytest.raises(TestbedError) as err:
        import_testbed(engine, bad)
    assert message in str(err.value)
    assert "nodes[" in str(err.value) or "node_id" in str(err.value) or "pc" in str(err.value)
    assert count(engine, s.nodes) == 5  # the earlier inventory is untouched
    assert export_testbed(engine) == good


def test_snapshot_indexes(engine):
    import_testbed(engine, generate(30, subnet="127.40.0.0/24"))
    snap = load(engine)
    assert len(snap.nodes) == 30
    n = snap.nodes["pc7"]
    assert snap.by_ip[n.control_ip] is n
    assert snap.by_mac[n.control_mac] is n
    assert all(snap.by_mac[i.mac] is n for i in n.interfaces)
    allocated = [x for x in snap.nodes.values() if x.allocation]
    assert allocated, "the generated testbed allocates a share of its nodes"
    a = allocated[0].allocation
    exp = snap.experiments[(a.pid, a.eid)]
    assert allocated[0].node_id in snap.experiment_nodes[(a.pid, a.eid)]
    assert exp.members and all(login in snap.users for login, _ in exp.members)
    assert snap.mounts[(a.pid, a.eid)]
    assert n.loaders["bios"] == "undionly.kpxe"


def test_operator_actions_bump_generation(engine):
    import_testbed(engine, generate(40))
    g0 = load(engine).generation
    free_node = next(n for n in ops.list_nodes(engine) if not n["experiment"])["node_id"]
    ops.set_node(engine, free_node, next_os="FRISBEE-MFS")
    g1 = load(engine).generation
    assert g1 > g0
    assert load(engine).nodes[free_node].next_os == "FRISBEE-MFS"
    ops.create_experiment(engine, "proj0", "newexp", "user0x0")
    ops.allocate(engine, "proj0", "newexp", free_node, "n0")
    snap = load(engine)
    assert snap.generation > g1
    assert snap.nodes[free_node].allocation.vname == "n0"
    with pytest.raises(ops.Conflict):
        ops.allocate(engine, "proj0", "newexp", free_node, "n1")
    with pytest.raises(ops.NotFound):
        ops.set_node(engine, free_node, default_os="NOPE")
    with pytest.raises(ValueError):
        ops.set_node(engine, free_node, phys_node_id="evil")
    ops.free(engine, free_node)
    assert load(engine).nodes[free_node].allocation is None
    with pytest.raises(ops.NotFound):
        ops.free(engine, free_node)


def test_state_writes_do_not_bump_generation(engine):
    from bootherd.inventory.live import StateEvent, Writer

    import_testbed(engine, generate(5))
    g0 = load(engine).generation
    w = Writer(engine, interval=0.01)
    for st in ("PXEBOOTING", "BOOTING", "ISUP"):
        w.event(StateEvent("pc1", st, "test", 1000.0))
    assert w.flush()
    w.close()
    with engine.begin() as c:  # what the DHCP lease writer commits
        c.execute(s.leases.insert().values(ip="10.10.0.2", mac="02:00:00:01:00:08",
                                           node_id="pc1", expires=2e9, updated=1000.0))
    assert load(engine).generation == g0
    assert [e["state"] for e in ops.node_events(engine, "pc1")] == ["PXEBOOTING", "BOOTING", "ISUP"]
    assert ops.show_node(engine, "pc1")["state"]["state"] == "ISUP"
    assert count(engine, s.leases) == 1


def _same(a, b) -> None:  # noqa: ANN001
    for f in ("nodes", "by_mac", "by_ip", "by_privkey", "vnodes", "experiment_nodes", "routes",
              "tunnels", "trafgens", "link_delays", "experiments", "users", "mounts",
              "generation", "change_id"):
        assert getattr(a, f) == getattr(b, f), f


def test_patched_snapshot_equals_a_full_build(engine):
    """Node-level changes are patched into the previous snapshot; anything else
    (or a pruned change log) rebuilds it; either way it equals a fresh build."""
    from bootherd.inventory import snapshot as snap_mod

    import_testbed(engine, generate(60, subnet="127.43.0.0/24"))
    snap = load(engine)
    calls = []
    real_full = snap_mod._full
    snap_mod._full = lambda *a: calls.append("full") or real_full(*a)
    try:
        free_nodes = [n for n in ops.list_nodes(engine) if not n["experiment"]]
        allocated = next(n for n in ops.list_nodes(engine) if n["experiment"])
        ops.set_node(engine, free_nodes[0]["node_id"], next_os="FRISBEE-MFS", privkey="k1")
        ops.free(engine, allocated["node_id"])
        with engine.begin() as c:
            c.execute(s.routes.insert().values(node_id=free_nodes[1]["node_id"], dest="10.9.0.0",
                                               nexthop="10.9.0.1"))
            c.execute(s.interfaces.delete().where(s.interfaces.c.mac == free_nodes[2]["mac"]))
        patched = load(engine, snap)
        assert calls == []
        _same(patched, load(engine))
        assert patched.by_privkey["k1"].node_id == free_nodes[0]["node_id"]
        assert free_nodes[2]["ip"] not in patched.by_ip
        # A table that is not a node's own: rebuilt whole.
        calls.clear()
        ops.create_experiment(engine, "proj0", "another", "user0x0")
        rebuilt = load(engine, patched)
        assert calls == ["full"]
        _same(rebuilt, load(engine))
        # A change log pruned past the snapshot's mark: rebuilt whole.
        ops.set_node(engine, free_nodes[3]["node_id"], temp_os="LINUX-NETBOOT")
        snap_mod.prune_changes(engine, older_than=2e9)
        calls.clear()
        again = load(engine, rebuilt)
        assert calls == ["full"]
        assert again.nodes[free_nodes[3]["node_id"]].temp_os == "LINUX-NETBOOT"
    finally:
        snap_mod._full = real_full


def _with_arm64_and_ipv6(text: str) -> str:
    head, sep, tail = text.partition("[[nodes]]")
    head = head.replace('loader_ipxe = ""\n', 'loader_ipxe = ""\n'
                        'loaders = { uefi-arm64 = "arm64/grubnetaa64.efi" }\n')
    tail = tail.replace('ip6 = ""', 'ip6 = "fd00::2"', 1)  # the first node's control NIC
    return head + sep + tail


def test_loader_maps_and_ipv6_addresses_round_trip_and_load(engine):
    """Per-type and per-node loaders of every slot, and interfaces' IPv6 addresses: import,
    export, the loaded snapshot, and an operator's per-node override (migration 0008)."""
    text = _with_arm64_and_ipv6(generate(4, subnet="10.21.0.0/24"))
    assert "fd00::2" in text and "uefi-arm64" in text
    import_testbed(engine, text)
    exported = export_testbed(engine)
    assert exported == canonical(text) and canonical(exported) == exported
    snap = load(engine)
    node = snap.by_ip["fd00::2"]
    assert node.control_ip6 == "fd00::2" and snap.by_ip[node.control_ip] is node
    assert node.loaders["uefi-arm64"] == "arm64/grubnetaa64.efi"
    ops.set_node(engine, node.node_id, **{"loader_uefi-arm64": "own/grubaa64.efi",
                                          "loader_http-arm64": "own/http.efi"})
    again = load(engine, snap)
    assert again.generation > snap.generation
    assert again.nodes[node.node_id].loaders["uefi-arm64"] == "own/grubaa64.efi"
    assert again.nodes[node.node_id].loaders["http-arm64"] == "own/http.efi"
    assert ops.show_node(engine, node.node_id)["loaders"] == {
        "http-arm64": "own/http.efi", "uefi-arm64": "own/grubaa64.efi"}
    ops.set_node(engine, node.node_id, **{"loader_http-arm64": ""})  # "" clears the slot
    assert "http-arm64" not in load(engine).nodes[node.node_id].loaders
    with pytest.raises(ValueError, match="cannot set loader_arm64"):
        ops.set_node(engine, node.node_id, loader_arm64="x")
    with pytest.raises(TestbedError, match="duplicate IPv6 address fd00::2"):
        import_testbed(engine, text.replace('ip6 = ""', 'ip6 = "fd00:0::2"', 1))
    with pytest.raises(TestbedError, match="bad IPv6 address"):
        import_testbed(engine, text.replace('ip6 = ""', 'ip6 = "10.1.1.1"', 1))


def test_generated_testbed_with_an_ipv6_prefix(engine):
    """`generate(subnet6=...)`: every control interface gets an address of the prefix (the
    first left to the server), the round trip keeps them, a prefix too small is refused."""
    text = generate(20, subnet="10.22.0.0/24", subnet6="fd42::/64", seed=2)
    import_testbed(engine, text)
    assert export_testbed(engine) == text
    snap = load(engine)
    got = sorted(n.control_ip6 for n in snap.nodes.values())
    assert got == sorted(f"fd42::{i + 1:x}" for i in range(1, 21))
    assert all(snap.by_ip[n.control_ip6] is n for n in snap.nodes.values())
    with pytest.raises(ValueError, match="subnet6"):
        generate(20, subnet6="fd42::/124")

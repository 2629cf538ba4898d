"""The inventory entry by entry (inventory.edit) on both backends: the rules of import,
only the changed rows written, an audit row per change, and imports that show what
they change and refuse to drop what running experiments use."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from bootherd.inventory import edit, ops
from bootherd.inventory import schema as s
from bootherd.inventory.snapshot import load
from bootherd.inventory.testbed import TestbedError, export_testbed, generate, import_testbed, parse

CLI = edit.Origin("cli", "tester")


def _free_node(engine) -> str:  # noqa: ANN001
    return next(n for n in ops.list_nodes(engine) if not n["experiment"])["node_id"]


def _audit(engine) -> list:  # noqa: ANN001
    with engine.connect() as c:
        return list(c.execute(select(s.inventory_audit).order_by(s.inventory_audit.c.id)))


def _changed_nodes(engine, since: int) -> set:  # noqa: ANN001
    with engine.connect() as c:
        return {r.node_id for r in c.execute(select(s.changes).where(s.changes.c.id > since))}


def _last_change(engine) -> int:  # noqa: ANN001
    with engine.connect() as c:
        return c.execute(select(func.max(s.changes.c.id))).scalar() or 0


def test_add_change_remove_every_kind(engine) -> None:  # noqa: ANN001
    import_testbed(engine, generate(10, subnet="10.50.0.0/24"))
    edit.add(engine, "type", {"name": "r650", "loader_bios": "undionly.kpxe"}, CLI)
    edit.add(engine, "os", {"name": "DEBIAN12", "kind": "part", "partition": 1}, CLI)
    edit.add(engine, "group", {"name": "rack", "gid": 7100}, CLI)
    edit.add(engine, "user", {"login": "alice", "uid": 30000, "gid": 7100, "groups": ["rack"],
                              "keys": ["ssh-ed25519 AAAA alice@ops"]}, CLI)
    edit.add(engine, "node", {"node_id": "ra1", "type": "r650", "default_os": "DEBIAN12"}, CLI)
    edit.add_interface(engine, "ra1", {"mac": "02:AA:00:00:00:01", "ip": "10.50.0.200",
                                       "mask": "255.255.255.0", "role": "ctrl"}, CLI)
    ops.create_experiment(engine, "rack", "exp1", "alice", origin=CLI)
    ops.allocate(engine, "rack", "exp1", "ra1", "n0", origin=CLI)
    snap = load(engine)
    ra1 = snap.nodes["ra1"]
    assert ra1.control_ip == "10.50.0.200" and ra1.control_mac == "02:aa:00:00:00:01"
    assert ra1.allocation.vname == "n0" and snap.os_images["DEBIAN12"].partition == 1
    # Changes, with the fields that changed.
    (c,) = edit.change(engine, "user", "alice", {"shell": "/bin/zsh"}, CLI)
    assert c.describe() == "~ user alice: shell '/bin/sh' -> '/bin/zsh'"
    (c,) = edit.change_interface(engine, "02:aa:00:00:00:01", {"ip": "10.50.0.201"}, CLI)
    assert c.kind == "node" and c.key == "ra1" and "interfaces" in c.fields
    assert load(engine).nodes["ra1"].control_ip == "10.50.0.201"
    assert edit.change(engine, "user", "alice", {"shell": "/bin/zsh"}, CLI) == []  # no-op
    # Removal: refused while allocated, unless forced.
    with pytest.raises(ops.Conflict, match="allocated to rack/exp1") as e:
        edit.remove(engine, "node", "ra1", CLI)
    assert "experiment free ra1" in e.value.hint
    with pytest.raises(ops.Conflict, match="1 nodes allocated"):
        edit.remove(engine, "experiment", "rack/exp1", CLI)
    edit.remove(engine, "node", "ra1", CLI, force=True)
    assert "ra1" not in load(engine).nodes
    for kind, key in (("experiment", "rack/exp1"), ("user", "alice"), ("group", "rack"),
                      ("os", "DEBIAN12"), ("type", "r650")):
        edit.remove(engine, kind, key, CLI)
    # Back to exactly what the file said.
    assert export_testbed(engine) == export_testbed(engine)
    assert parse(export_testbed(engine)) == parse(generate(10, subnet="10.50.0.0/24"))
    rows = _audit(engine)
    assert {r.origin for r in rows} == {"cli"} and {r.who for r in rows} == {"tester"}
    assert [r.action for r in rows][:3] == ["add", "add", "add"]
    assert rows[-1].kind == "type" and rows[-1].action == "remove"


def test_the_rules_of_import_apply(engine) -> None:  # noqa: ANN001
    import_testbed(engine, generate(6, subnet="10.51.0.0/24"))
    taken = load(engine).nodes["pc2"].control_ip
    cases = [
        (lambda: edit.add_interface(engine, "pc1", {"mac": "02:bb:00:00:00:01", "ip": taken}, CLI),
         TestbedError, "duplicate IP"),
        (lambda: edit.add_interface(engine, "pc1", {"mac": "nope"}, CLI), ValueError, "bad MAC"),
        (lambda: edit.add_interface(engine, "pc1", {"mac": "02:bb:00:00:00:02", "role": "data"},
                                    CLI), TestbedError, "must be ctrl or expt"),
        (lambda: edit.add(engine, "node", {"node_id": "x1", "type": "d430",
                                           "boot_cmdline": "a\nPROXY=evil"}, CLI),
         TestbedError, "control characters"),
        (lambda: edit.add(engine, "user", {"login": "bob", "uid": 10000}, CLI),
         TestbedError, "duplicate uid"),
        (lambda: edit.add(engine, "group", {"name": "g", "gid": 2**40}, CLI),
         TestbedError, "out of range"),
        (lambda: edit.change(engine, "node", "pc1", {"ntp_drift": "fast"}, CLI),
         TestbedError, "expected float"),
        (lambda: edit.change(engine, "node", "pc1", {"node_id": "pc100"}, CLI),
         ValueError, "cannot change"),
        (lambda: edit.add(engine, "node", {"node_id": "pc1", "type": "d430"}, CLI),
         ops.Conflict, "exists"),
    ]
    before = export_testbed(engine)
    for fn, exc, text in cases:
        with pytest.raises(exc, match=text):
            fn()
    assert export_testbed(engine) == before  # nothing half-written
    assert _audit(engine) == []


def test_missing_prerequisites_say_how_to_add_them(engine) -> None:  # noqa: ANN001
    import_testbed(engine, generate(4))
    with pytest.raises(ops.NotFound) as e:
        ops.allocate(engine, "rack", "exp1", "pc1", "n0")
    assert str(e.value) == "no experiment rack/exp1"
    assert e.value.hint == "create it with 'bootherd experiment create rack exp1 --creator USER'"
    with pytest.raises(ops.NotFound) as e:
        ops.create_experiment(engine, "rack", "exp1", "alice")
    assert str(e.value) == "no user 'alice'"
    assert e.value.hint.startswith("add it with 'bootherd user add alice ")
    with pytest.raises(ops.NotFound) as e:
        edit.add(engine, "user", {"login": "alice", "uid": 1, "groups": ["rack"]}, CLI)
    assert e.value.hint.startswith("add it with 'bootherd group add rack gid=")
    with pytest.raises(ops.NotFound) as e:
        ops.set_node(engine, "pc1", default_os="NOPE")
    assert e.value.hint.startswith("add it with 'bootherd os add NOPE ")
    with pytest.raises(ops.NotFound, match="no node 'ra99'"):
        ops.node_events(engine, "ra99")


def test_a_change_writes_only_its_rows(engine) -> None:  # noqa: ANN001
    import_testbed(engine, generate(30, subnet="10.52.0.0/24"))
    node = _free_node(engine)
    g0, mark = load(engine).generation, _last_change(engine)
    ops.set_node(engine, node, next_os="FRISBEE-MFS", origin=CLI)
    assert _changed_nodes(engine, mark) == {node}  # servers patch one node, no rebuild
    snap = load(engine)
    assert snap.generation > g0 and snap.nodes[node].next_os == "FRISBEE-MFS"
    mark = _last_change(engine)
    edit.add(engine, "node", {"node_id": "pc31", "type": "d430"}, CLI)
    assert _changed_nodes(engine, mark) == {"pc31"}


def test_import_shows_its_changes_and_keeps_live_allocations(engine) -> None:  # noqa: ANN001
    text = generate(30, subnet="10.53.0.0/24")
    import_testbed(engine, text)
    node = _free_node(engine)
    ops.set_node(engine, node, next_os="FRISBEE-MFS")
    ops.create_experiment(engine, "proj0", "live", "user0x0")
    ops.allocate(engine, "proj0", "live", node, "n0")
    # The operator's file: one node gone, one node's OS changed, the running experiments
    # (and the pending next_os) not in it.
    doc = parse(text)
    doc["nodes"] = [n for n in doc["nodes"] if n["node_id"] != "pc30"]
    target = next(n for n in doc["nodes"] if n["node_id"] != node)
    target["default_os"] = "FBSD13-64-STD"
    doc["experiments"] = []
    import tomli_w
    new_text = tomli_w.dumps(doc)
    before = export_testbed(engine)
    plan = edit.import_file(engine, new_text, edit.Origin("import", "tester"), "tb.toml",
                            dry_run=True)
    assert not plan.written and export_testbed(engine) == before
    lines = [c.describe() for c in plan.changes]
    assert "- node pc30" in lines and "- experiment proj0/live" in lines
    assert f"~ node {target['node_id']}: default_os 'UBUNTU22-64-STD' -> 'FBSD13-64-STD'" in lines
    assert any(f"pending next_os FRISBEE-MFS of {node}" in loss for loss in plan.losses)
    assert "running experiment proj0/live (1 node) would be removed" in plan.losses
    assert any(loss.startswith("running experiment proj0/exp0 (") for loss in plan.losses)
    with pytest.raises(ops.Conflict, match="would drop what running experiments use") as e:
        edit.import_file(engine, new_text, edit.Origin("import", "tester"), "tb.toml")
    assert "--force" in e.value.hint and export_testbed(engine) == before
    plan = edit.import_file(engine, new_text, edit.Origin("import", "tester"), "tb.toml",
                            force=True)
    assert plan.written and "pc30" not in load(engine).nodes
    assert load(engine).nodes[node].allocation is None
    (row,) = [r for r in _audit(engine) if r.origin == "import"]
    assert row.key == "tb.toml" and "forced" in row.detail and row.who == "tester"
    # The same file again: nothing to change, nothing lost.
    plan = edit.import_file(engine, new_text, edit.Origin("import", "tester"), dry_run=True)
    assert plan.changes == [] and plan.losses == []


def test_loader_slots_without_columns_go_in_the_loaders_map(engine) -> None:  # noqa: ANN001
    """loader_<slot>=PATH for a slot of the loaders map (arm64, ...) adds to a type's or a
    node's map entry by entry, "" clears it, and import's rules refuse a bad path."""
    import_testbed(engine, generate(2, subnet="10.52.0.0/24"))
    fields = edit.parse_assignments(edit.KINDS["type"].fields,
                                    ["name=arm", "loader_uefi-arm64=arm64/grubnetaa64.efi"])
    edit.add(engine, "type", fields, CLI)
    node = ops.list_nodes(engine)[0]["node_id"]
    edit.change(engine, "node", node, {"type": "arm", "loader_http-arm64": "own/http.efi"}, CLI)
    loaders = load(engine).nodes[node].loaders
    assert loaders["uefi-arm64"] == "arm64/grubnetaa64.efi"  # the type's
    assert loaders["http-arm64"] == "own/http.efi"  # the node's own
    assert "loaders" in _audit(engine)[-1].detail
    edit.change(engine, "node", node, {"loader_http-arm64": ""}, CLI)
    assert "http-arm64" not in load(engine).nodes[node].loaders
    with pytest.raises(TestbedError, match="loaders.uefi-arm64: control characters"):
        edit.change(engine, "type", "arm", {"loader_uefi-arm64": "a\tb"}, CLI)

"""A snapshot built from testbed text in memory is the one a server loads after importing it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootherd.inventory.memory import snapshot_from_text, with_nodes
from bootherd.inventory.model import Snapshot
from bootherd.inventory.snapshot import load
from bootherd.inventory.testbed import (
    TestbedError,
    canonical,
    dump,
    export_testbed,
    generate,
    import_testbed,
)

# Every field the generator leaves at its default, set: vnodes, keys, NULL sentinels,
# per-node loaders, node children of every kind, experiments without a group.
EXTRA = """
[[node_types]]
name = "vm"
class = "pcvm"
loader_ipxe = "vm.ipxe"

[[os_images]]
name = "SYSID-ONLY"
kind = "part"
sysid = 131

[[os_images]]
name = "DISK2"
kind = "part"
partition = 2

[[ntp_servers]]
host = "ntp0"
kind = "peer"

[[groups]]
name = "ops"
gid = 7000

[[users]]
login = "alice"
uid = 20000
gid = 7000
groups = ["ops", "proj0"]
keys = ["ssh-ed25519 AAAA1 alice@a", "ssh-rsa AAAA2 alice@b"]

[[nodes]]
node_id = "host1"
type = "d430"
role = "virthost"
jailed = true
temp_os = "SYSID-ONLY"
next_os = "FRISBEE-MFS"
loader_uefi = "own.efi"
pxe_loader = "grubnetx64.efi"
boot_cmdline = "console=ttyS1"
bios_disk = 1
privkey = "0123456789abcdef"
ntp_drift = 1.5
  [[nodes.interfaces]]
  mac = "0A-00-00-00-00-01"
  ip = "10.99.0.1"
  mask = "255.255.255.0"
  role = "ctrl"
  iface = "eth0"
  [[nodes.interfaces]]
  mac = "0a00.0000.0002"
  role = "expt"
  iface = "eth1"
  lan = "lanA"
  [[nodes.routes]]
  dest = "10.250.0.0"
  destmask = "255.255.0.0"
  nexthop = "10.99.0.254"
  src = "10.99.0.1"
  [[nodes.tunnels]]
  lan = "tun0"
  member = "host1"
  key = "tunnel_ip"
  value = "192.168.7.1"
  [[nodes.tunnels]]
  lan = "tun0"
  member = "host1"
  key = "tunnel_style"
  value = "gre"

[[nodes]]
node_id = "vm1"
type = "vm"
phys_node_id = "host1"
default_os = "DISK2"
privkey = "fedcba9876543210"
  [[nodes.interfaces]]
  mac = "0a:00:00:00:01:01"
  ip = "10.99.1.1"
  mask = "255.255.255.0"
  role = "ctrl"
  iface = "eth0"

[[nodes]]
node_id = "vm2"
type = "vm"
phys_node_id = "host1"
  [[nodes.interfaces]]
  mac = "0a:00:00:00:01:02"
  role = "ctrl"
  iface = "eth0"

[[experiments]]
pid = "ops"
eid = "vms"
creator = "alice"
swapper = "alice"
startupcmd = "/bin/true"
  [[experiments.members]]
  login = "alice"
  root = true
  [[experiments.nodes]]
  node_id = "vm1"
  vname = "v1"
  startupcmd = "/bin/v1"
  [[experiments.nodes]]
  node_id = "host1"
  vname = "h"
  [[experiments.tarballs]]
  vname = "v1"
  dir = "/opt"
  path = "t/v1.tgz"
  [[experiments.tarballs]]
  dir = "/usr"
  path = "t/all.tgz"
  [[experiments.rpms]]
  vname = "h"
  path = "r/h.rpm"
"""


def _testbed(nodes: int) -> str:
    doc = tomllib.loads(generate(nodes, subnet="10.98.0.0/22", seed=5))
    for section, entries in tomllib.loads(EXTRA).items():
        doc[section] = doc.get(section, []) + entries
    return dump(doc)


def canon(v: Any) -> Any:
    """A comparable form that also tells 1 from 1.0 and True from 1 (== does not)."""
    if dataclasses.is_dataclass(v):
        return (type(v).__name__, tuple(canon(getattr(v, f.name)) for f in dataclasses.fields(v)))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((repr(canon(k)), canon(x)) for k, x in v.items())))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(canon(x) for x in v))
    if isinstance(v, str):  # the database's column names are str subclasses: same keys
        return ("str", str(v))
    return (type(v).__name__, v)


def assert_same(loaded: Snapshot, built: Snapshot) -> None:
    for f in dataclasses.fields(Snapshot):
        if f.name in ("generation", "change_id"):
            continue
        a, b = getattr(loaded, f.name), getattr(built, f.name)
        if isinstance(a, dict):
            assert a.keys() == b.keys(), f.name
            for k in a:
                assert canon(a[k]) == canon(b[k]), f"{f.name}[{k!r}]"
        else:
            assert canon(a) == canon(b), f.name


def test_memory_snapshot_equals_imported_and_loaded(engine):
    text = _testbed(80)
    import_testbed(engine, text)
    loaded = load(engine)
    built = snapshot_from_text(text)
    assert_same(loaded, built)
    # The extra entries did reach both, with their database NULLs.
    n = built.nodes["host1"]
    assert (n.jailed, n.bios_disk, n.phys_node_id, n.loaders["uefi"], n.loaders["bios"]) == \
        (True, 1, None, "own.efi", "undionly.kpxe")
    assert built.by_privkey["fedcba9876543210"].node_id == "vm1"
    assert built.vnodes == {"host1": ("vm1", "vm2")}
    assert built.nodes["vm2"].control_ip is None and "vm2" not in {
        x.node_id for x in built.by_ip.values()}
    assert built.os_images["SYSID-ONLY"].partition is None
    assert built.experiments[("ops", "vms")].gid is None
    assert [t["key"] for t in built.tunnels["host1"]] == ["tunnel_ip", "tunnel_style"]
    assert built.tarballs[("ops", "vms")] == (("v1", "/opt", "t/v1.tgz"), ("", "/usr", "t/all.tgz"))
    # Importing the export gives the same snapshot again (import is export's inverse).
    import_testbed(engine, export_testbed(engine))
    assert_same(load(engine), built)


def test_the_comparison_sees_a_difference(engine):
    """The equivalence test can fail: one changed field anywhere is caught."""
    text = _testbed(10)
    import_testbed(engine, text)
    loaded = load(engine)
    built = snapshot_from_text(text)
    drift = dataclasses.replace(built.nodes["pc3"], ntp_drift=built.nodes["pc3"].ntp_drift + 1)
    with pytest.raises(AssertionError, match=r"nodes\['pc3'\]"):
        assert_same(loaded, dataclasses.replace(built, nodes={**built.nodes, "pc3": drift}))
    with pytest.raises(AssertionError, match="ntp_servers"):
        assert_same(loaded, dataclasses.replace(built, ntp_servers=built.ntp_servers[::-1]))
    one = dataclasses.replace(built.users["alice"], serial=True)  # True == 1, but not the same
    with pytest.raises(AssertionError, match="users"):
        assert_same(loaded, dataclasses.replace(built, users={**built.users, "alice": one}))


BAD_FILES = {
    "duplicate MAC": lambda t: t.replace('mac = "0a:00:00:00:01:02"', 'mac = "0a:00:00:00:01:01"'),
    "duplicate IP": lambda t: t.replace('ip = "10.99.1.1"', 'ip = "10.99.0.1"'),
    "unknown host": lambda t: t.replace('phys_node_id = "host1"', 'phys_node_id = "host9"', 1),
    "unknown image": lambda t: t.replace('default_os = "DISK2"', 'default_os = "NOPE"'),
    "wrong type": lambda t: t.replace('jailed = true', 'jailed = "yes"'),
    "unknown group": lambda t: t.replace('"proj0",\n]', '"nogroup",\n]'),
    "duplicate vname": lambda t: t.replace('{ node_id = "host1", vname = "h" }',
                                           '{ node_id = "host1", vname = "v1" }'),
    "duplicate node": lambda t: t.replace('node_id = "vm2"', 'node_id = "vm1"'),
    "unknown section": lambda t: t + "\n[colours]\n",
    "not TOML": lambda t: t + "\n[[nodes\n",
    # What the database refuses is refused first, with the entry's name, on both backends.
    "group twice": lambda t: t.replace('"proj0",\n]', '"ops",\n]'),
    "member twice": lambda t: t.replace('{ login = "alice", root = true },',
                                        '{ login = "alice", root = true },\n    { login = "alice" },'),
    "too long": lambda t: t.replace('node_id = "vm2"', 'node_id = "' + "v" * 65 + '"'),
    "beyond 32 bits": lambda t: t.replace('uid = 20000', 'uid = 4294967296'),
    "not a number": lambda t: t.replace('ntp_drift = 1.5', 'ntp_drift = nan'),
    "infinite": lambda t: t.replace('ntp_drift = 1.5', 'ntp_drift = -inf'),
    "NUL character": lambda t: t.replace('"console=ttyS1"', '"console=\\u0000ttyS1"'),
}


@pytest.mark.parametrize("mutate", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_same_validation_errors_as_import(engine, mutate):
    good, bad = _testbed(4), mutate(_testbed(4))
    assert bad != good, "the mutation must apply"
    import_testbed(engine, good)
    with pytest.raises(TestbedError) as from_import:
        import_testbed(engine, bad)
    with pytest.raises(TestbedError) as from_text:
        snapshot_from_text(bad)
    assert str(from_text.value) == str(from_import.value)
    assert export_testbed(engine) == canonical(good)  # nothing of the bad file was written


def test_with_nodes_rebuilds_indexes_and_moves_the_generation():
    snap = snapshot_from_text(_testbed(6), generation=7)
    pc1 = snap.nodes["pc1"]
    moved = dataclasses.replace(pc1, privkey="k", interfaces=pc1.interfaces[:1], next_os="DISK2")
    after = with_nodes(snap, moved, removed=["vm2"])
    assert after.generation == 8 and snap.generation == 7
    assert after.by_privkey["k"] is moved and after.nodes["pc1"].next_os == "DISK2"
    assert pc1.interfaces[1].mac in snap.by_mac and pc1.interfaces[1].mac not in after.by_mac
    assert "vm2" not in after.nodes and after.vnodes == {"host1": ("vm1",)}


def test_building_from_text_loads_no_database_driver():
    code = ("import sys\n"
            "from bootherd.inventory.memory import snapshot_from_text\n"
            "from bootherd.inventory.testbed import generate\n"
            "assert len(snapshot_from_text(generate(3)).nodes) == 3\n"
            "print(sorted(m for m in sys.modules if m.startswith(('sqlite3', '_sqlite3', "
            "'psycopg', 'sqlalchemy.dialects.'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _like(v: Any) -> st.SearchStrategy:
    """Values of the field's own type, edges included (NaN, NUL, huge numbers, long text)."""
    if isinstance(v, bool):
        return st.booleans()
    if isinstance(v, float):
        return st.floats(allow_nan=True, allow_infinity=True)
    if isinstance(v, int):
        return st.integers(-2**64, 2**64)
    if isinstance(v, str):
        return st.text(max_size=300) | st.sampled_from(["", "\x00", v + "\x00", v * 40])
    return _VALUES


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(),
                    st.text(max_size=80), st.lists(st.text(max_size=5), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_edit_of_a_file_is_refused_by_name_or_imports(sqlite_engine, data):
    """A testbed with one field set to anything: a TestbedError from both paths, or an
    import that succeeds and loads the snapshot built in memory."""
    doc = tomllib.loads(_testbed(3))
    section = data.draw(st.sampled_from(sorted(doc)))
    entry = data.draw(st.sampled_from(doc[section]))
    child = [k for k, v in entry.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if child and data.draw(st.booleans()):
        entry = data.draw(st.sampled_from(entry[data.draw(st.sampled_from(child))]))
    field_name = data.draw(st.sampled_from(sorted(entry) + ["extra"]))
    value = data.draw(st.one_of(_VALUES, _like(entry.get(field_name))))
    if value is None:
        entry.pop(field_name, None)
    else:
        entry[field_name] = value
    try:
        text = dump(doc)
    except (TypeError, ValueError):  # not representable in TOML (NaN is): nothing to test
        return
    try:
        snap = snapshot_from_text(text)
    except TestbedError as e:
        with pytest.raises(TestbedError, match=re.escape(str(e))):
            import_testbed(sqlite_engine, text)
        return
    import_testbed(sqlite_engine, text)
    assert_same(load(sqlite_engine), snap)

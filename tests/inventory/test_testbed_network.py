"""Testbed addresses an operator gets wrong on day one: generated files that follow the
subnet and server asked for, and imports that refuse or warn, naming the entry, about
what the DHCP server would hand out wrongly or never."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import tomllib

import pytest
import tomli_w

from bootherd.config import build
from bootherd.inventory import netcheck
from bootherd.inventory.testbed import TestbedError, generate, parse

PY = sys.executable


def test_generate_follows_subnet_without_loopback() -> None:
    text = generate(20, subnet="10.252.0.0/16")
    assert "127.0.0.1" not in text and "127." not in text
    doc = tomllib.loads(text)
    mfs = {i["name"]: i["path"] for i in doc["os_images"] if i["kind"] == "mfs"}
    assert mfs == {"FRISBEE-MFS": "/tftpboot/frisbee", "NEWNODE-MFS": "/tftpboot/newnode"}
    net = ipaddress.IPv4Network("10.252.0.0/16")
    for n in doc["nodes"]:
        ctrl = [i for i in n["interfaces"] if i["role"] == "ctrl"][0]
        assert ipaddress.IPv4Address(ctrl["ip"]) in net and ctrl["mask"] == "255.255.0.0"
        assert ctrl["ip"] != "10.252.0.1"  # the server's / gateway's


def test_generate_names_the_given_server_and_keeps_lans_off_the_subnet() -> None:
    doc = tomllib.loads(generate(30, subnet="10.200.0.0/16", server="10.200.0.2"))
    paths = [i["path"] for i in doc["os_images"] if i["kind"] == "mfs"]
    assert paths and all(p.startswith("10.200.0.2:/") for p in paths)
    ctrl_net = ipaddress.IPv4Network("10.200.0.0/16")
    ips = set()
    for n in doc["nodes"]:
        for itf in n["interfaces"]:
            if not itf["ip"]:
                continue
            ips.add(itf["ip"])
            inside = ipaddress.IPv4Address(itf["ip"]) in ctrl_net
            assert inside == (itf["role"] == "ctrl"), itf
        for r in n["routes"]:
            assert ipaddress.IPv4Address(r["dest"]) not in ctrl_net
    assert "10.200.0.2" not in ips and "10.200.0.1" not in ips


def _one_node(**itf: object) -> str:
    doc = tomllib.loads(generate(2, subnet="10.252.0.0/16"))
    doc["nodes"][1]["interfaces"] = [{"mac": "02:aa:00:00:00:01", **itf}]
    return tomli_w.dumps(doc)


@pytest.mark.parametrize(("itf", "message"), [
    ({"ip": "10.252.0.9", "role": "ctrl"}, "nodes[1] (pc2).interfaces[0].mask: required"),
    ({"ip": "10.252.0.9", "mask": "255.0.255.0", "role": "ctrl"},
     "nodes[1] (pc2).interfaces[0].mask: 255.0.255.0 is not a netmask"),
    ({"ip": "10.252.0.0", "mask": "255.255.0.0", "role": "ctrl"},
     "nodes[1] (pc2).interfaces[0].ip: 10.252.0.0 is the network or broadcast"),
    ({"ip": "10.252.0.9", "mask": "255.255.0.0"},
     "nodes[1] (pc2).interfaces[0].role: not set, and pc2 has no control interface"),
])
def test_parse_refuses_interfaces_dhcp_cannot_serve(itf: dict, message: str) -> None:
    with pytest.raises(TestbedError) as e:
        parse(_one_node(**itf))
    assert str(e.value).startswith(message), str(e.value)


def test_route_masks_must_be_contiguous() -> None:
    doc = tomllib.loads(generate(2, subnet="10.252.0.0/16"))
    doc["nodes"][0]["routes"] = [{"dest": "10.9.0.0", "destmask": "255.255.1.0",
                                  "nexthop": "10.252.0.1"}]
    with pytest.raises(TestbedError, match=r"nodes\[0\] \(pc1\)\.routes\[0\]\.destmask"):
        parse(tomli_w.dumps(doc))


def test_explicit_expt_only_nodes_and_roleless_extra_interfaces_stay_legal() -> None:
    doc = tomllib.loads(generate(2, subnet="10.252.0.0/16"))
    doc["nodes"][0]["interfaces"].append({"mac": "02:aa:00:00:00:09"})  # expt by default
    doc["nodes"][1]["interfaces"] = [{"mac": "02:aa:00:00:00:01", "role": "expt"}]
    parse(tomli_w.dumps(doc))


LOCAL = [("lo", ipaddress.IPv4Interface("127.0.0.1/8")),
         ("veth0", ipaddress.IPv4Interface("10.252.0.1/16"))]


def test_check_refuses_the_servers_address_and_warns_off_subnet() -> None:
    doc = tomllib.loads(generate(4, subnet="10.252.0.0/16"))
    ctrl = [n["interfaces"][0] for n in doc["nodes"]]
    ctrl[0]["ip"] = "10.252.0.1"                              # the server's own
    ctrl[1]["ip"], ctrl[1]["mask"] = "10.9.0.5", "255.255.255.0"  # another subnet
    ctrl[2]["mask"] = "255.255.255.0"                         # /24 on a /16
    cfg = build({"dhcp": {"address": "0.0.0.0"}})
    problems = netcheck.check(parse(tomli_w.dumps(doc)), cfg, LOCAL)
    text = [(str(p), p.fatal) for p in problems]
    assert text == [
        ("nodes[0] (pc1).interfaces[0].ip: 10.252.0.1 is this server's own address "
         "(the address of veth0)", True),
        ("nodes[1] (pc2).interfaces[0].ip: 10.9.0.5 is outside every subnet the DHCP server "
         "is on (10.252.0.0/16 on veth0): it is answered only through a relay (giaddr)", False),
        ("nodes[2] (pc3).interfaces[0].mask: 255.255.255.0 (/24) but the DHCP server's "
         "subnet is 10.252.0.0/16 on veth0", False),
    ]
    # A configured address counts too, wherever the import runs.
    cfg = build({"server": {"public_address": "10.252.0.3"}})
    problems = netcheck.check(parse(generate(4, subnet="10.252.0.0/16")), cfg, [])
    assert [str(p) for p in problems] == [
        "nodes[1] (pc2).interfaces[0].ip: 10.252.0.3 is this server's own address "
        "(server.public_address)"]


def test_import_cli_refuses_and_warns_naming_entries(tmp_path) -> None:  # noqa: ANN001
    db = f"sqlite:///{tmp_path}/i.db"
    subprocess.run([PY, "-m", "bootherd.cli", "db", "upgrade", "--db", db], check=True,
                   capture_output=True)
    doc = tomllib.loads(generate(3, subnet="127.30.0.0/16"))
    doc["nodes"][2]["interfaces"][0]["ip"] = "127.0.0.1"
    bad = tmp_path / "bad.toml"
    bad.write_text(tomli_w.dumps(doc))
    r = subprocess.run([PY, "-m", "bootherd.cli", "testbed", "import", str(bad), "--db", db],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert f"bootherd: {bad}: nodes[2] (pc3).interfaces[0].ip: 127.0.0.1 is this server's " \
        "own address" in r.stderr
    good = tmp_path / "good.toml"
    good.write_text(generate(3, subnet="10.77.0.0/16"))  # DHCP on 127.0.0.1: lo's /8
    r = subprocess.run([PY, "-m", "bootherd.cli", "testbed", "import", str(good), "--db", db],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"warning: {good}: nodes[0] (pc1).interfaces[0].ip: 10.77.0.2 is outside every " \
        "subnet" in r.stderr


def test_import_errors_name_the_file(tmp_path) -> None:  # noqa: ANN001
    db = f"sqlite:///{tmp_path}/i.db"
    bad = tmp_path / "rack.toml"
    bad.write_text('nodes = [\n{ node_id = "pc1"\n')
    # A wrong file is a usage error (2), one that cannot be read a failure (1): README.
    for path, message, code in (
            (bad, "not valid TOML: ", 2),
            (tmp_path / "none.toml", "cannot read the testbed file: No such file", 1),
            (tmp_path, "cannot read the testbed file: Is a directory", 1)):
        r = subprocess.run([PY, "-m", "bootherd.cli", "testbed", "import", str(path), "--db",
                            db], capture_output=True, text=True)
        assert r.returncode == code and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"bootherd: {path}: {message}"), r.stderr
    assert not (tmp_path / "i.db").exists()  # refused before any inventory is opened

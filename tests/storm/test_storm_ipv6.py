"""The storm's IPv6 profile against a live `bootherd serve` (DHCPv6, TFTP and HTTP on an
IPv6 address), in a network namespace of the test's own.

The namespace routes a whole prefix to lo (`ip -6 route add local fd99::/64 dev lo`), so
every node speaks from its own inventory address; the storm's relay agent forwards the
nodes' DHCPv6 to the server.  80 nodes, every other one PXE over IPv6 (TFTP) and HTTP
boot: each gets its own inventory address and its architecture's boot URL, and fetches
the whole loader from it; the lease rows hold the nodes' addresses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from bootherd.dhcp.netns import TestNet, usable
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.snapshot import load
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.storm import dhcp6 as storm6
from bootherd.storm.clients import ProtocolFailure
from bootherd.storm.runner import Settings

PY = sys.executable
PREFIX6 = "fd99::/64"
SERVER6 = "fd99::1"
RELAY6 = "fd99::ff:1"
NODES = 80
LOADER_BYTES = 150_000
TFTP_PORT, HTTP_PORT, DHCP6_PORT = 1069, 8080, 5547  # the namespace's own ports


def test_boot_target_reads_both_url_kinds() -> None:
    assert storm6.boot_target("tftp://[fd99::1]/snponly.efi", 1069, 8080) == (
        "tftp", ("fd99::1", 1069), "/snponly.efi")
    assert storm6.boot_target("http://[FD99:0::1]:81/boot/ipxe.efi", 1069, 8080) == (
        "http", ("fd99::1", 81), "/boot/ipxe.efi")
    with pytest.raises(ProtocolFailure):
        storm6.boot_target("nfs://[fd99::1]/x", 69, 80)


def test_link_local_is_the_eui64_the_server_reads_back() -> None:
    from ipaddress import IPv6Address

    from bootherd.dhcp6.codec import eui64_mac

    mac = bytes.fromhex("02aabbccddee")
    assert eui64_mac(str(IPv6Address(storm6.link_local(mac)))) == mac


@pytest.mark.parametrize("kw, word", [
    ({"phases": ("dhcp", "tftp", "os")}, "phases"),
    ({"phases": ("tftp",)}, "phases"),
    ({"relay_address": "127.0.0.1"}, "--relay-address"),
    ({"boot6": "nfs"}, "boot6"),
])
def test_ipv6_settings_refused_naming_the_setting(kw: dict, word: str) -> None:
    st = Settings(nodes=1, family=6, phases=("dhcp", "tftp"), relay_address=RELAY6)
    for k, v in kw.items():
        setattr(st, k, v)
    with pytest.raises(ValueError, match=word):
        st.check()


@pytest.mark.netns
@pytest.mark.skipif(usable() is not None, reason=usable() or "")
def test_small_ipv6_storm_pxe_and_http(tmp_path: Path) -> None:
    d = tmp_path
    e = make_engine(f"sqlite:///{d}/i.db")
    upgrade(e)
    import_testbed(e, generate(NODES + 4, subnet="127.93.0.0/16", subnet6=PREFIX6, seed=4))
    snap = load(e)
    e.dispose()
    (d / "tftpboot").mkdir()
    (d / "www").mkdir()
    cfg = d / "bootherd.toml"
    cfg.write_text("\n".join([
        f'[database]\nurl = "sqlite:///{d}/i.db"',
        f'[server]\npublic_address6 = "{SERVER6}"',
        "[dhcp]\nenabled = false",
        f'[dhcp6]\nenabled = true\naddress = "{SERVER6}"\nport = {DHCP6_PORT}',
        f'[tftp]\naddress = "{SERVER6}"\nport = {TFTP_PORT}\nroot = "{d}/tftpboot"',
        f'[http]\naddress = "{SERVER6}"\nport = {HTTP_PORT}\nroot = "{d}/www"',
        f'log_dir = "{d}/nodelogs"\nadmin_token_file = "{d}/admin-token"', ""]))
    with TestNet() as net:
        ns = net.server
        net.sh(ns, f"ip -6 addr add {SERVER6}/128 dev lo && "
                   f"ip -6 route add local {PREFIX6} dev lo")
        log = d / "serve.log"
        p = net.spawn(ns, [PY, "-m", "bootherd.cli", "serve", "--only", "dhcp6,tftp,http",
                           "--config", str(cfg)], log, cwd=d)
        for _ in range(300):
            if "bootherd ready" in log.read_text(errors="replace") or p.poll() is not None:
                break
            time.sleep(0.05)
        assert "bootherd ready" in log.read_text(errors="replace"), log.read_text()
        out = d / "storm.json"
        run = subprocess.run(
            ["ip", "netns", "exec", ns, PY, "-m", "bootherd.cli", "storm", "-c", str(cfg),
             "--family", "6", "--boot6", "mixed", "--nodes", str(NODES), "--workers", "2",
             "--relay-address", RELAY6, "--loader-bytes", str(LOADER_BYTES), "--timeout",
             "120", "--json", str(out), "-q"],
            cwd=d, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stdout + run.stderr + log.read_text()
    doc = json.loads(out.read_text())
    summary, nodes = doc["summary"], doc["nodes"]
    assert summary["family"] == 6 and summary["failed"] == 0
    assert summary["reached_isup"] == NODES and len(nodes) == NODES
    assert {n["boot6"] for n in nodes} == {"pxe", "http"}
    for n in nodes:
        inv = snap.nodes[n["node"]]
        assert n["granted"] == inv.control_ip6 == n["ip"], n
        if n["boot6"] == "pxe":
            assert n["boot_url"] == f"tftp://[{SERVER6}]/{inv.loaders['uefi']}", n
            assert n["bytes_tftp"] == LOADER_BYTES and n["requests"]["tftp"] >= 2, n
        else:
            assert n["boot_url"] == \
                f"http://[{SERVER6}]:{HTTP_PORT}/boot/{inv.loaders['http']}", n
            assert n["bytes_http"] == LOADER_BYTES and n["requests"]["http"] >= 1, n
        assert n["requests"]["dhcp6"] >= 2, n  # SOLICIT, REQUEST
    e = make_engine(f"sqlite:///{d}/i.db")
    try:
        with e.connect() as conn:
            leases = {r.node_id: r.ip for r in conn.execute(
                select(s.leases).where(s.leases.c.ip.like("fd99:%")))}
    finally:
        e.dispose()
    assert leases == {n["node"]: n["granted"] for n in nodes}

"""DHCPv6 conformance with real clients: ISC dhclient -6 and dhcpcd against
`bootherd serve --only dhcp6` in throw-away namespaces, with radvd's router
advertisements (managed flag) on the link as a provisioning network has them.

Server namespace: veth-s fd13::1/64, bootherd bound to fd13::1 joining ff02::1:2 on
veth-s, radvd; client namespace: br0 holding the peer, the clients run there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootherd.dhcp.netns import PREFIX, TestNet, usable
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.testbed import generate, import_testbed

why = usable()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(why is not None, reason=why or "")]
PY = sys.executable
SERVER6 = "fd13::1"
POOL = "fd13::1000-fd13::1fff"
RADVD_CONF = """interface veth-s {
    AdvSendAdvert on;
    MinRtrAdvInterval 3;
    MaxRtrAdvInterval 4;
    AdvManagedFlag on;
    AdvOtherConfigFlag on;
    AdvDefaultLifetime 0;
    prefix fd13::/64 { AdvOnLink on; AdvAutonomous off; };
};
"""
# dhclient -6 as a PXE client: the boot options it sends and asks for, by number.
DHCLIENT_CONF = """option dhcp6.bootfile-url code 59 = string;
option dhcp6.client-arch code 61 = unsigned integer 16;
option dhcp6.vendor-class-pxe code 16 = {integer 32, integer 16, string};
send dhcp6.client-arch 7;
send dhcp6.vendor-class-pxe 343 32 "PXEClient:Arch:00007:UNDI:003000";
request dhcp6.bootfile-url;
"""
HOOK = "#!/bin/sh\nenv > \"{out}.$reason\"\n"


def need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed")


def with_ip6(text: str, count: int) -> str:
    """The testbed with control IPv6 addresses fd13::<n+1> on its first `count` nodes."""
    head, sep, tail = text.partition("[[nodes]]")
    chunks = tail.split("[[nodes.interfaces]]")
    n = 0
    for i, c in enumerate(chunks):
        if 'role = "ctrl"' in c and n < count:
            n += 1
            chunks[i] = c.replace('ip6 = ""', f'ip6 = "fd13::{n + 1:x}"', 1)
    return head + sep + "[[nodes.interfaces]]".join(chunks)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: Any) -> Iterator[tuple[TestNet, Path, list]]:
    need("radvd")
    d = tmp_path_factory.mktemp("dhcp6ns")
    e = make_engine(f"sqlite:///{d}/i.db")
    upgrade(e)
    import_testbed(e, with_ip6(generate(10, subnet=f"{PREFIX}.0.0/24"), 4))
    from bootherd.inventory.snapshot import load

    snap = load(e)
    e.dispose()
    nodes = sorted((n for n in snap.nodes.values() if n.control_ip6), key=lambda n: n.node_id)
    net = TestNet()
    try:
        net.sh(net.server, f"ip -6 addr add {SERVER6}/64 dev veth-s nodad")
        for ns, dev in ((net.client, "br0"), (net.server, "veth-s")):
            _wait_dad(net, ns, dev)
        cfg = d / "bootherd.toml"
        cfg.write_text("\n".join([
            f'[database]\nurl = "sqlite:///{d}/i.db"', f'[server]\npublic_address = "{SERVER6}"',
            "[dhcp]\nenabled = false",
            f'[dhcp6]\nenabled = true\naddress = "{SERVER6}"\nport = 547\ninterface = "veth-s"',
            f'unknown_clients = "pool"\npool = "{POOL}"', f"dns_servers = {json.dumps([SERVER6])}",
            "rapid_commit = false", ""]))
        log = d / "bootherd.log"
        p = net.spawn(net.server, [PY, "-m", "bootherd.cli", "serve", "--only", "dhcp6",
                                   "--config", str(cfg)], log)
        for _ in range(200):
            if "bootherd ready" in log.read_text(errors="replace") or p.poll() is not None:
                break
            time.sleep(0.05)
        assert "bootherd ready" in log.read_text(errors="replace"), log.read_text()
        (d / "radvd.conf").write_text(RADVD_CONF)
        net.spawn(net.server, ["radvd", "-n", "-C", str(d / "radvd.conf"), "-p",
                               str(d / "radvd.pid"), "-m", "stderr"], d / "radvd.log")
        yield net, d, nodes
    finally:
        net.close()


def _wait_dad(net: TestNet, ns: str, dev: str) -> None:
    for _ in range(100):
        if not net.sh(ns, f"ip -6 addr show dev {dev} tentative").stdout.strip():
            return
        time.sleep(0.1)


def _env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v.strip("'")
    return out


def test_dhclient6_gets_its_inventory_address_and_boot_url(lab) -> None:
    need("dhclient")
    net, d, nodes = lab
    node = nodes[0]
    net.sh(net.client, f"ip link set br0 address {node.control_mac}")
    _wait_dad(net, net.client, "br0")
    (d / "dhclient6.conf").write_text(DHCLIENT_CONF)
    out = d / "dhcl6-env"
    hook = d / "dhcl6-hook"
    hook.write_text(HOOK.format(out=out))
    hook.chmod(0o755)
    r = net.sh(net.client, f"timeout -k 2 30 dhclient -6 -1 -v -cf {d}/dhclient6.conf "
               f"-lf {d}/dhcl6.leases -pf {d}/dhcl6.pid -sf {hook} br0", check=False)
    bound = Path(f"{out}.BOUND6")
    assert bound.exists(), f"dhclient -6 did not bind:\n{r.stdout}\n{r.stderr}\n" \
        + (d / "bootherd.log").read_text()[-2000:]
    env = _env(bound)
    assert env["new_ip6_address"] == node.control_ip6
    assert env.get("new_dhcp6_bootfile_url") == f"tftp://[{SERVER6}]/snponly.efi", env
    assert env.get("new_dhcp6_name_servers") == SERVER6
    leases = (d / "dhcl6.leases").read_text()
    assert "preferred-life 86400" in leases
    # RELEASE is answered (dhclient -r waits for the REPLY).
    r = net.sh(net.client, f"timeout -k 2 20 dhclient -6 -r -cf {d}/dhclient6.conf "
               f"-lf {d}/dhcl6.leases -pf {d}/dhcl6.pid -sf {hook} br0", check=False)
    assert Path(f"{out}.RELEASE6").exists(), r.stderr


def test_dhcpcd_after_a_router_advertisement_gets_a_pool_address(lab) -> None:
    """dhcpcd solicits a router, sees radvd's managed flag, then runs DHCPv6; its MAC is
    not in the inventory, so it gets a pool address."""
    need("dhcpcd")
    net, d, _ = lab
    # A host of its own on the link (veth-p, a fresh MAC the inventory does not know).
    peer = net.add_peer(f"{PREFIX}.9.1")
    _wait_dad(net, peer, "veth-p")
    out = d / "dhcpcd-env"
    hook = d / "dhcpcd-hook"
    hook.write_text(HOOK.format(out=out))
    hook.chmod(0o755)
    conf = d / "dhcpcd.conf"
    conf.write_text("ipv6only\nnoipv4ll\nia_na 1\nnohook resolv.conf\n")
    # dhcpcd keeps its DUID and leases in /var/lib/dhcpcd: give it a folder of its own
    # (`ip netns exec` runs it in a mount namespace of its own, the host's stays as it is).
    # On a fresh machine neither mount point exists until dhcpcd has run once: make them
    # (empty folders, what dhcpcd itself would create).
    (d / "dhcpcd-db").mkdir(exist_ok=True)
    (d / "dhcpcd-run").mkdir(exist_ok=True)
    cmd = (f"mkdir -p /var/lib/dhcpcd /run/dhcpcd && "
           f"mount --bind {d}/dhcpcd-db /var/lib/dhcpcd && mount --bind {d}/dhcpcd-run "
           f"/run/dhcpcd && exec timeout -k 2 40 dhcpcd -6 -1 -B -f {conf} -c {hook} veth-p")
    with open(d / "dhcpcd.out", "wb") as f:
        subprocess.run(["ip", "netns", "exec", peer, "sh", "-c", cmd], stdout=f,
                       stderr=subprocess.STDOUT, check=False)
    text = (d / "dhcpcd.out").read_text(errors="replace")
    bound = [p for p in d.glob("dhcpcd-env.*") if p.suffix in (".BOUND6", ".REBOOT6")]
    assert bound, f"dhcpcd did not bind:\n{text}\n" + (d / "bootherd.log").read_text()[-2000:]
    env = _env(bound[0])
    addr = env.get("new_dhcp6_ia_na1_ia_addr1", "")
    assert addr.startswith("fd13::1"), env
    import ipaddress

    assert 0x1000 <= int(ipaddress.IPv6Address(addr)) & 0xFFFF <= 0x1FFF
    assert "RA" in text or "Router Advertisement" in text or "router" in text.lower(), text

"""Real clients against `bootherd serve --only dhcp` in throw-away network namespaces.

Server namespace: veth-s 10.213.0.1/16, bootherd on 0.0.0.0:67.  Client namespace: bridge
br0 holding the veth peer; clients (dhclient, busybox udhcpc, perfdhcp as a relay) run
there.  The proxyDHCP test adds a third namespace on br0 with dnsmasq handing out addresses.
Needs root and the binaries; each test skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootherd.dhcp.netns import PREFIX, SERVER_IP, TestNet, usable
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.testbed import generate, import_testbed

why = usable()
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")
PY = sys.executable
HOOK = "#!/bin/sh\nenv > \"{out}.$reason\"\n"  # dhclient passes the script a clean env
UDHCPC_HOOK = "#!/bin/sh\nenv > \"{out}.$1\"\n"


def need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed")


@pytest.fixture(scope="module")
def net() -> Iterator[TestNet]:
    n = TestNet()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: Any) -> tuple[Path, list[tuple[str, str, str]]]:
    d = tmp_path_factory.mktemp("dhcpns")
    return d, make_inventory(d, 20, f"{PREFIX}.0.0/24")


def make_inventory(d: Path, count: int, subnet: str) -> list[tuple[str, str, str]]:
    """A generated testbed in d/i.db: its nodes' (id, control MAC, control IP), in order."""
    from bootherd.inventory.snapshot import load

    e = make_engine(f"sqlite:///{d}/i.db")
    upgrade(e)
    import_testbed(e, generate(count, subnet=subnet))
    snap = load(e)
    e.dispose()
    return sorted(((n.node_id, n.control_mac, n.control_ip) for n in snap.nodes.values()),
                  key=lambda x: int(x[0][2:]))


def write_config(d: Path, name: str, **dhcp: Any) -> Path:
    lines = [f'[database]\nurl = "sqlite:///{d}/i.db"\n',
             f'[server]\npublic_address = "{SERVER_IP}"\n', "[dhcp]",
             'address = "0.0.0.0"', "port = 67"]
    for k, v in dhcp.items():
        lines.append(f"{k} = {json.dumps(v)}")
    p = d / f"{name}.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def start_server(net: TestNet, cfg: Path, log: Path) -> subprocess.Popen[Any]:
    p = net.spawn(net.server, [PY, "-m", "bootherd.cli", "serve", "--only", "dhcp",
                               "--config", str(cfg)], log)
    for _ in range(200):
        if "bootherd ready" in log.read_text(errors="replace"):
            return p
        if p.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"bootherd did not start:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def server(net: TestNet, nodes: Any) -> Iterator[subprocess.Popen[Any]]:
    d, _ = nodes
    cfg = write_config(d, "auth", unknown_clients="pool",
                       dynamic_pool=f"{PREFIX}.16.1-{PREFIX}.31.254", routers=[SERVER_IP])
    p = start_server(net, cfg, d / "auth.log")
    yield p
    net.kill(p)


def hook(d: Path, name: str, text: str) -> Path:
    h = d / name
    h.write_text(text)
    h.chmod(0o755)
    return h


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v.strip("'")
    return out


def test_dhclient_gets_inventory_address_and_boot_file(net: TestNet, nodes: Any,
                                                       server: Any) -> None:
    need("dhclient")
    d, ns = nodes
    node_id, mac, ip = ns[0]
    net.sh(net.client, f"ip link set br0 address {mac}")
    out = d / "dhclient-env"
    h = hook(d, "dhclient-hook", HOOK.format(out=out))
    r = net.sh(net.client, f"timeout -k 2 20 dhclient -1 -lf {d}/dhcl.leases "
               f"-pf {d}/dhcl.pid -sf {h} br0", check=False)
    try:
        env = read_env(Path(f"{out}.BOUND"))
    except FileNotFoundError:
        raise AssertionError(f"dhclient did not bind: {r.stdout} {r.stderr}") from None
    finally:
        pid = (d / "dhcl.pid").read_text().strip() if (d / "dhcl.pid").exists() else ""
        if pid.isdigit():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
    assert env["new_ip_address"] == ip
    assert env["new_filename"] == "undionly.kpxe"
    assert env["new_next_server"] == SERVER_IP
    assert env["new_host_name"] == node_id
    assert env["new_dhcp_server_identifier"] == SERVER_IP


def test_udhcpc_pxe_gets_inventory_address_and_boot_file(net: TestNet, nodes: Any,
                                                         server: Any) -> None:
    need("busybox")
    d, ns = nodes
    node_id, mac, ip = ns[1]
    net.sh(net.client, f"ip link set br0 address {mac}")
    out = d / "udhcpc-env"
    h = hook(d, "udhcpc-hook", UDHCPC_HOOK.format(out=out))
    r = net.sh(net.client, f"timeout -k 2 20 busybox udhcpc -i br0 -n -q -f "
               f"-s {h} -V PXEClient:Arch:00000:UNDI:002001 -x 93:0000", check=False)
    try:
        env = read_env(Path(f"{out}.bound"))
    except FileNotFoundError:
        raise AssertionError(f"udhcpc did not bind: {r.stdout} {r.stderr}") from None
    assert env["ip"] == ip
    assert env["boot_file"] == "undionly.kpxe"
    assert env["siaddr"] == SERVER_IP
    assert env["serverid"] == SERVER_IP


def perfdhcp(net: TestNet, args: str) -> dict[str, Any]:
    local = f"{PREFIX}.0.250"
    net.sh(net.client, f"ip addr replace {local}/16 dev br0")
    r = net.sh(net.client, f"timeout -k 2 90 perfdhcp -4 -l {local} {args} {SERVER_IP}",
               check=False)
    return parse_perfdhcp(r.stdout + r.stderr)


def parse_perfdhcp(text: str) -> dict[str, Any]:
    """Exchange sections of perfdhcp's report: sent/received/drops per exchange."""
    out: dict[str, Any] = {"text": text}
    for name, body in re.findall(r"Statistics for: ([A-Z-]+)\*+\n(.*?)(?:\n\n|\Z)", text, re.S):
        vals = dict(re.findall(r"^([a-z ]+): ([\d.]+)", body, re.M))
        out[name] = {k: float(v) for k, v in vals.items()}
    m = re.search(r"Rate: ([\d.]+) 4-way", text)
    out["rate"] = float(m.group(1)) if m else 0.0
    return out


def test_perfdhcp_avalanche_and_rate(net: TestNet, server: Any) -> None:
    need("perfdhcp")
    res = perfdhcp(net, "--scenario avalanche -R 1000")
    for ex in ("DISCOVER-OFFER", "REQUEST-ACK"):
        assert res[ex]["sent packets"] == 1000, res["text"]
        assert res[ex]["received packets"] == 1000, res["text"]
        assert res[ex]["rejected leases"] == 0 and res[ex]["non unique addresses"] == 0
    res = perfdhcp(net, "-r 300 -p 3 -R 1000 -W 1000000")
    for ex in ("DISCOVER-OFFER", "REQUEST-ACK"):
        assert res[ex]["sent packets"] > 300, res["text"]
        assert res[ex]["received packets"] == res[ex]["sent packets"], res["text"]


PROXY_CLIENT = r"""
import json, socket, subprocess, sys, time
from bootherd.dhcp.codec import DhcpMessage, decode, encode
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
pxe = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0", 55: bytes([1, 3, 43, 60, 66, 67])}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, 25, b"br0\0")
s.bind(("0.0.0.0", 68))
s.settimeout(0.3)
def ask(mtype, extra, dest, want, until=2.0, sid=None):
    msg = DhcpMessage(1, xid=0x4242, chaddr=mac, flags=0x8000, options={53: bytes([mtype]), **pxe, **extra})
    s.sendto(encode(msg), dest)
    got, end = [], time.time() + until
    while time.time() < end and len(got) < want:
        try:
            m = decode(s.recv(2048))
        except socket.timeout:
            continue
        if sid is None or m.options.get(54) == sid:
            got.append(m)
    return got
offers = ask(1, {}, ("255.255.255.255", 67), 99, until=2.5)  # every offer
addr = [o for o in offers if o.yiaddr != b"\0\0\0\0"][0]
proxy = [o for o in offers if o.yiaddr == b"\0\0\0\0"][0]
ack = ask(3, {54: addr.options[54], 50: addr.yiaddr}, ("255.255.255.255", 67), 1,
          sid=addr.options[54])[0]
ip = socket.inet_ntoa(ack.yiaddr)
subprocess.run(["ip", "addr", "add", ip + "/16", "dev", "br0"], check=True)
s.settimeout(0.3)
boot = ask(3, {}, (socket.inet_ntoa(proxy.options[54]), 4011), 1, sid=proxy.options[54])[0]
print(json.dumps({
    "ip": ip, "addr_server": socket.inet_ntoa(addr.options[54]), "addr_file": addr.boot_file.decode(),
    "proxy_file": proxy.boot_file.decode(), "proxy_vc": proxy.options.get(60, b"").decode(),
    "proxy_43": proxy.options.get(43, b"").hex(), "proxy_siaddr": socket.inet_ntoa(proxy.siaddr),
    "boot_type": boot.options[53][0], "boot_file": boot.boot_file.decode(),
}))
"""


def test_proxy_dhcp_beside_dnsmasq(net: TestNet, nodes: Any, tmp_path: Path,
                                   server: Any) -> None:
    """dnsmasq (another namespace on br0) gives the address; bootherd in proxy mode gives the
    boot file on 67 without an address, and again as boot server on 4011."""
    need("dnsmasq")
    net.kill(server)  # the authoritative instance must not answer here
    d, ns = nodes
    node_id, mac, _ = ns[2]
    other = f"{PREFIX}.0.3"
    peer = net.add_peer(other)
    dm = net.spawn(peer, ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                          "--interface=veth-p", "--bind-interfaces", "--no-ping",
                          f"--dhcp-range={PREFIX}.40.10,{PREFIX}.40.50,255.255.0.0,1h",
                          f"--dhcp-leasefile={tmp_path}/dnsmasq.leases",
                          f"--pid-file={tmp_path}/dnsmasq.pid"], tmp_path / "dnsmasq.log")
    cfg = write_config(d, "proxy", mode="proxy", proxy_port=4011)
    bh = start_server(net, cfg, d / "proxy.log")
    try:
        time.sleep(0.3)
        net.sh(net.client, f"ip link set br0 address {mac}")
        script = tmp_path / "proxy_client.py"
        script.write_text(PROXY_CLIENT)
        r = net.sh(net.client, f"timeout -k 2 30 {PY} {script} {mac}", check=False)
        assert r.returncode == 0, r.stdout + r.stderr + (tmp_path / "dnsmasq.log").read_text()
        res = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        net.kill(bh)
        net.kill(dm)
        net.sh(net.client, "ip addr flush dev br0", check=False)
    # The address comes from dnsmasq, never from bootherd in proxy mode.
    assert res["addr_server"] == other and res["ip"].startswith(f"{PREFIX}.")
    assert res["addr_file"] == ""
    assert res["proxy_file"] == "undionly.kpxe" and res["proxy_vc"] == "PXEClient"
    assert res["proxy_siaddr"] == SERVER_IP
    assert "060108" in res["proxy_43"]  # discovery control 8
    assert res["boot_type"] == 5 and res["boot_file"] == "undionly.kpxe"

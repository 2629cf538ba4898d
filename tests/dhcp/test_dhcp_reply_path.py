"""Replies reach the client through the interface the request came in on, whatever the
routing table says, and a reply that cannot be sent is logged, never lost in silence.

The server namespace has no default route (TestNet adds one; these tests delete it):
with dhcp.address = "0.0.0.0" a broadcast reply used to fail with ENETUNREACH on
every packet while only a counter moved.  Also: a second server on the same address
is refused at start, with a message that says what is wrong once.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_dhcp_netns import make_inventory, read_env, start_server

from bootherd.dhcp.netns import PREFIX, SERVER_IP, TestNet, usable

why = usable()
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")
PY = sys.executable
HOOK = "#!/bin/sh\nenv > \"{out}.$reason$1\"\n"  # dhclient sets $reason, udhcpc passes $1


@pytest.fixture(scope="module")
def setup(tmp_path_factory: Any) -> Iterator[tuple[TestNet, Path, list]]:
    d = tmp_path_factory.mktemp("replypath")
    nodes = make_inventory(d, 6, f"{PREFIX}.0.0/16")
    net = TestNet()
    try:
        net.sh(net.server, "ip route del default")
        assert "default" not in net.sh(net.server, "ip route").stdout
        yield net, d, nodes
    finally:
        net.close()


def config(d: Path, name: str, address: str = "0.0.0.0", **extra: str) -> Path:
    p = d / f"{name}.toml"
    lines = [f'[database]\nurl = "sqlite:///{d}/i.db"', "[dhcp]", f'address = "{address}"',
             "port = 67", *(f"{k} = {v}" for k, v in extra.items())]
    p.write_text("\n".join(lines) + "\n")
    return p


def test_wildcard_server_without_routes_answers_dhclient_and_udhcpc(setup: Any) -> None:
    for tool in ("dhclient", "busybox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    net, d, nodes = setup
    log = d / "wild.log"
    p = start_server(net, config(d, "wild"), log)
    try:
        hook = d / "hook"
        hook.write_text(HOOK.format(out=d / "env"))
        hook.chmod(0o755)
        _, mac, ip = nodes[0]
        net.sh(net.client, f"ip link set br0 address {mac}")
        r = net.sh(net.client, f"timeout -k 2 20 dhclient -1 -lf {d}/l1 -pf {d}/p1 "
                   f"-sf {hook} br0", check=False)
        pid = (d / "p1").read_text().strip() if (d / "p1").exists() else ""
        if pid.isdigit():
            net.sh(net.client, f"kill -9 {pid}", check=False)
        assert (d / "env.BOUND").exists(), r.stdout + r.stderr + log.read_text()
        env = read_env(d / "env.BOUND")
        assert env["new_ip_address"] == ip
        assert env["new_next_server"] == SERVER_IP  # derived: no public_address set
        assert env["new_dhcp_server_identifier"] == SERVER_IP
        _, mac, ip = nodes[1]
        net.sh(net.client, f"ip link set br0 address {mac}")
        r = net.sh(net.client, f"timeout -k 2 20 busybox udhcpc -i br0 -n -q -f -s {hook} "
                   "-V PXEClient:Arch:00000:UNDI:002001 -x 93:0000", check=False)
        assert (d / "env.bound").exists(), r.stdout + r.stderr + log.read_text()
        env = read_env(d / "env.bound")
        assert (env["ip"], env["siaddr"], env["serverid"], env["boot_file"]) == \
            (ip, SERVER_IP, SERVER_IP, "undionly.kpxe")
        assert "cannot send" not in log.read_text()
    finally:
        net.kill(p)


SEND = r"""
import socket, sys
from bootherd.dhcp.codec import DhcpMessage, encode
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[2], 0))
msg = DhcpMessage(1, xid=9, chaddr=mac, giaddr=socket.inet_aton("192.0.2.1"),
                  options={53: b"\x01", 60: b"PXEClient:Arch:00000:UNDI:002001"})
for _ in range(3):
    s.sendto(encode(msg), (sys.argv[3], 67))
"""


@pytest.mark.parametrize("address", ["0.0.0.0", SERVER_IP])
def test_reply_that_cannot_be_sent_is_logged(setup: Any, address: str) -> None:
    """A relay (giaddr) nobody has a route to: the unicast-bound server sends from the
    native thread, the wildcard one with sendmsg; both say so in the log."""
    net, d, nodes = setup
    name = "relay-" + address.replace(".", "-")
    log = d / f"{name}.log"
    p = start_server(net, config(d, name, address), log)
    try:
        script = d / "send.py"
        script.write_text(SEND)
        here = f"{PREFIX}.0.250"
        net.sh(net.client, f"ip addr replace {here}/16 dev br0")
        net.sh(net.client, f"{PY} {script} {nodes[2][1]} {here} {SERVER_IP}")
        for _ in range(60):
            if "could not be sent" in log.read_text() or "cannot send" in log.read_text():
                break
            time.sleep(0.1)
        text = log.read_text()
        assert "Network is unreachable" in text, text
        assert text.count("Network is unreachable") == 1  # once, not once per packet
    finally:
        net.kill(p)
        net.sh(net.client, f"ip addr del {PREFIX}.0.250/16 dev br0", check=False)


def test_second_server_on_the_same_address_is_refused(setup: Any) -> None:
    net, d, _ = setup
    first = start_server(net, config(d, "first"), d / "first.log")
    try:
        r = net.sh(net.server, f"{PY} -m bootherd.cli serve --only dhcp --config "
                   f"{config(d, 'second')}", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        msg = r.stderr.strip().splitlines()[-1]
        assert msg == ("bootherd: dhcp: cannot bind 0.0.0.0:67: Address already in use "
                       "(another server, bootherd or not, listens there)"), msg
        assert "Traceback" not in r.stderr
        assert first.poll() is None
    finally:
        net.kill(first)

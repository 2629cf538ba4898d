"""A multicast lab in network namespaces: bootherd serving images from its server
namespace, receivers on the client bridge and in peer namespaces, loss injected by
nftables at each receiver's own namespace (independent per receiver)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bootherd.dhcp.netns import SERVER_IP, TestNet

CLIENT_IP = "10.213.1.1"
GROUP = "239.195.77.1"
HTTP_PORT = 18080
CONTROL_PORT = 17979
PY = sys.executable


def cli(*args: str, cwd: Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([PY, "-m", "bootherd.cli", *args], cwd=cwd, text=True,
                       capture_output=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"bootherd {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


class Lab:
    def __init__(self, tmp: Path, rate_mbps: float = 200.0, **imaging: Any):
        self.tmp = tmp
        self.net = TestNet()
        self.peers: dict[str, str] = {}  # namespace -> address
        try:
            self._setup(rate_mbps, imaging)
        except BaseException:
            self.close()
            raise

    def _setup(self, rate: float, imaging: dict[str, Any]) -> None:
        n = self.net
        n.sh(n.server, "ip route add 224.0.0.0/4 dev veth-s")
        n.sh(n.client, f"ip addr add {CLIENT_IP}/16 dev br0")
        n.sh(n.client, "ip link set br0 type bridge mcast_snooping 0")
        n.sh(n.client, "ip route add 224.0.0.0/4 dev br0")
        db = self.tmp / "inv.db"
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in imaging.items())
        self.conf = self.tmp / "bootherd.toml"
        self.conf.write_text(
            f'[database]\nurl = "sqlite:///{db}"\n'
            f'[http]\naddress = "{SERVER_IP}"\nport = {HTTP_PORT}\nroot = "{self.tmp}/www"\n'
            f'admin_token = "labtoken"\n'
            f'[imaging]\naddress = "{SERVER_IP}"\nport = {CONTROL_PORT}\nroot = "{self.tmp}/images"\n'
            f'multicast_group = "{GROUP}"\nmulticast_ports = "42100-42107"\n'
            f'rate_mbps = {rate}\nidle_timeout = 3.0\nreceiver_timeout = 4.0\n{extra}'
            "[dhcp]\nenabled = false\n[tftp]\nenabled = false\n"
            "[bootinfo]\nenabled = false\n[tmcd]\nenabled = false\n")
        cli("db", "upgrade", "-c", str(self.conf), cwd=self.tmp)

    def start(self) -> None:
        self.server = self.net.spawn(self.net.server, [PY, "-m", "bootherd.cli", "serve", "-c",
                                                       str(self.conf)], self.tmp / "serve.log",
                                     cwd=self.tmp)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = self.net.sh(self.net.client, f"curl -fsS http://{SERVER_IP}:{HTTP_PORT}/health",
                            check=False)
            if r.returncode == 0:
                return
            if self.server.poll() is not None:
                break
            time.sleep(0.3)
        raise AssertionError("bootherd did not start:\n" + (self.tmp / "serve.log").read_text())

    def add_receiver_ns(self, loss: float = 0.0) -> str:
        """A namespace on the bridge with its own address; ``loss`` of the multicast
        datagrams it receives dropped by nftables."""
        addr = f"10.213.2.{len(self.peers) + 1}"
        ns = self.net.add_peer(addr)
        self.net.sh(ns, "ip route add 224.0.0.0/4 dev veth-p")
        if loss:
            pct = round(loss * 100)
            self.net.sh(ns, "nft add table inet loss && nft add chain inet loss in "
                            "'{ type filter hook input priority 0; }' && "
                            f"nft add rule inet loss in ip daddr {GROUP} numgen random mod 100 "
                            f"\\< {pct} drop")
        self.peers[ns] = addr
        return ns

    def receive(self, ns: str, image: str, out: Path, *extra: str) -> subprocess.Popen:
        argv = [PY, "-m", "bootherd.cli", "image", "receive", "-c", str(self.conf), "--image",
                image, "-o", str(out), "--server", SERVER_IP, "--json", "--quiet", *extra]
        return self.net.spawn(ns, argv, out.with_suffix(".log"), cwd=self.tmp)

    def api(self, path: str) -> Any:
        r = self.net.sh(self.net.client, f"curl -fsS -H 'Authorization: Bearer labtoken' "
                                         f"http://{SERVER_IP}:{HTTP_PORT}{path}")
        return json.loads(r.stdout)

    def metrics(self) -> str:
        return self.net.sh(self.net.client, f"curl -fsS http://{SERVER_IP}:{HTTP_PORT}/metrics").stdout

    def tx_bytes(self) -> int:
        return int(self.net.sh(self.net.server, "cat /sys/class/net/veth-s/statistics/tx_bytes")
                   .stdout)

    def close(self) -> None:
        self.net.close()


def result(p: subprocess.Popen, out: Path, timeout: float = 60) -> dict[str, Any]:
    p.wait(timeout)
    text = out.with_suffix(".log").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if not lines:
        raise AssertionError(f"receiver printed no result (exit {p.returncode}):\n{text}")
    res = json.loads(lines[-1])
    res["exit"] = p.returncode
    return res


def sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()



"""Peer servers for the storm benchmark: dnsmasq (DHCP + TFTP), Kea + tftp-hpa.

Each is configured with the same nodes (MAC -> control IP reservations) and a
loader in its TFTP root, bound to loopback, started by pid and stopped by pid.
`start()` returns "" or why the peer cannot run here.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bootherd.procs import terminate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tftphpa import find_in_tftpd  # noqa: E402

LOADER_BYTES = 70_000


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


class Peer:
    name = "peer"
    label = "peer"
    relay_port = 67

    def __init__(self, work: Path, specs: list[dict[str, Any]], relay: str):
        self.work = work
        self.specs = specs
        self.relay = relay
        self.procs: list[subprocess.Popen] = []
        self.tftp_root = work / "tftpboot"
        self.net = ipaddress.ip_network(f"{specs[0]['ip']}/16", strict=False)

    def prepare(self) -> None:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.tftp_root.mkdir(parents=True)
        for loader in {s["loader"] for s in self.specs}:
            (self.tftp_root / loader).write_bytes(bytes(LOADER_BYTES))

    def spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        f = open(self.work / log, "w")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=self.work)
        f.close()
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            terminate(p, 10)
        self.procs.clear()

    def alive(self) -> str:
        time.sleep(1.0)
        for p in self.procs:
            if p.poll() is not None:
                logs = " | ".join(f.read_text()[-400:] for f in self.work.glob("*.log"))
                return f"exited with {p.returncode}: {logs}"
        return ""

    def servers(self) -> str:
        raise NotImplementedError


class Dnsmasq(Peer):
    """dnsmasq 2.x, DHCP as the relay's server plus its built-in TFTP (port 69, fixed)."""

    name = "dnsmasq"
    label = "dnsmasq"
    port = 46767
    relay_port = 46767  # dnsmasq answers relays on its own server port

    def start(self) -> str:
        exe = shutil.which("dnsmasq")
        if not exe:
            return "dnsmasq not installed (apt-get install dnsmasq)"
        self.prepare()
        hosts = self.work / "hosts"
        hosts.write_text("".join(f"{_mac(s['mac'])},{s['ip']}\n" for s in self.specs))
        self.spawn([exe, "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                    f"--pid-file={self.work / 'pid'}", f"--dhcp-leasefile={self.work / 'leases'}",
                    "--interface=lo", "--bind-dynamic", "--no-ping", "--dhcp-authoritative",
                    f"--dhcp-alternate-port={self.port},{self.port + 1}",
                    f"--dhcp-range={self.net.network_address},static,{self.net.netmask}",
                    f"--dhcp-hostsfile={hosts}", f"--dhcp-boot={self.specs[0]['loader']}",
                    # Its default of 1,000 leases failed 9,000 nodes of a 10,000-node storm.
                    f"--dhcp-lease-max={max(1000, len(self.specs))}",
                    "--enable-tftp", f"--tftp-root={self.tftp_root}", "--log-facility=-",
                    "--user=root", "--group=root"], "dnsmasq.log")
        return self.alive()

    def servers(self) -> str:
        return f"dhcp=127.0.0.1:{self.port},tftp=127.0.0.1:69"


class KeaTftpHpa(Peer):
    """ISC Kea (memfile, reservations) and tftp-hpa's in.tftpd (fork per transfer)."""

    name = "kea"
    label = "Kea + tftp-hpa"
    port = 47767
    relay_port = 67  # Kea answers relays on port 67
    tftp_port = 47069

    def start(self) -> str:
        kea = shutil.which("kea-dhcp4")
        if not kea:
            return "kea-dhcp4 not installed (apt-get install kea-dhcp4-server)"
        hpa = shutil.which("in.tftpd.hpa") or find_in_tftpd()
        if not hpa:
            return "tftp-hpa's in.tftpd could not be unpacked (apt-get download tftpd-hpa)"
        self.prepare()
        conf = {"Dhcp4": {
            "interfaces-config": {"interfaces": ["lo"], "dhcp-socket-type": "udp"},
            "lease-database": {"type": "memfile", "persist": False},
            "valid-lifetime": 86400,
            "multi-threading": {"enable-multi-threading": False},
            "control-socket": {"socket-type": "unix", "socket-name": str(self.work / "kea.sock")},
            "subnet4": [{
                "id": 1, "subnet": str(self.net),
                "boot-file-name": self.specs[0]["loader"], "next-server": "127.0.0.1",
                "reservations": [{"hw-address": _mac(s["mac"]), "ip-address": s["ip"]}
                                 for s in self.specs],
            }],
            "loggers": [{"name": "kea-dhcp4", "severity": "WARN",
                         "output_options": [{"output": str(self.work / "kea-out.log")}]}],
        }}
        (self.work / "kea.json").write_text(json.dumps(conf))
        env_dirs = self.work / "kea-lock"
        env_dirs.mkdir()
        import os

        env = dict(os.environ, KEA_LOCKFILE_DIR=str(env_dirs), KEA_PIDFILE_DIR=str(env_dirs))
        f = open(self.work / "kea.log", "w")
        self.procs.append(subprocess.Popen([kea, "-c", str(self.work / "kea.json"), "-p",
                                            str(self.port)], stdout=f, stderr=subprocess.STDOUT,
                                           cwd=self.work, env=env))
        f.close()
        self.spawn([hpa, "-L", "-a", f"127.0.0.1:{self.tftp_port}", "-s", str(self.tftp_root)],
                   "tftp-hpa.log")
        return self.alive()

    def servers(self) -> str:
        return f"dhcp=127.0.0.1:{self.port},tftp=127.0.0.1:{self.tftp_port}"

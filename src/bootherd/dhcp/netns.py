"""Throw-away network namespaces for DHCP tests and benchmarks (root only).

Layout: a server namespace with ``veth-s`` (SERVER_IP/16, default route through it so
broadcast replies leave there) and a client namespace with a bridge ``br0`` holding the
peer; extra namespaces (another DHCP server, ...) can be plugged into ``br0`` with
:meth:`TestNet.add_peer`.  Everything is deleted by :meth:`TestNet.close`, which also
kills every process started through :meth:`TestNet.spawn` by pid.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

PREFIX = "10.213"
SERVER_IP = f"{PREFIX}.0.1"


def usable() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30)


class TestNet:
    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        tag = f"bh{os.getpid()}{secrets.token_hex(2)}"
        self.tag = tag
        self.server = f"{tag}s"
        self.client = f"{tag}c"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self._peers = 0
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        s, c = self.server, self.client
        for ns in (s, c):
            self._add_namespace(ns)
        # Interface names are per namespace; create in the server ns, move the peer.
        self.sh(s, f"ip link add veth-s type veth peer name veth-c netns {c}")
        self.sh(s, f"ip addr add {SERVER_IP}/16 dev veth-s")
        self.sh(s, "ip link set veth-s up")
        self.sh(s, "ip route add default dev veth-s")
        self.sh(c, "ip link add br0 type bridge")
        self.sh(c, "ip link set veth-c master br0")
        self.sh(c, "ip link set veth-c up")
        self.sh(c, "ip link set br0 up")

    def _add_namespace(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)  # recorded at once: deleted even if set-up fails later
        self.sh(ns, "ip link set lo up")

    def sh(self, ns: str, cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", ns, "sh", "-c", cmd, check=check)

    def add_peer(self, address: str) -> str:
        """A new namespace joined to br0 with ``veth-p`` at address/16; returns its name."""
        self._peers += 1
        ns = f"{self.tag}p{self._peers}"
        self._add_namespace(ns)
        self.sh(ns, f"ip link add veth-p type veth peer name vp{self._peers} netns {self.client}")
        self.sh(ns, f"ip addr add {address}/16 dev veth-p")
        self.sh(ns, "ip link set veth-p up")
        self.sh(ns, "ip route add default dev veth-p")
        self.sh(self.client, f"ip link set vp{self._peers} master br0")
        self.sh(self.client, f"ip link set vp{self._peers} up")
        return ns

    def spawn(self, ns: str, argv: Sequence[str], log: str | os.PathLike[str],
              **kw: Any) -> subprocess.Popen[Any]:
        out = open(log, "ab")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True, **kw)
        out.close()
        self.procs.append(p)
        return p

    def kill(self, p: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)  # `ip netns exec` execs the command: same pid
            except ProcessLookupError:
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(10)

    def close(self) -> None:
        for p in self.procs:
            try:
                self.kill(p)
            except Exception:  # noqa: BLE001 - keep cleaning up
                pass
        for ns in reversed(self.namespaces):
            # Processes that daemonised inside (dhclient) die with their namespace's pids.
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            time.sleep(0.05) if pids else None
            _run("ip", "netns", "delete", ns, check=False)
        self.namespaces = []

    def __enter__(self) -> TestNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

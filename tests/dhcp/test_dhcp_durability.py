"""Lease durability: every acknowledged lease survives `kill -9` of `bootherd serve`,
the same MAC gets the same address afterwards, and no address is held by two MACs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bootherd.dhcp.codec import DhcpMessage, decode, encode
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.procs import free_port

SRC = "127.22.0.200"


def start(cfg: Path, log: Path) -> subprocess.Popen[Any]:
    out = open(log, "ab")  # noqa: SIM115
    p = subprocess.Popen([sys.executable, "-m", "bootherd.cli", "serve", "--only", "dhcp",
                          "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
    out.close()
    for _ in range(200):
        if "bootherd ready" in log.read_text(errors="replace"):
            return p
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.kill()
    raise AssertionError(log.read_text(errors="replace"))


def pkt(mac: bytes, mtype: int, xid: int, extra: dict[int, bytes] | None = None) -> bytes:
    return encode(DhcpMessage(1, xid=xid, chaddr=mac, options={53: bytes([mtype]),
                                                               **(extra or {})}))


def exchange(sock: socket.socket, port: int, packets: dict[int, bytes], want: int,
             timeout: float = 5.0) -> dict[int, DhcpMessage]:
    """Send all packets (keyed by xid), collect replies by xid (resending stragglers)."""
    got: dict[int, DhcpMessage] = {}
    end = time.time() + timeout
    resend = 0.0
    while len(got) < len(packets) and time.time() < end:
        if time.time() >= resend:
            for xid, p in packets.items():
                if xid not in got:
                    sock.sendto(p, ("127.0.0.1", port))
            resend = time.time() + 1.0
        try:
            m = decode(sock.recv(2048))
        except TimeoutError:
            continue
        if m.options.get(53) == bytes([want]):
            got[m.xid] = m
    return got


def test_acked_leases_survive_kill_9(tmp_path: Path) -> None:
    db = make_engine(f"sqlite:///{tmp_path}/i.db")
    upgrade(db)
    import_testbed(db, generate(5, subnet="127.22.0.0/24"))
    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/i.db"\n'
                   f'[server]\npublic_address = "127.0.0.1"\n'
                   f'[dhcp]\naddress = "127.0.0.1"\nport = {port}\nunknown_clients = "pool"\n'
                   f'dynamic_pool = "127.22.1.1-127.22.4.250"\n')
    log = tmp_path / "srv.log"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((SRC, 0))
    sock.settimeout(0.2)
    macs = {1000 + i: bytes([10, 9, 0, 0, i >> 8, i & 255]) for i in range(400)}
    p = start(cfg, log)
    try:
        offers = exchange(sock, port, {x: pkt(m, 1, x) for x, m in macs.items()}, 2)
        assert len(offers) == len(macs)
        sid = {54: socket.inet_aton("127.0.0.1")}
        acks = exchange(sock, port, {x: pkt(macs[x], 3, x, {**sid, 50: o.yiaddr})
                                     for x, o in offers.items()}, 5)
        assert len(acks) == len(macs)
    finally:
        os.kill(p.pid, signal.SIGKILL)  # right after the last ACK: no clean shutdown
        p.wait(10)
    granted = {macs[x].hex(":"): socket.inet_ntoa(a.yiaddr) for x, a in acks.items()}
    assert len(set(granted.values())) == len(granted)
    with db.connect() as c:
        rows = list(c.execute(select(s.leases)))
    by_ip = {r.ip: r for r in rows}
    for mac, ip in granted.items():
        assert ip in by_ip and by_ip[ip].mac == mac and by_ip[ip].state == "bound"
    bound = [r.mac for r in rows if r.state == "bound"]
    assert len(bound) == len(set(bound))  # no MAC holds two addresses
    p = start(cfg, log)
    try:
        again = exchange(sock, port, {x + 5000: pkt(m, 1, x + 5000) for x, m in macs.items()}, 2)
        assert len(again) == len(macs)
        for a in again.values():
            assert socket.inet_ntoa(a.yiaddr) == granted[a.mac.hex(":")]
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        sock.close()

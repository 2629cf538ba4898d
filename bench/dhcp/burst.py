"""DHCP burst benchmark: N DISCOVERs from distinct PXE clients sent within one second.

    .venv/bin/python bench/dhcp/burst.py [--clients 10000] [--spread 1.0] [--baseline SRC]

A generated testbed of N nodes on 127.68.0.0/16 (every DISCOVER is a known node's MAC, as
in a power-on storm), `bootherd serve --only dhcp` on 127.0.0.1, and one relay socket
(giaddr 127.69.0.1) that sends the DISCOVERs, paced evenly over --spread seconds, and
receives the OFFERs.  Prints how many were answered, how many within 4 s (the PXE
firmware's first retry), the time from each DISCOVER to its OFFER (p50, p99, max), what
the kernel dropped at the server's socket (/proc/net/udp) and the load generator's CPU.
With --baseline SRC (another checkout's src/, e.g. main's) its server takes the same burst
in the same run.  Loopback only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bootherd.dhcp.codec import DhcpMessage, encode
from bootherd.dhcp.priority import message_type
from bootherd.procs import free_port, terminate
from bootherd.udprecv import set_rcvbuf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baseline  # noqa: E402  bench/baseline.py

SUBNET = "127.68.0.0/16"
RELAY = "127.69.0.1"
FIRST_RETRY = 4.0
PXE = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\x00\x00", 94: b"\x01\x02\x01",
       57: (1472).to_bytes(2, "big"),
       55: bytes([1, 3, 6, 12, 43, 54, 60, 66, 67, 128, 129, 130, 131, 132, 133, 134, 135])}


def percentile(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[max(0, min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1))] if v else float("nan")


def udp_drops(port: int) -> int:
    """The drops column of the sockets bound to this local port (/proc/net/udp)."""
    total = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            c = line.split()
            if int(c[1].split(":")[1], 16) == port:
                total += int(c[12])
    return total


def burst(port: int, macs: list[bytes], spread: float, relay_port: int) -> dict:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    set_rcvbuf(rx, 32 << 20, "burst relay socket")
    rx.bind((RELAY, relay_port))
    packets = [encode(DhcpMessage(1, xid=i + 1, hops=1, giaddr=RELAY, chaddr=m,
                                  options={53: b"\x01", **PXE, 97: b"\x00" + m * 2 + m[:4]}))
               for i, m in enumerate(macs)]
    sent = [0.0] * len(packets)
    got: dict[int, float] = {}
    stop = threading.Event()

    def receive() -> None:
        rx.settimeout(0.2)
        while not stop.is_set():
            try:
                data = rx.recv(4096)
            except TimeoutError:
                continue
            if message_type(data) != 2:  # OFFERs only
                continue
            xid = int.from_bytes(data[4:8], "big")
            got.setdefault(xid, time.monotonic())

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    cpu0 = time.process_time()
    dest = ("127.0.0.1", port)
    start = time.monotonic()
    n = len(packets)
    for i, p in enumerate(packets):
        due = start + spread * i / n
        delay = due - time.monotonic()
        if delay > 0.001:
            time.sleep(delay)
        sent[i] = time.monotonic()
        rx.sendto(p, dest)
    send_secs = time.monotonic() - start
    deadline = time.monotonic() + 2 * FIRST_RETRY
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join()
    rx.close()
    lat = [got[i + 1] - sent[i] for i in range(n) if i + 1 in got]
    return {"sent": n, "send_seconds": send_secs, "answered": len(lat),
            "within_4s": sum(x <= FIRST_RETRY for x in lat),
            "last": max((got[x] for x in got), default=start) - start,
            "p50": percentile(lat, 50), "p99": percentile(lat, 99),
            "max": max(lat) if lat else float("nan"),
            "loadgen_cpu": time.process_time() - cpu0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--spread", type=float, default=1.0)
    ap.add_argument("--baseline", metavar="SRC")
    args = ap.parse_args()
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="bootherd-bench-burst-"))
    try:
        cfgtext = '[database]\nurl = "sqlite:///bootherd.db"\n[log]\nlevel = "warning"\n'
        (work / "bootherd.toml").write_text(cfgtext)
        run = lambda *a: subprocess.run([py, "-m", "bootherd.cli", *a], cwd=work, check=True,  # noqa: E731
                                        capture_output=True, text=True)
        run("db", "upgrade", "-c", "bootherd.toml")
        run("testbed", "generate", "--nodes", str(args.clients), "--subnet", SUBNET, "-o",
            "tb.toml")
        run("testbed", "import", "tb.toml", "-c", "bootherd.toml")
        shutil.copy(work / "bootherd.db", work / "fresh.db")
        if args.baseline:
            shutil.copy(baseline.inventory(work / "baseline-db", work / "bootherd.toml",
                                           ["--nodes", str(args.clients), "--subnet", SUBNET],
                                           args.baseline), work / "fresh-main.db")
        from bootherd.inventory.db import make_engine
        from bootherd.inventory.snapshot import load

        snap = load(make_engine(f"sqlite:///{work}/bootherd.db"))
        macs = [bytes.fromhex(n.control_mac.replace(":", "")) for n in snap.nodes.values()
                if n.control_mac][:args.clients]
        print(f"# {len(macs)} DISCOVERs over {args.spread} s; {os.cpu_count()} cores, load "
              f"average {os.getloadavg()[0]:.1f}", flush=True)
        servers = [("bootherd", None)] + ([("main", args.baseline)] if args.baseline else [])
        for label, src in servers:
            for suffix in ("-wal", "-shm"):
                (work / f"bootherd.db{suffix}").unlink(missing_ok=True)
            shutil.copy(work / ("fresh-main.db" if src else "fresh.db"), work / "bootherd.db")
            port, relay_port = free_port(), free_port()
            env = baseline.env(src)
            log = open(work / f"{label}.log", "w")
            p = subprocess.Popen([py, "-m", "bootherd.cli", "serve", "--only", "dhcp", "-c",
                                  "bootherd.toml", "--set", f"dhcp.port={port}", "--set",
                                  f"dhcp.relay_port={relay_port}", "--set", "log.level=info"],
                                 cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            try:
                for _ in range(300):
                    if "bootherd ready" in (work / f"{label}.log").read_text():
                        break
                    time.sleep(0.1)
                time.sleep(0.5)
                d0 = udp_drops(port)
                r = burst(port, macs, args.spread, relay_port)
                r["drops"] = udp_drops(port) - d0
            finally:
                terminate(p, 20)
            print(f"{label:<9} sent {r['sent']} in {r['send_seconds']:.2f}s  answered "
                  f"{r['answered']}  within 4 s {r['within_4s']}  last OFFER at "
                  f"{r['last']:.2f}s  DISCOVER->OFFER p50 {r['p50']:.3f}s p99 {r['p99']:.3f}s "
                  f"max {r['max']:.3f}s  kernel drops {r['drops']}  loadgen CPU "
                  f"{r['loadgen_cpu']:.1f}s", flush=True)
            ok = r["within_4s"] == r["sent"]
            print(f"  goal (all {r['sent']} answered before the first retry at 4 s): "
                  f"{'met' if ok else 'MISSED'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

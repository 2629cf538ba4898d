"""TMCD boot benchmark: the original 26-request boot against status + fullconfig + 2 states.

    python bench/tmcd/run.py [--nodes 1000 10000] [--concurrency 256]

Generates a testbed whose control addresses are in 127.64.0.0/16 (every
virtual node sends from its own loopback address), starts a TMCD server as
a subprocess (`python -m bootherd.tmcd.cli serve`), then boots every node
once with each sequence over TCP and prints requests/s, boots/s and the
ratio.  The load generator and the server share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.snapshot import load
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.procs import free_port

ORIGINAL = ["reboot", "status", "ntpinfo", "state TBSETUP", "reboot", "status", "mounts",
            "accounts", "ifconfig", "tunnels", "hostnames", "routing", "status", "ifconfig",
            "routelist", "trafgens", "nseconfigs", "rpms", "tarballs", "startupcmd", "delay",
            "ipodinfo", "vnodelist", "isalive", "creator", "state ISUP"]
FULLCONFIG = ["status", "fullconfig", "state TBSETUP", "state ISUP"]


class _Req(asyncio.Protocol):
    def __init__(self, data: bytes, done: asyncio.Future):
        self.data, self.done, self.n = data, done, 0

    def connection_made(self, tr) -> None:  # noqa: ANN001
        tr.write(self.data)
        tr.write_eof()

    def data_received(self, data: bytes) -> None:
        self.n += len(data)

    def connection_lost(self, exc) -> None:  # noqa: ANN001
        if not self.done.done():
            self.done.set_result(self.n)


async def request(port: int, src: str, line: str) -> int:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    for attempt in range(5):
        try:
            await loop.create_connection(lambda: _Req(f"VERSION=40 {line} ".encode(), done),
                                         "127.0.0.1", port, local_addr=(src, 0))
            break
        except OSError:
            await asyncio.sleep(0.05 * (attempt + 1))
    else:
        return -1
    return await done


async def run_boots(port: int, ips: list[str], seq: list[str], concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    stats = {"requests": 0, "bytes": 0, "failed": 0}

    async def boot(ip: str) -> None:
        async with sem:
            for line in seq:
                n = await request(port, ip, line)
                stats["requests"] += 1
                if n < 0:
                    stats["failed"] += 1
                else:
                    stats["bytes"] += n

    t0 = time.perf_counter()
    await asyncio.gather(*(boot(ip) for ip in ips))
    stats["seconds"] = time.perf_counter() - t0
    return stats


def start_server(db: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-m", "bootherd.tmcd.cli", "serve", "--db", db,
                          "--port", str(free_port()), "--set", "tmcd.max_connections=4096"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("ready "):
        p.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return p, int(line.split()[1])


def stop_server(p: subprocess.Popen) -> str:
    p.terminate()
    out, _ = p.communicate(timeout=60)
    return out.strip()


def bench(nodes: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/bench.db"
        e = make_engine(db)
        upgrade(e)
        import_testbed(e, generate(nodes, subnet="127.64.0.0/16", seed=3))
        ips = [n.control_ip for n in load(e).nodes.values() if n.control_ip]
        e.dispose()
        results = {}
        for name, seq in (("original-26", ORIGINAL), ("fullconfig-4", FULLCONFIG)):
            # A fresh server per sequence: both start with a cold render cache.
            proc, port = start_server(db)
            try:
                results[name] = asyncio.run(run_boots(port, ips, seq, concurrency))
            finally:
                counters = stop_server(proc)
            r = results[name]
            print(f"nodes={nodes:>6} {name:<13} requests={r['requests']:>7} "
                  f"failed={r['failed']} seconds={r['seconds']:.2f} "
                  f"requests/s={r['requests'] / r['seconds']:.0f} "
                  f"boots/s={nodes / r['seconds']:.1f} bytes={r['bytes']}", flush=True)
            if os.environ.get("BENCH_VERBOSE"):
                print("  server", counters)
        a, b = results["original-26"], results["fullconfig-4"]
        print(f"nodes={nodes:>6} ratio boots/s fullconfig/original = "
              f"{a['seconds'] / b['seconds']:.2f}x  (requests per boot 26 -> 4)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--concurrency", type=int, default=256, help="nodes booting at once")
    a = ap.parse_args()
    import uvloop

    uvloop.install()
    for n in a.nodes:
        bench(n, a.concurrency)


if __name__ == "__main__":
    main()

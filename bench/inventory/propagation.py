"""How long a change made by another process takes to reach a running server.

Starts an in-process LiveInventory (what `bootherd serve` runs) over a
generated testbed, then changes a node from a separate `bootherd node set`
process, repeatedly, and measures the time from the change's commit to the
moment the server's snapshot holds it.  Target: under one second.

    .venv/bin/python bench/inventory/propagation.py [--nodes 10000] [--rounds 10] [--db URL]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time

from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed


async def measure(url: str, nodes: int, rounds: int) -> list[float]:
    engine = make_engine(url)
    upgrade(engine)
    import_testbed(engine, generate(nodes, subnet="10.64.0.0/16"))
    live = LiveInventory(engine)
    await live.start()
    images = ["FRISBEE-MFS", "LINUX-NETBOOT"]
    delays = []
    try:
        for k in range(rounds):
            node = f"pc{1 + k * 7 % nodes}"
            want = images[k % 2]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bootherd.cli", "node", "set", node, f"temp_os={want}",
                "--db", url, stdout=subprocess.DEVNULL)
            await proc.wait()
            committed = time.monotonic()  # the CLI has exited: its transaction is committed
            while live.snapshot.nodes[node].temp_os != want:
                await asyncio.sleep(0.005)
                if time.monotonic() - committed > 30:
                    raise RuntimeError("change never arrived")
            delays.append(time.monotonic() - committed)
    finally:
        await live.stop()
    return delays


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--db", help="database URL (default: a temporary SQLite file)")
    args = ap.parse_args()
    url = args.db or f"sqlite:///{tempfile.mkdtemp()}/bench.db"
    delays = asyncio.run(measure(url, args.nodes, args.rounds))
    backend = url.split(":", 1)[0]
    print(f"propagation {backend} nodes={args.nodes} rounds={len(delays)}: "
          f"median {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms "
          f"(target < 1000 ms)")


if __name__ == "__main__":
    main()

"""How long a change made by another process takes to reach a running server.

Starts an in-process LiveInventory (what `bootherd serve` runs) over a
generated testbed, then changes a node from a separate process, repeatedly,
and measures the time from the change's commit (wall clock, printed by that
process right after it commits) to the moment the server's snapshot holds it.  Target: under one second.

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

CHANGE = """
import sys, time
from bootherd.inventory.db import make_engine
from bootherd.inventory.ops import set_node
set_node(make_engine(sys.argv[1]), sys.argv[2], temp_os=sys.argv[3])
print(time.time())
"""


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
            # Another process commits the change and prints the wall-clock time
            # right after its commit; we poll the live snapshot meanwhile.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CHANGE, url, node, want, stdout=subprocess.PIPE)
            seen = None
            while seen is None:
                if live.snapshot.nodes[node].temp_os == want:
                    seen = time.time()
                    break
                await asyncio.sleep(0.002)
            out, _ = await proc.communicate()
            committed = float(out.decode().strip())
            if seen - committed > 30:
                raise RuntimeError("change never arrived")
            delays.append(max(0.0, seen - committed))
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

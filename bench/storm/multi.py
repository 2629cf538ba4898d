"""One server vs two servers on one PostgreSQL: the same storm, the scaling ratio.

    BOOTHERD_TEST_PG_URL=postgresql+psycopg://USER:PW@127.0.0.1/postgres \\
        .venv/bin/python bench/storm/multi.py [--nodes 2000] [--spread 1]

Creates a scratch database, imports a testbed of N nodes on 127.81.0.0/16, starts two
`bootherd serve` processes (127.82.0.1 and .2, names srv0/srv1), runs the optimized
storm once against server 0 only and once against both (the relay sends DHCP to each,
nodes follow the server that ACKed them), and prints boot-time percentiles, storm
duration (first power-on to last ISUP) and nodes/s for each, then the ratio.  The storm
itself runs in one process (`--workers` to split it), so on a small machine the
client, not the servers, may be what limits the figures: the report says how many
cores there are.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "multi"))
from multi_helpers import deploy, storm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--spread", type=float, default=1.0)
    args = ap.parse_args()
    pg = os.environ.get("BOOTHERD_TEST_PG_URL")
    if not pg:
        print("set BOOTHERD_TEST_PG_URL (an admin URL to the postgres database)")
        return 2
    name = f"bootherd_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = pg.rsplit("/", 1)[0] + "/" + name
    net = 81
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        dep = deploy(Path(tmp), url, 2, args.nodes, net)
        try:
            dep.start(0)
            dep.start(1)
            for label, only, seed in (("1 server", [0], 11), ("2 servers", [0, 1], 12)):
                raw, summary, _ = storm(dep, args.nodes, net, seed=seed, timeout=600.0,
                                        spread=args.spread, only=only)
                up = [n for n in raw["nodes"] if n["outcome"] == "up"]
                first = min(n["t_on"] for n in raw["nodes"])
                last = max(n["t_end"] for n in up) if up else first
                bt = summary.get("boot_time", {})
                results[label] = {"up": len(up), "failed": summary["failed"],
                                  "duration": last - first, "p50": bt.get("p50"),
                                  "p99": bt.get("p99"), "max": bt.get("max")}
                time.sleep(2)
        finally:
            dep.stop()
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    print(f"storm of {args.nodes} nodes (optimized profile, spread {args.spread}s), "
          f"PostgreSQL, {os.cpu_count()} cores")
    print(f"{'':10} {'up':>6} {'failed':>6} {'duration s':>11} {'nodes/s':>8} "
          f"{'p50 s':>7} {'p99 s':>7} {'max s':>7}")
    for label, r in results.items():
        rate = r["up"] / r["duration"] if r["duration"] else 0.0
        r["rate"] = rate
        print(f"{label:10} {r['up']:>6} {r['failed']:>6} {r['duration']:>11.2f} {rate:>8.0f} "
              f"{_f(r['p50'])} {_f(r['p99'])} {_f(r['max'])}")
    one, two = results["1 server"], results["2 servers"]
    if one["rate"]:
        print(f"scaling ratio (nodes/s, 2 servers / 1 server): {two['rate'] / one['rate']:.2f}")
    return 0


def _f(v: float | None) -> str:
    return f"{v:>7.2f}" if isinstance(v, (int, float)) else f"{'-':>7}"


if __name__ == "__main__":
    sys.exit(main())

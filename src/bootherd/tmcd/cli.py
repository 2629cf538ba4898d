"""`python -m bootherd.tmcd.cli serve`: a TMCD server alone (benchmarks, debugging).

`bootherd serve` is the normal way to run TMCD; this entry point runs only
the TMCD service on an existing inventory, prints `ready <port>` once it
listens and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from ..config import build
from ..inventory.db import make_engine
from ..inventory.live import LiveInventory
from ..metrics import Metrics
from ..service import Context, wire


async def serve(args: argparse.Namespace) -> None:
    overrides = [f"tmcd.port={args.port}", f"tmcd.fallback_port={args.fallback_port}",
                 f"tmcd.address={args.address}", f"database.url={args.db}", *args.set]
    cfg = build({}, overrides)
    live = LiveInventory(make_engine(cfg.database_url), cfg.database.poll_interval,
                         cfg.database.write_batch_interval, "tmcd")
    await live.start()
    ctx = Context(cfg, live, Metrics(), server_name="tmcd")
    wiring = wire(ctx, ["tmcd"])
    await wiring.start()
    svc = wiring["tmcd"]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {svc.server.bound[0][1]}", flush=True)
    await stop.wait()
    await wiring.stop()
    await live.stop()
    counters = dict(ctx.metrics.protocol("tmcd"))
    print("counters " + " ".join(f"{k}={v}" for k, v in sorted(counters.items())), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bootherd.tmcd.cli")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run only the TMCD server")
    s.add_argument("--db", required=True, help="inventory database URL")
    s.add_argument("--address", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7777)
    s.add_argument("--fallback-port", type=int, default=0)
    s.add_argument("--set", action="append", default=[], help="section.key=value")
    args = p.parse_args(argv)
    uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

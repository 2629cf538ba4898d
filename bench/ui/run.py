"""Open consoles during a boot storm: does watching slow the boot?

    .venv/bin/python bench/ui/run.py [--nodes 10000] [--consoles 5] [--repeat 2]

One `bootherd serve` (the storm bench's configuration, a generated testbed on
127.65.0.0/16), then the same storm (`bootherd storm`, all nodes powered on within one
second) with no console open and with N consoles open, alternating, after one warm-up
storm that is not counted.  A console is what a browser's page does: it signs in with
the admin token through the form and follows /ui/events (server-sent events); the N
consoles run in a process of their own and each has its own session.

Prints what the console's view costs per recorded state event (measured alone), the
storm's boot p99 (power-on to ISUP, measured by the simulator) of every run, the median
with and without consoles and their ratio, the server's CPU seconds per storm and how
many of them went into console updates (its own counter), and each console's update
rate while nodes were booting (updates whose counts show a node in a boot phase, first
to last) with its longest gap.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("storm_bench", HERE.parent / "storm" / "run.py")
sb = importlib.util.module_from_spec(_spec)  # the storm bench: config, serve, storm runs
_spec.loader.exec_module(sb)  # type: ignore[union-attr]

from bootherd.procs import cpu_seconds, free_port, terminate  # noqa: E402

# Ports of our own: the storm bench's fixed ones may belong to another run on this host,
# whose server would answer our storm (sb's functions read sb.PORTS when called).
sb.PORTS = {name: free_port() for name in sb.PORTS}

BOOTING = ("dhcp", "tftp", "loader", "waiting", "os", "setup")


# -- the consoles (run with --run-consoles in their own process) ---------------------------

async def _console(url: str, token: str, out: list[tuple[float, bool]], ready: asyncio.Event,
                   stop: asyncio.Event) -> None:
    import aiohttp

    jar = aiohttp.CookieJar(unsafe=True)  # a cookie of an IP-address host
    async with aiohttp.ClientSession(cookie_jar=jar) as c:
        r = await c.post(url + "/ui/login", data={"token": token}, allow_redirects=False)
        if r.status != 303:
            raise RuntimeError(f"sign-in refused: {r.status} {await r.text()}")
        names: list[str] = []
        async with c.get(url + "/ui/events", timeout=aiohttp.ClientTimeout(total=None)) as ev:
            event = ""
            reader = asyncio.ensure_future(stop.wait())
            while not stop.is_set():
                line_task = asyncio.ensure_future(ev.content.readline())
                done, _ = await asyncio.wait({line_task, reader},
                                             return_when=asyncio.FIRST_COMPLETED)
                if line_task not in done:
                    line_task.cancel()
                    break
                raw = line_task.result()
                if not raw:
                    raise RuntimeError("the server ended the stream")
                text = raw.decode().rstrip("\n")
                if text.startswith("event: "):
                    event = text[7:]
                elif text.startswith("data: ") and event in ("hello", "tick"):
                    data = json.loads(text[6:])
                    if event == "hello":
                        names = data["phase_names"]
                        ready.set()
                    else:
                        busy = any(data["phases"][names.index(p)] for p in BOOTING)
                        out.append((time.time(), busy))


async def _consoles(url: str, token: str, n: int) -> list[list[tuple[float, bool]]]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    ticks: list[list[tuple[float, bool]]] = [[] for _ in range(n)]
    ready = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.ensure_future(_console(url, token, ticks[i], ready[i], stop))
             for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 60)
    print("ready", flush=True)
    await asyncio.gather(*tasks)
    return ticks


def rate(ticks: list[tuple[float, bool]]) -> tuple[float, float, int]:
    """(updates per second, longest gap) while the console showed nodes booting."""
    busy = [t for t, b in ticks if b]
    if len(busy) < 2:
        return 0.0, float("inf"), len(busy)
    gaps = [b - a for a, b in zip(busy, busy[1:], strict=False)]
    return (len(busy) - 1) / (busy[-1] - busy[0]), max(gaps), len(busy)


# -- the bench ------------------------------------------------------------------------------

def feed_cost(nodes: int) -> tuple[float, object]:
    """Microseconds the console's view adds to recording one state event (the boot path),
    measured on a FeedCore of `nodes` nodes fed a whole boot per node."""
    from collections import Counter

    from bootherd.inventory.live import StateEvent
    from bootherd.web.ui.feed import Feed, FeedCore

    ids = [f"pc{i}" for i in range(nodes)]
    feed = Feed(None, 0.3, list, Counter(), clock=lambda: t)  # what LiveInventory.on_state calls
    feed.core = FeedCore(ids, {})
    steps = [("PXEBOOTING", "dhcp"), ("PXEBOOTING", "tftp"), ("PXEBOOTING", "bootinfo"),
             ("PXEWAIT", "bootinfo"), ("PXEWAKEUP", "bootinfo"), ("PXEBOOTING", "bootinfo"),
             ("BOOTING", "bootinfo"), ("TBSETUP", "tmcd"), ("ISUP", "tmcd")]
    t = time.time()
    events = []
    for state, source in steps:
        for nid in ids:
            events.append(StateEvent(nid, state, source, t))
            t += 1e-4
    t0 = time.perf_counter()
    for ev in events:
        feed._on_state(ev)
    return (time.perf_counter() - t0) / len(events) * 1e6, feed


def update_cost(feed, consoles: int, ticks: int = 200) -> float:  # noqa: ANN001
    """Milliseconds of CPU one update costs with `consoles` open, every node booted (the
    percentiles and histogram over all boot times) and the failures changed each time."""
    from bootherd.web.ui.feed import Subscriber

    async def run() -> float:
        feed.subs = {Subscriber(None) for _ in range(consoles)}
        t0 = time.thread_time()
        for _ in range(ticks):
            feed.core.seq += 1
            feed.core.failures_seq += 1
            feed.tick()
            for s in feed.subs:
                s.pending.clear()
        return (time.thread_time() - t0) / ticks * 1e3
    return asyncio.run(run())


def update_seconds(url: str) -> float:
    """The server's own count of seconds spent building and queueing console updates."""
    from urllib.request import urlopen

    with urlopen(url + "/metrics", timeout=10) as r:
        for raw in r.read().decode().splitlines():
            if raw.startswith("bootherd_ui_update_seconds "):
                return float(raw.split()[1])
    return 0.0


def one_storm(work: Path, nodes: int, label: str, server_pid: int,
              consoles: int, url: str, token: str) -> dict:
    proc = None
    ticks_file = work / f"{label}-consoles.json"
    if consoles:
        proc = subprocess.Popen([sys.executable, __file__, "--run-consoles", str(consoles),
                                 "--url", url, "--token", token, "--out", str(ticks_file)],
                                stdout=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the consoles did not start")
    cpu0, upd0 = cpu_seconds(server_pid), update_seconds(url)
    s = sb.storm(work, nodes, work / f"{label}.json", "--phases", "dhcp,tftp,bootinfo,tmcd,http",
                 "--start-spread", "1")
    cpu, upd = cpu_seconds(server_pid) - cpu0, update_seconds(url) - upd0
    out = {"summary": s, "server_cpu": cpu, "update_cpu": upd, "consoles": []}
    if proc is not None:
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        out["consoles"] = [rate([tuple(x) for x in c]) for c in json.loads(ticks_file.read_text())]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--consoles", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each kind (alternating)")
    ap.add_argument("--run-consoles", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_consoles:
        ticks = asyncio.run(_consoles(args.url, args.token, args.run_consoles))
        Path(args.out).write_text(json.dumps(ticks))
        return 0

    per_event, feed = feed_cost(args.nodes)
    print(f"the console's view of the state stream: {per_event:.2f} µs per recorded event "
          f"(on the recording path, with or without consoles)", flush=True)
    print(f"one update for {args.consoles} consoles, {args.nodes} boot times: "
          f"{update_cost(feed, args.consoles):.2f} ms of CPU (every "
          f"{feed.interval} s)", flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average at start: {' '.join(load)} on {os.cpu_count()} cores", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bootherd-bench-ui-"))
    (work / "tftpboot").mkdir()
    (work / "www").mkdir()
    cfg = sb.write_config(work)
    sb.bootherd("db", "upgrade", "-c", str(cfg), cwd=work)
    sb.bootherd("testbed", "generate", "--nodes", str(args.nodes), "--subnet", sb.SUBNET,
                "-o", "tb.toml", cwd=work)
    sb.bootherd("testbed", "import", "tb.toml", "-c", str(cfg), cwd=work)
    url = f"http://127.0.0.1:{sb.PORTS['http']}"
    print(f"work folder {work}; {args.nodes} nodes, {args.consoles} consoles, "
          f"{args.repeat} runs each", flush=True)
    runs: list[tuple[str, dict]] = []
    log = work / "serve.log"
    with open(log, "w") as lf:
        server = subprocess.Popen([sys.executable, "-m", "bootherd.cli", "serve", "-c", str(cfg)],
                                  cwd=work, stdout=lf, stderr=subprocess.STDOUT)
        try:
            sb.wait_port(sb.PORTS["tmcd"], server, log)
            token_file = work / "admin-token"
            for _ in range(600):  # the HTTP service writes it when it starts, after TMCD
                if token_file.exists() or server.poll() is not None:
                    break
                time.sleep(0.1)
            time.sleep(0.5)
            token = (work / "admin-token").read_text().strip()
            warm = one_storm(work, args.nodes, "warm-up", server.pid, 0, url, token)
            print(sb.line("warm-up (not counted)", warm["summary"]), flush=True)
            for r in range(args.repeat):
                order = (0, args.consoles) if r % 2 == 0 else (args.consoles, 0)
                for n in order:
                    label = f"run{r}-{n}consoles"
                    res = one_storm(work, args.nodes, label, server.pid, n, url, token)
                    runs.append((label, res))
                    print(sb.line(f"{n} consoles open", res["summary"])
                          + f"  server cpu {res['server_cpu']:.1f}s (console updates "
                            f"{res['update_cpu']:.2f}s)", flush=True)
                    for i, (hz, gap, count) in enumerate(res["consoles"]):
                        print(f"    console {i + 1}: {hz:.2f} updates/s while booting "
                              f"({count} updates), longest gap {gap:.2f}s", flush=True)
        finally:
            terminate(server, 30)

    def p99s(with_consoles: bool) -> list[float]:
        return [res["summary"]["boot_time"]["p99"] for label, res in runs
                if (not label.endswith("-0consoles")) == with_consoles]

    none, some = p99s(False), p99s(True)
    rates = [hz for _label, res in runs for hz, _gap, _n in res["consoles"]]
    gaps = [gap for _label, res in runs for _hz, gap, _n in res["consoles"]]
    failed = sum(res["summary"]["failed"] for _label, res in runs)
    print(f"\nboot p99 with no console:     {', '.join(f'{v:.2f}s' for v in none)}"
          f"  (median {statistics.median(none):.2f}s)")
    print(f"boot p99 with {args.consoles} consoles:    {', '.join(f'{v:.2f}s' for v in some)}"
          f"  (median {statistics.median(some):.2f}s)")
    print(f"ratio (with / without):       {statistics.median(some) / statistics.median(none):.3f}")
    spread = (max(none) - min(none)) / statistics.median(none) if len(none) > 1 else 0.0
    print(f"spread of the runs without:   {spread:.1%} of their median")
    print(f"console updates while booting: min {min(rates):.2f}/s, max {max(rates):.2f}/s; "
          f"longest gap {max(gaps):.2f}s")
    print(f"failed nodes over all counted runs: {failed}")
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average at the end: {' '.join(load)} (figures move with other work)")
    (work / "bench.json").write_text(json.dumps(runs, indent=1, default=str))
    print(f"all figures: {work / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TMCD boot benchmark: the original 26-request boot against status + fullconfig + 2 states.

    python bench/tmcd/run.py [--nodes 1000 10000] [--concurrency 256] [--baseline SRC]
                             [--sequences fullconfig-4,original-26] [--loadgen-impl c|python]

Generates a testbed whose control addresses are in 127.64.0.0/16 (every
virtual node sends from its own loopback address), starts a TMCD server as
a subprocess (`python -m bootherd.tmcd.cli serve`), then boots every node
once with each sequence over TCP and prints requests/s, boots/s, the
server's CPU per request and the load generator's CPU.  The load generator
(loadgen.c, compiled with gcc at the start; the Python one with
`--loadgen-impl python` or without gcc) and the server share this machine's
cores: its CPU is printed so a run shows which of the two limits it.

`--baseline SRC` (another checkout, or its src/, its extensions built there, e.g.
main's) serves the same boots in the same run, right after this tree's
server for each sequence, and the ratios to it are printed; the first line names
the bootherd each server imports, so a wrong path cannot pass for a baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


HERE = Path(__file__).resolve().parent
LOADGEN: str | None = None  # the compiled loadgen.c, when gcc could build it


def build_loadgen(work: str) -> str | None:
    out = os.path.join(work, "loadgen")
    try:
        subprocess.run(["gcc", "-O2", "-o", out, str(HERE / "loadgen.c")], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"# cannot build loadgen.c ({e}): the Python load generator", flush=True)
        return None
    return out


def run_loadgen(port: int, ips: list[str], seq: list[str], concurrency: int,
                work: str) -> dict:
    """One run of the load generator; its figures plus its own CPU seconds."""
    if LOADGEN is None:
        before = os.times()
        r = asyncio.run(run_boots(port, ips, seq, concurrency))
        after = os.times()
        r["cpu"] = after.user - before.user + after.system - before.system
        return r
    ipf, seqf = os.path.join(work, "ips"), os.path.join(work, "seq")
    Path(ipf).write_text("\n".join(ips) + "\n")
    Path(seqf).write_text("\n".join(seq) + "\n")
    out = subprocess.run([LOADGEN, "127.0.0.1", str(port), str(concurrency), ipf, seqf],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def source_dir(path: str) -> str:
    """The directory holding a checkout's `bootherd` package (the checkout or its src/)."""
    for d in (Path(path) / "src", Path(path)):
        if (d / "bootherd" / "__init__.py").is_file():
            return str(d.resolve())
    raise SystemExit(f"--baseline {path}: no bootherd package there or in its src/")


def server_env(src: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    return env


def imported_from(src: str | None) -> str:
    """Where a server started with this PYTHONPATH imports bootherd from."""
    return subprocess.run([sys.executable, "-c", "import bootherd; print(bootherd.__file__)"],
                          env=server_env(src), check=True, capture_output=True,
                          text=True).stdout.strip()


def start_server(db: str, src: str | None = None) -> tuple[subprocess.Popen, int]:
    env = server_env(src)
    p = subprocess.Popen([sys.executable, "-m", "bootherd.tmcd.cli", "serve", "--db", db,
                          "--port", str(free_port()), "--set", "tmcd.max_connections=4096"],
                         stdout=subprocess.PIPE, text=True, env=env)
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


SEQUENCES = {"original-26": ORIGINAL, "fullconfig-4": FULLCONFIG}


def bench(nodes: int, concurrency: int, names: list[str], baseline: str | None) -> None:
    servers = [("this", None)] + ([("baseline", baseline)] if baseline else [])
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/bench.db"
        e = make_engine(db)
        upgrade(e)
        import_testbed(e, generate(nodes, subnet="127.64.0.0/16", seed=3))
        ips = [n.control_ip for n in load(e).nodes.values() if n.control_ip]
        e.dispose()
        results: dict[tuple[str, str], dict] = {}
        for name in names:
            seq = SEQUENCES[name]
            for label, src in servers:
                # A fresh server (and database copy) per run: each starts with a cold
                # render cache and no recorded states.
                run_db = f"{tmp}/{name}-{label}.db"
                subprocess.run(["cp", db.removeprefix("sqlite:///"), run_db], check=True)
                proc, port = start_server(f"sqlite:///{run_db}", src)
                try:
                    cpu0 = proc_cpu(proc.pid)
                    r = run_loadgen(port, ips, seq, concurrency, tmp)
                    r["server_cpu"] = proc_cpu(proc.pid) - cpu0
                finally:
                    counters = stop_server(proc)
                results[(name, label)] = r
                print(f"nodes={nodes:>6} {name:<13} {label:<8} requests={r['requests']:>7} "
                      f"failed={r['failed']} seconds={r['seconds']:.2f} "
                      f"requests/s={r['requests'] / r['seconds']:.0f} "
                      f"boots/s={nodes / r['seconds']:.1f} "
                      f"server_cpu_us/request={1e6 * r['server_cpu'] / r['requests']:.0f} "
                      f"loadgen_cpu_s={r['cpu']:.1f}", flush=True)
                if os.environ.get("BENCH_VERBOSE"):
                    print("  server", counters)
        for label, _ in servers:
            if ("original-26", label) in results and ("fullconfig-4", label) in results:
                a, b = results[("original-26", label)], results[("fullconfig-4", label)]
                print(f"nodes={nodes:>6} {label}: ratio boots/s fullconfig/original = "
                      f"{a['seconds'] / b['seconds']:.2f}x  (requests per boot 26 -> 4)")
        if baseline:
            for name in names:
                a, b = results[(name, "this")], results[(name, "baseline")]
                print(f"nodes={nodes:>6} {name}: this/baseline requests/s "
                      f"{b['seconds'] / a['seconds']:.2f}x, server CPU per request "
                      f"{b['server_cpu'] / a['server_cpu']:.2f}x less", flush=True)


def main() -> None:
    global LOADGEN
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--concurrency", type=int, default=256, help="nodes booting at once")
    ap.add_argument("--sequences", default="original-26,fullconfig-4")
    ap.add_argument("--baseline", metavar="SRC", help="another checkout's src/ to compare with")
    ap.add_argument("--loadgen-impl", choices=("c", "python"), default="c")
    a = ap.parse_args()
    names = [n for n in a.sequences.split(",") if n]
    baseline = source_dir(a.baseline) if a.baseline else None
    for n in names:
        if n not in SEQUENCES:
            ap.error(f"--sequences: unknown {n!r} (known: {', '.join(SEQUENCES)})")
    import uvloop

    uvloop.install()
    with tempfile.TemporaryDirectory() as work:
        LOADGEN = build_loadgen(work) if a.loadgen_impl == "c" else None
        print(f"# load generator: {'loadgen.c' if LOADGEN else 'Python (asyncio + uvloop)'}; "
              f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}", flush=True)
        print(f"# this: {imported_from(None)}"
              + (f"; baseline: {imported_from(baseline)}" if baseline else ""), flush=True)
        for n in a.nodes:
            bench(n, a.concurrency, names, baseline)


if __name__ == "__main__":
    main()

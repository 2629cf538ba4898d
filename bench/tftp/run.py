#!/usr/bin/env python3
"""TFTP throughput benchmark: bootherd against in.tftpd (tftp-hpa), atftpd and dnsmasq.

One load generator (loadgen.c, compiled here with gcc, a separate process: one UDP socket
and one loopback source address per client, firmware-like 2 s timeout and 5 retries,
blksize 1468 + tsize 0, optionally windowsize 8) fetches a 1 MiB and a 32 MiB file with 10, 100
and 1,000 concurrent clients from each server.  Every server runs on 127.0.0.1 and is
started and killed by pid.  dnsmasq 2.90 has no option for its TFTP port, so it alone
listens on 127.0.0.1:69 (loopback only); the others use high ports.

The load generator is in C because the Python one (``--loadgen-impl python``, the same
behaviour on asyncio + uvloop) saturated its core before the faster servers did; each
cell prints the CPU of both sides, so whichever side limits a cell shows.

    .venv/bin/python bench/tftp/run.py --quick
    .venv/bin/python bench/tftp/run.py            # full matrix, cells capped at --cell-limit
    .venv/bin/python bench/tftp/run.py --repeat 3 # servers take turns, median of 3 rounds
    .venv/bin/python bench/tftp/run.py --baseline /tmp/main/src  # a change against main
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bootherd.procs import cpu_seconds, free_port

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tftphpa import find_in_tftpd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


# --------------------------------------------------------------------------- load generator


def client_ip(i: int) -> str:
    return f"127.2.{i // 250}.{i % 250 + 1}"


async def _loadgen(host, port, filename, n, windowsize, limit, expect):
    from bootherd.tftp import core
    from bootherd.tftp.client import TFTPError, _ReadProtocol

    loop = asyncio.get_running_loop()
    opts = {"blksize": "1468", "tsize": "0"}
    if windowsize > 1:
        opts["windowsize"] = str(windowsize)
    rrq = core.encode_request(core.RRQ, filename, "octet", opts)
    protos: list[_ReadProtocol] = []
    result = {"ok": 0, "failed": 0, "unfinished": 0, "errors": {}}

    async def one(i):
        busy = 0
        while True:
            proto = _ReadProtocol((host, port), rrq, want_options=True, timeout=2.0, retries=5,
                                  keep=False, digest=False, drop=None, ack_oack=True)  # fmt: skip
            protos.append(proto)
            tr, _ = await loop.create_datagram_endpoint(lambda p=proto: p,
                                                        local_addr=(client_ip(i), 0))  # fmt: skip
            try:
                r = await proto.future
                if r.size != expect:
                    raise TFTPError(-2, f"short file {r.size}")
                result["ok"] += 1
                return
            except TFTPError as exc:
                if exc.code == 0 and "busy" in exc.message and busy < 20:
                    busy += 1
                    await asyncio.sleep(0.2)
                    continue
                result["failed"] += 1
                key = exc.message[:60]
                result["errors"][key] = result["errors"].get(key, 0) + 1
                return
            finally:
                tr.close()

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=limit)
    elapsed = time.perf_counter() - t0
    for t in pending:
        t.cancel()
    result["unfinished"] = len(pending)
    result["bytes"] = sum(p.size for p in protos)
    result["elapsed"] = elapsed
    result["retries"] = sum(p.result.retries for p in protos)
    return result


def loadgen_main(argv):
    host, port, filename, n, ws, limit, expect = argv
    import resource

    import uvloop

    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with runner:
        res = runner.run(
            _loadgen(host, int(port), filename, int(n), int(ws), float(limit), int(expect))
        )
    print(json.dumps(res))


# --------------------------------------------------------------------------- servers

BOOTHERD_SNIPPET = """
import asyncio, sys, uvloop
from bootherd.tftp import TFTPServer
async def main():
    srv = TFTPServer("127.0.0.1", int(sys.argv[1]), sys.argv[2], max_transfers=4096,
                     max_per_client=8, default_timeout=2.0)
    await srv.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def server_commands(work: str, root: str) -> dict[str, tuple[list[str], int]]:
    cmds: dict[str, tuple[list[str], int]] = {}
    p = free_port()
    cmds["bootherd"] = ([PY, "-c", BOOTHERD_SNIPPET, str(p), root], p)
    hpa = find_in_tftpd()
    if hpa:
        p = free_port()
        cmds["in.tftpd"] = ([hpa, "-L", "-a", f"127.0.0.1:{p}", "-s", "-u", "root", root], p)
    if shutil.which("atftpd"):
        p = free_port()
        cmds["atftpd"] = ([
            "atftpd", "--daemon", "--no-fork", "--port", str(p), "--bind-address", "127.0.0.1",
            "--user", "root.root", "--maxthread", "4000", "--logfile", "/dev/null",
            "--prevent-sas", root,
        ], p)  # fmt: skip
    if shutil.which("dnsmasq"):
        cmds["dnsmasq"] = ([
            "dnsmasq", "-k", "--port=0", "--enable-tftp", f"--tftp-root={root}",
            "--tftp-max=4000", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--quiet-tftp", f"--pid-file={work}/dnsmasq.pid", "--log-facility=/dev/null",
            "--conf-file=/dev/null", "--user=root",
        ], 69)  # fmt: skip
    return cmds


# Extra environment per server: the baseline runs another checkout's bootherd.
SERVER_ENV: dict[str, dict[str, str]] = {}


def start_server(cmd: list[str], env: dict[str, str] | None = None,
                 attempts: int = 30) -> subprocess.Popen:  # fmt: skip
    """Starts a server; one that exits at once is tried again for up to ~45 s: dnsmasq
    needs 127.0.0.1:69, which a test elsewhere on a shared machine may hold a moment."""
    for attempt in range(attempts):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=env)  # fmt: skip
        if cmd[0] == PY:
            line = proc.stdout.readline()
            if b"ready" not in line:
                raise RuntimeError("bootherd did not start")
        else:
            time.sleep(0.5)
        if proc.poll() is None:
            return proc
        if attempt == 0:
            print(f"# {os.path.basename(cmd[0])} exited with {proc.returncode}: trying again",
                  flush=True)  # fmt: skip
        time.sleep(1.0)
    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def build_loadgen(work: str) -> str | None:
    """Compiles loadgen.c into work; None (the Python load generator) if that fails."""
    out = os.path.join(work, "loadgen")
    try:
        subprocess.run(["gcc", "-O2", "-o", out, os.path.join(HERE, "loadgen.c")], check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        return out
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"# cannot build loadgen.c ({exc}): using the Python load generator",
              file=sys.stderr)  # fmt: skip
        return None


LOADGEN: str | None = None  # the compiled load generator, once built


def run_cell(port, name, n, ws, limit, size, server_pid=None) -> dict:
    import resource

    # CPU of both sides: a side near 100% of a core is what limits the cell.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    srv0 = cpu_seconds(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    gen = [LOADGEN] if LOADGEN else [PY, os.path.abspath(__file__), "--loadgen"]
    out = subprocess.run(
        [*gen, "127.0.0.1", str(port), name, str(n), str(ws), str(limit), str(size)],
        capture_output=True, text=True, timeout=limit + 120,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["loadgen_cpu"] = 100 * (after.ru_utime + after.ru_stime - before.ru_utime
                              - before.ru_stime) / wall
    r["server_cpu"] = 100 * (cpu_seconds(server_pid) - srv0) / wall if server_pid else 0.0
    return r


def measure(cmd_port, server, f, n, ws, limit, size) -> dict:
    cmd, port = cmd_port
    # A fresh server per cell: one that wedged in a cell (atftpd after 1,000 clients did)
    # must not fail every cell after it.
    extra = SERVER_ENV.get(server)
    proc = start_server(cmd, {**os.environ, **extra} if extra else None)
    try:
        r = run_cell(port, f, n, ws, limit, size, proc.pid)
    finally:
        stop_server(proc)
    r.update(server=server, file=f, clients=n, windowsize=ws)
    r["mbps"] = r["bytes"] / r["elapsed"] / 1e6
    print(f"# {server:9} {f:>3} n={n:<5} ws={ws} "
          f"{r['mbps']:8.1f} MB/s ok={r['ok']} failed={r['failed']} "
          f"unfinished={r['unfinished']} cpu server/loadgen "
          f"{r['server_cpu']:.0f}%/{r['loadgen_cpu']:.0f}% "
          f"{_first_data(r)}{r['errors'] or ''}",
          flush=True)  # fmt: skip
    time.sleep(0.5)
    return r


def _first_data(r: dict) -> str:
    """The request phase as clients saw it: seconds to their first DATA (loadgen.c)."""
    f = r.get("first_data")
    return f"first DATA p50/p99 {f[0]:.3f}/{f[1]:.3f} s " if f else ""


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower middle one of an even number: of
    two rounds, the worse); a failure in any run counts against the cell."""
    ordered = sorted(runs, key=lambda r: r["mbps"])
    r = dict(ordered[(len(ordered) - 1) // 2])
    r["failed"] = max(x["failed"] for x in runs)
    r["runs_mbps"] = [x["mbps"] for x in runs]
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run: 10 and 100 clients")
    ap.add_argument("--clients", default=None, help="comma list, default 10,100,1000")
    ap.add_argument("--files", default="1m,32m", help="comma list of 1m,32m")
    ap.add_argument("--servers", default="bootherd,in.tftpd,atftpd,dnsmasq")
    ap.add_argument("--cell-limit", type=float, default=None,
                    help="seconds per cell before unfinished clients are cancelled")  # fmt: skip
    ap.add_argument("--json", default=None, help="write raw results here")
    ap.add_argument("--loadgen-impl", choices=("c", "python"), default="c")
    ap.add_argument("--windowsizes", default="1,8", help="comma list of windowsize values")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds per cell (servers take turns); the table shows the median")  # fmt: skip
    ap.add_argument("--baseline", default=None, metavar="SRC",
                    help="also run the bootherd whose package is in SRC (another checkout's "
                         "src/, extensions built there) as server 'baseline', in turn with "
                         "the others; xbaseline is the change's ratio")  # fmt: skip
    args = ap.parse_args()
    clients = [int(c) for c in (args.clients or ("10,100" if args.quick else "10,100,1000"))
               .split(",")]  # fmt: skip
    limit = args.cell_limit or (15.0 if args.quick else 40.0)
    windowsizes = [int(w) for w in args.windowsizes.split(",")]
    work = tempfile.mkdtemp(prefix="tftpbench-")
    global LOADGEN
    LOADGEN = build_loadgen(work) if args.loadgen_impl == "c" else None
    print(f"# load generator: {'loadgen.c' if LOADGEN else 'Python (asyncio + uvloop)'}")
    root = os.path.join(work, "root")
    os.makedirs(root)
    os.chmod(work, 0o755)
    sizes = {"1m": 2**20, "32m": 32 * 2**20}
    files = [f for f in args.files.split(",") if f in sizes]
    for f in files:
        with open(os.path.join(root, f), "wb") as fh:
            fh.write(os.urandom(sizes[f]))
        os.chmod(os.path.join(root, f), 0o644)
    cmds = server_commands(work, root)
    servers = args.servers.split(",")
    if args.baseline:
        port = free_port()
        cmds["baseline"] = ([PY, "-c", BOOTHERD_SNIPPET, str(port), root], port)
        SERVER_ENV["baseline"] = {"PYTHONPATH": os.path.abspath(args.baseline)}
        if "baseline" not in servers:
            servers.insert(servers.index("bootherd") + 1 if "bootherd" in servers else 0,
                           "baseline")  # fmt: skip
    wanted = [s for s in servers if s in cmds]
    results = []
    try:
        # Cell by cell, every server in turn (and round by round with --repeat): this VM's
        # speed drifts by tens of percent over minutes, so the servers a ratio compares
        # are measured close together.
        for f in files:
            for n in clients:
                for ws in windowsizes:
                    runs = {s: [] for s in wanted}
                    for _ in range(args.repeat):
                        for server in wanted:
                            runs[server].append(measure(cmds[server], server, f, n, ws,
                                                        limit, sizes[f]))  # fmt: skip
                    for server in wanted:
                        results.append(median_run(runs[server]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print_table(results, wanted, files, clients, windowsizes)
    shutil.rmtree(work, ignore_errors=True)


def print_table(results, servers, files, clients, windowsizes=(1, 8)):
    cell = {(r["server"], r["file"], r["clients"], r["windowsize"]): r for r in results}
    peers = [s for s in servers if s != "bootherd"]
    head = f"{'file':>4} {'clients':>7} {'ws':>2} | " + " | ".join(
        f"{s:>9} MB/s ok/fail/unf" for s in servers
    ) + " | " + " ".join(f"{'x' + s:>10}" for s in peers) + f" {'xbest':>7}"
    print()
    print(head)
    print("-" * len(head))
    for f in files:
        for n in clients:
            for ws in windowsizes:
                row = []
                for s in servers:
                    r = cell.get((s, f, n, ws))
                    row.append(f"{r['mbps']:14.1f} {r['ok']:>4}/{r['failed']}/{r['unfinished']}"
                               if r else " " * 24)  # fmt: skip
                ratios = []
                b = cell.get(("bootherd", f, n, ws))
                for s in peers:
                    r = cell.get((s, f, n, ws))
                    ratios.append(f"{b['mbps'] / r['mbps']:10.2f}" if b and r and r["mbps"]
                                  else f"{'-':>10}")  # fmt: skip
                # Against the best peer of the cell, counting only peers that failed nothing.
                clean = [cell[(s, f, n, ws)]["mbps"] for s in peers if s != "baseline"
                         and (s, f, n, ws) in cell and not cell[(s, f, n, ws)]["failed"]]
                best = max(clean, default=0.0)
                ratios.append(f"{b['mbps'] / best:7.2f}" if b and best else f"{'-':>7}")
                print(f"{f:>4} {n:>7} {ws:>2} | " + " | ".join(row) + " | " + " ".join(ratios))
    print("\nMB/s = payload bytes received by all clients / wall time of the cell; "
          "ok/fail/unf = completed / failed / still running at the cell limit; "
          "xbest = bootherd / the best peer with no failed transfer in the cell.")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        loadgen_main(sys.argv[2:])
    else:
        main()

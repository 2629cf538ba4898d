#!/usr/bin/env python3
"""HTTP file distribution: bootherd against nginx, same folder, same run, same load.

N clients (10, 100, 1,000) each download one 32 MiB file at the same moment
from bootherd's /files/ and from nginx serving the same folder.  The load
generator is one asyncio process with a minimal HTTP/1.1 client that discards
the body (so the generator is not what is measured) and behaves like a
patient node: on 503 it waits Retry-After and tries again, on a dropped
connection it resumes with Range.  Each run is bounded by --deadline seconds;
unfinished downloads are reported, not waited for.

    .venv/bin/python bench/http/run.py            # N = 10, 100, 1000; 32 MiB
    .venv/bin/python bench/http/run.py --quick    # N = 10, 100; 8 MiB

Prints aggregate MB/s (10^6 bytes/s of body received) per server and N, and
bootherd's ratio to nginx.  bootherd runs with its default admission control
(http.max_large_transfers = 256) unless --cap says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bootherd.procs import cpu_seconds, free_port, terminate

FILE = "img.bin"


# -- the load generator ---------------------------------------------------------------

_HEAD = bytearray(1 << 16)  # response heads (and the body bytes that share their segment)
# Never written: MSG_TRUNC makes the kernel drop TCP data instead of copying it out,
# so the generator costs one syscall per wakeup, not a copy of every byte (copying
# 32 GB into user space took more CPU than either server spent sending it).
_SINK = bytearray(1 << 22)


class _Get:
    """One GET on its own non-blocking socket; counts body bytes without receiving them."""

    def __init__(self, sock: socket.socket, done: asyncio.Future):
        self.sock = sock
        self.done = done
        self.head = bytearray()
        self.status = 0
        self.length = -1
        self.retry_after = 1.0
        self.body = 0

    def readable(self) -> None:
        try:
            if self.status == 0:
                n = self.sock.recv_into(_HEAD)
                if n:
                    self._head(n)
            else:
                n = self.sock.recv_into(_SINK, len(_SINK), socket.MSG_TRUNC)
                self.body += n
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0 or (self.length >= 0 and self.body >= self.length):
            self._finish()

    def _head(self, n: int) -> None:
        self.head += _HEAD[:n]
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                self.length = int(v)
            elif k == "retry-after":
                self.retry_after = float(v)
        self.body = len(self.head) - end - 4

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(self)


async def _get(loop: asyncio.AbstractEventLoop, host: str, port: int, req: bytes) -> _Get:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    done: asyncio.Future = loop.create_future()
    g = _Get(sock, done)
    try:
        await loop.sock_connect(sock, (host, port))
        sock.send(req)  # a few hundred bytes: fits an empty send buffer
        loop.add_reader(sock.fileno(), g.readable)
        try:
            return await done
        finally:
            loop.remove_reader(sock.fileno())
    finally:
        sock.close()


@dataclass
class Load:
    n503: int = 0
    resumed: int = 0
    errors: int = 0
    bytes: int = 0
    done: int = 0
    times: list[float] = field(default_factory=list)


async def download(port: int, path: str, size: int, load: Load, t0: float,
                   host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    have = 0
    while have < size:
        rng = f"Range: bytes={have}-\r\n" if have else ""
        req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{rng}"
               "Connection: close\r\n\r\n").encode()
        try:
            g = await _get(loop, host, port, req)
        except OSError:
            load.errors += 1
            await asyncio.sleep(0.5)
            continue
        if g.status == 503:
            load.n503 += 1
            await asyncio.sleep(g.retry_after)
            continue
        if g.status in (200, 206):
            got = max(0, min(g.body, g.length if g.length >= 0 else g.body))
            load.bytes += got
            have = (0 if g.status == 200 else have) + got
            if have < size:
                load.resumed += 1
            continue
        load.errors += 1
        await asyncio.sleep(1.0)
    load.done += 1
    load.times.append(time.monotonic() - t0)


async def storm(port: int, path: str, size: int, n: int, deadline: float,
                host: str = "127.0.0.1") -> tuple[Load, float]:
    load = Load()
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(download(port, path, size, load, t0, host)) for _ in range(n)]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return load, time.monotonic() - t0


# -- the servers ------------------------------------------------------------------------


def serve_bootherd(spec: str) -> None:
    """Child process: bootherd's HTTP service alone, as `bootherd serve` runs it."""
    a = json.loads(spec)
    import uvloop

    uvloop.install()
    from bootherd.config import build
    from bootherd.inventory.db import make_engine, upgrade
    from bootherd.inventory.live import LiveInventory
    from bootherd.inventory.testbed import generate, import_testbed
    from bootherd.metrics import Metrics
    from bootherd.service import Context, wire

    tmp = Path(a["tmp"])
    url = f"sqlite:///{tmp}/i.db"
    e = make_engine(url)
    upgrade(e)
    import_testbed(e, generate(10, subnet="127.21.0.0/24"))
    http = {"port": a["port"], "root": a["root"], "log_dir": str(tmp / "logs"),
            "admin_token_file": str(tmp / "token")}
    if a.get("cap"):
        http["max_large_transfers"] = a["cap"]
    cfg = build({"http": http, "database": {"url": url}}, base_dir=tmp)

    async def main() -> None:
        live = LiveInventory(e)
        await live.start()
        svc = wire(Context(cfg, live, Metrics(), server_name="bench"), ["http"])
        await svc.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        from bootherd.web.files import STATS
        print(f"# bootherd sendfile: {dict(STATS)}", file=sys.stderr)
        await svc.stop()
        await live.stop()

    asyncio.run(main())


def start_bootherd(tmp: Path, root: Path, port: int, cap: int | None) -> subprocess.Popen:
    spec = json.dumps({"tmp": str(tmp), "root": str(root), "port": port, "cap": cap})
    p = subprocess.Popen([sys.executable, __file__, "--serve-bootherd", spec],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise SystemExit("bootherd did not start")
    return p


def start_nginx(tmp: Path, root: Path, port: int, workers: int,
                max_chunk: str = "") -> subprocess.Popen:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = tmp / "nginx"
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    {f"sendfile_max_chunk {max_chunk};" if max_chunk else ""}
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /files/ {{ alias {root}/; }}
    }}
}}
""")
    p = subprocess.Popen([nginx, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
                         stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p
        except OSError:
            if p.poll() is not None:
                msg = p.stderr.read().decode()  # type: ignore[union-attr]
                raise SystemExit(f"nginx failed: {msg}") from None
            time.sleep(0.05)
    p.kill()
    raise SystemExit("nginx did not start")


def stop(p: subprocess.Popen) -> None:
    terminate(p, 10)


# -- the run ----------------------------------------------------------------------------


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def fmt(load: Load, secs: float, n: int, cpu: float, gen_cpu: float) -> str:
    mbs = load.bytes / secs / 1e6
    p50 = statistics.median(load.times) if load.times else float("nan")
    worst = max(load.times) if load.times else float("nan")
    return (f"{mbs:9.0f} MB/s  {load.done:5d}/{n:<5d} done  {secs:6.1f} s  "
            f"p50 {p50:5.1f} s  max {worst:5.1f} s  503s {load.n503:5d}  "
            f"resumed {load.resumed:3d}  errors {load.errors}  server CPU {cpu:5.1f} s  "
            f"generator CPU {gen_cpu:5.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 10, 100 with an 8 MiB file")
    ap.add_argument("-n", type=int, nargs="*", help="client counts (default 10 100 1000)")
    ap.add_argument("--mib", type=int, help="file size in MiB (default 32)")
    ap.add_argument("--deadline", type=float, default=180.0, help="seconds per storm at most")
    ap.add_argument("--repeat", type=int, help="runs per server and N, median reported "
                    "(default 3, --quick 1)")
    ap.add_argument("--cap", type=int, help="bootherd http.max_large_transfers (default: config)")
    ap.add_argument("--nginx-workers", type=int, default=1,
                    help="nginx worker processes (1 = one process, like bootherd)")
    ap.add_argument("--nginx-sendfile-max-chunk", metavar="SIZE", default="",
                    help="nginx's sendfile_max_chunk (default: nginx's own, 2m), e.g. 512k "
                    "as bootherd's")
    ap.add_argument("--serve-bootherd", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_bootherd:
        serve_bootherd(a.serve_bootherd)
        return
    ns = a.n or ([10, 100] if a.quick else [10, 100, 1000])
    mib = a.mib or (8 if a.quick else 32)
    a.repeat = a.repeat or (1 if a.quick else 3)
    import uvloop

    uvloop.install()

    with tempfile.TemporaryDirectory(prefix="bootherd-bench-http-") as td:
        tmp = Path(td)
        tmp.chmod(0o755)  # nginx workers run as an unprivileged user
        root = tmp / "www"
        root.mkdir(mode=0o755)
        size = mib << 20
        (root / FILE).write_bytes(os.urandom(size))
        bport, nport = free_port(), free_port()
        bh = start_bootherd(tmp, root, bport, a.cap)
        ng = start_nginx(tmp, root, nport, a.nginx_workers, a.nginx_sendfile_max_chunk)
        try:
            print(f"# {mib} MiB file, generator uvloop, {os.cpu_count()} CPUs, "
                  f"nginx workers {a.nginx_workers}, nginx sendfile_max_chunk "
                  f"{a.nginx_sendfile_max_chunk or 'default'}, bootherd cap {a.cap or 'default (256)'}")
            rows = []
            servers = [("nginx", nport, ng), ("bootherd", bport, bh)]
            for n in ns:
                res: dict[str, list[float]] = {"nginx": [], "bootherd": []}
                for rep in range(a.repeat):
                    # Alternate who goes first: the box is shared, load drifts.
                    for name, port, proc in servers if rep % 2 == 0 else servers[::-1]:
                        cpu0, gen0 = cpu_seconds(proc.pid), own_cpu()
                        load, secs = asyncio.run(storm(port, f"/files/{FILE}", size, n,
                                                       a.deadline))
                        cpu, gen = cpu_seconds(proc.pid) - cpu0, own_cpu() - gen0
                        res[name].append(load.bytes / secs / 1e6)
                        print(f"N={n:<5d} {name:9s}{fmt(load, secs, n, cpu, gen)}", flush=True)
                b, g = statistics.median(res["bootherd"]), statistics.median(res["nginx"])
                ratio = b / g if g else float("nan")
                rows.append((n, b, g, ratio))
                print(f"N={n:<5d} bootherd/nginx = {ratio:.2f} (medians of {a.repeat})",
                      flush=True)
            print(f"\n|     N | bootherd MB/s | nginx MB/s | ratio |   (median of {a.repeat})")
            print("| ----: | ------------: | ---------: | ----: |")
            for n, b, g, r in rows:
                print(f"| {n:5d} | {b:13.0f} | {g:10.0f} | {r:5.2f} |")
        finally:
            stop(bh)
            stop(ng)


if __name__ == "__main__":
    main()

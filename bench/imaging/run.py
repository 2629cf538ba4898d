#!/usr/bin/env python3
"""Imaging benchmark: one disk image to 1, 10, 100 and 1,000 receivers, with 0 % and 1 %
loss at each receiver, from bootherd's multicast sessions, udpcast (udp-sender /
udp-receiver), uftp (uftp / uftpd), and unicast HTTP (bootherd's own and nginx), in
network namespaces on this machine.

The image is a 512 MiB disk made from Debian's own files (an MBR, an ext4 partition
populated by mkfs.ext4 -d, old random bytes in its free blocks, zeros after it) turned
into a bootherd image; every system sends that same image file, so all move the same
bytes.  Multicast senders are capped at the same rate (--rate-mbps).

Receivers, two kinds for bootherd: `bootherd` is simulated receivers sharing one socket
(bench/imaging/swarm.py: one real receiver that decodes, decompresses, writes and checks
the disk, the others counting symbols with their own loss, requests and LEAVE), which
reaches 1,000 receivers on one machine; `bootherd-procs` is the same kind of receivers
as the peers get: real processes (the MFS client bhimg-recv, built from
src/bootherd/imaging/client), each in its own namespace on the bridge, the first writing
the disk to /dev/shm and checking its SHA-256, the others writing to /dev/null as the
peers' do (each still checks every chunk's digest and decompresses it; the peers' check
nothing).  The peers' receivers (and bootherd-procs') are one per namespace, so that
loss is independent, at most --peer-max of them.  Loss: nftables drops that fraction of
the multicast datagrams entering each real receiver's namespace; the swarm drops the
same fraction per simulated receiver.  Start: udp-sender waits for all its receivers
(--min-receivers), uftp names them (-H), and bootherd's session waits for them too
(imaging.min_receivers, the server restarted per receiver count; --no-min-receivers:
it starts with the first JOIN and later joiners are served from the next pass).
bootherd's UDP GSO runs cross the bridge whole, so nftables drops whole runs (bursts
of a few datagrams) where the peers lose single datagrams.  Per cell: wall time until every receiver is done,
bytes the server's interface sent divided by the image size, CPU seconds of the server
and of all receivers (the instrument's own cost, to see when receivers are the limit),
receiver CPU per MiB of image, datagrams dropped at full receiver sockets (Udp
RcvbufErrors of each receiver namespace) and at the host's full backlog queues.

    sudo .venv/bin/python bench/imaging/run.py --quick        # 64 MiB, 1 and 10 receivers
    sudo .venv/bin/python bench/imaging/run.py                # the full matrix
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # tests.imaging.disks: the same disk builder as the tests
PY = sys.executable
SERVER_IP = "10.213.0.1"
CLIENT_IP = "10.213.1.1"
GROUP = "239.195.88.1"
CONTROL, HTTP, NGINX = 17979, 18080, 18081


def sh(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, **kw)


def ensure_peers() -> None:
    """udpcast, uftp and nginx from Debian, installed when missing (as root)."""
    want = {"udp-sender": "udpcast", "uftp": "uftp", "nginx": "nginx-light", "nft": "nftables"}
    missing = [pkg for tool, pkg in want.items() if shutil.which(tool) is None]
    if missing:
        print(f"# installing {' '.join(missing)}", file=sys.stderr)
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def wait_rusage(p: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Exit status and CPU seconds of a child (its own rusage, via wait4)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return p.returncode, ru.ru_utime + ru.ru_stime
        if time.monotonic() > deadline:
            os.kill(p.pid, signal.SIGKILL)
            pid, status, ru = os.wait4(p.pid, 0)
            p.returncode = -9
            return -9, ru.ru_utime + ru.ru_stime
        time.sleep(0.02)


class Bench:
    def __init__(self, args: argparse.Namespace):
        from bootherd.dhcp.netns import TestNet

        self.a = args
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.net = TestNet()
        self.peer_ns: list[str] = []
        self.server: subprocess.Popen | None = None
        self.server_min = 0  # the running server's imaging.min_receivers
        self.nginx: subprocess.Popen | None = None
        n = self.net
        n.sh(n.server, "ip route add 224.0.0.0/4 dev veth-s")
        n.sh(n.server, f"ip addr del {SERVER_IP}/16 dev veth-s && ip addr add {SERVER_IP}/16 brd + "
                       "dev veth-s && ip route replace default dev veth-s")
        # The server hands the kernel UDP GSO runs (a burst of 2 ms of its rate); veth
        # carries a run across the bridge whole, one frame per receiver, and each
        # receiver's nftables drops a run or keeps it: bootherd's 1 % loss comes in runs
        # of up to a burst, the peers' (no GSO) one datagram at a time.  Cutting the runs
        # at the server's veth (gso_max_segs 1) makes a burst of b datagrams b x N
        # frames at once in the host's 1,000-packet backlog queue: at 100 receivers
        # that dropped 900,000 frames, a limit of this one-host instrument, not of a
        # network, where the switch does the fan-out.
        n.sh(n.client, f"ip addr add {CLIENT_IP}/16 brd + dev br0")
        n.sh(n.client, "ip link set br0 type bridge mcast_snooping 0")
        n.sh(n.client, "ip route add 224.0.0.0/4 dev br0")

    # -- set-up

    def image(self) -> Path:
        from tests.imaging.disks import make_disk

        size = self.a.size_mib
        conf = self.conf()
        img = self.work / "images" / f"bench{size}.bhimg"
        sh(PY, "-m", "bootherd.cli", "db", "upgrade", "-c", str(conf), cwd=self.work)
        if not img.exists():
            print(f"# building a {size} MiB disk from Debian files", file=sys.stderr)
            disk = make_disk(self.work, size_mib=size, part_mib=size * 15 // 16,
                             files_mib=size * 9 // 16, name=f"disk{size}.raw")
            r = sh(PY, "-m", "bootherd.cli", "image", "create", str(disk), "-o", f"bench{size}",
                   "--replace", "-q", "-c", str(conf), cwd=self.work)
            print("# " + r.stdout.strip().replace("\n", "\n# "), file=sys.stderr)
            disk.unlink()
        return img

    def conf(self, min_receivers: int = 1) -> Path:
        c = self.work / "bootherd.toml"
        c.write_text(
            f'[database]\nurl = "sqlite:///{self.work}/inv.db"\n'
            f'[http]\naddress = "{SERVER_IP}"\nport = {HTTP}\nroot = "{self.work}/www"\n'
            f'max_large_transfers = 256\n'
            f'[imaging]\naddress = "{SERVER_IP}"\nport = {CONTROL}\nroot = "{self.work}/images"\n'
            f'multicast_group = "{GROUP}"\nmulticast_ports = "42200-42207"\n'
            f'rate_mbps = {self.a.rate_mbps}\nidle_timeout = 5.0\n'
            f'min_receivers = {min_receivers}\ngather_timeout = 60.0\n'
            f'adapt_rate = {"false" if self.a.no_adapt else "true"}\n'
            "[dhcp]\nenabled = false\n[tftp]\nenabled = false\n"
            "[bootinfo]\nenabled = false\n[tmcd]\nenabled = false\n[log]\nlevel = \"warning\"\n")
        return c

    def start_bootherd(self, min_receivers: int = 1) -> None:
        """bootherd serve; a session waits for min_receivers JOINs before it sends, as
        udp-sender is told --min-receivers (restarted when that changes)."""
        if self.server is not None:
            if self.server_min == min_receivers:
                return
            self.net.kill(self.server, signal.SIGTERM)
        self.server_min = min_receivers
        self.server = self.net.spawn(self.net.server, [PY, "-m", "bootherd.cli", "serve", "-c",
                                                       str(self.conf(min_receivers))],
                                     self.work / "serve.log", cwd=self.work)
        for _ in range(100):
            if self.net.sh(self.net.client, f"curl -fsS http://{SERVER_IP}:{HTTP}/health",
                           check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("bootherd did not start: " + (self.work / "serve.log").read_text())

    def start_nginx(self) -> None:
        d = self.work / "nginx"
        d.mkdir(exist_ok=True)
        (d / "nginx.conf").write_text(
            f"worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log; daemon off;\n"
            "events { worker_connections 4096; }\n"
            f"http {{ access_log off; sendfile on; tcp_nopush on; client_body_temp_path {d};\n"
            f"  proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n"
            f"  server {{ listen {SERVER_IP}:{NGINX};\n"
            f"    location /images/ {{ alias {self.work}/images/; }} }} }}\n")
        self.nginx = self.net.spawn(self.net.server, ["nginx", "-c", str(d / "nginx.conf")],
                                    d / "out.log")
        time.sleep(0.5)

    def peers(self, n: int) -> list[str]:
        while len(self.peer_ns) < n:
            i = len(self.peer_ns) + 1
            addr = f"10.213.{2 + i // 250}.{i % 250 + 1}"
            ns = self.net.add_peer(addr)
            self.net.sh(ns, f"ip addr del {addr}/16 dev veth-p && ip addr add {addr}/16 brd + "
                            "dev veth-p && ip route replace default dev veth-p && "
                            "ip route add 224.0.0.0/4 dev veth-p")
            self.peer_ns.append(ns)
        return self.peer_ns[:n]

    def set_loss(self, namespaces: list[str], loss: float) -> None:
        for ns in namespaces:
            self.net.sh(ns, "nft delete table inet loss", check=False)
            if loss:
                self.net.sh(ns, "nft add table inet loss && nft add chain inet loss in "
                                "'{ type filter hook input priority 0; }' && nft add rule inet "
                                "loss in ip daddr 224.0.0.0/4 numgen random mod 10000 "
                                f"\\< {round(loss * 10000)} drop")

    def socket_drops(self, namespaces: list[str]) -> int:
        """UDP datagrams the kernel dropped at full receive buffers in these namespaces."""
        total = 0
        for ns in namespaces:
            lines = [ln.split() for ln in self.net.sh(ns, "cat /proc/net/snmp").stdout.splitlines()
                     if ln.startswith("Udp:")]
            total += int(lines[1][lines[0].index("RcvbufErrors")])
        return total

    @staticmethod
    def backlog_drops() -> int:
        """Packets the host dropped at full per-CPU backlog queues (netdev_max_backlog):
        where the bridge's fan-out to many namespaces overflows (other work counts too)."""
        return sum(int(ln.split()[1], 16) for ln in Path("/proc/net/softnet_stat").read_text().splitlines())

    def tx(self) -> int:
        return int(self.net.sh(self.net.server, "cat /sys/class/net/veth-s/statistics/tx_bytes").stdout)

    def close(self) -> None:
        self.net.close()

    # -- cells

    def cell(self, system: str, n: int, loss: float, img: Path) -> dict[str, Any]:
        from bootherd.procs import cpu_seconds

        fn = getattr(self, "run_" + system.replace("-", "_"))
        server_pid = {"bootherd": self.server, "bootherd-procs": self.server,
                      "http-bootherd": self.server,
                      "http-nginx": self.nginx}.get(system)
        if system.startswith("bootherd"):
            self.start_bootherd(n if self.a.min_receivers else 1)
            server_pid = self.server
        rx_ns = [self.net.client] + (self.peers(min(n, self.a.peer_max))
                                     if system in ("bootherd-procs", "udpcast", "uftp") else [])
        drops0, backlog0 = self.socket_drops(rx_ns), self.backlog_drops()
        cpu0 = cpu_seconds(server_pid.pid) if server_pid else 0.0
        tx0 = self.tx()
        t0 = time.monotonic()
        res = fn(n, loss, img)
        res.setdefault("wall", time.monotonic() - t0)
        if server_pid:
            res["server_cpu"] = cpu_seconds(server_pid.pid) - cpu0
        res["bytes_ratio"] = (self.tx() - tx0) / img.stat().st_size
        res["socket_drops"] = self.socket_drops(rx_ns) - drops0
        res["backlog_drops"] = self.backlog_drops() - backlog0
        if res.get("receivers_cpu") is not None:
            procs = n if system != "bootherd" else 1  # the swarm is one process
            res["cpu_per_mib"] = 1000 * res["receivers_cpu"] / procs / (img.stat().st_size / 2**20)
        res.update(system=system, receivers=n, loss=loss)
        return res

    def run_bootherd(self, n: int, loss: float, img: Path) -> dict[str, Any]:
        out = Path("/dev/shm") / f"bh-bench-{os.getpid()}.raw"
        p = self.net.spawn(self.net.client, [PY, str(HERE / "swarm.py"), SERVER_IP, str(CONTROL),
                                             str(HTTP), img.stem, str(n), str(loss), str(out)],
                           self.work / "swarm.log")
        code, cpu = wait_rusage(p, self.a.deadline)
        lines = [ln for ln in (self.work / "swarm.log").read_text().splitlines() if ln.startswith("{")]
        r = json.loads(lines[-1]) if lines and code == 0 else {"ok": False}
        (self.work / "swarm.log").unlink()
        out.unlink(missing_ok=True)
        return {"ok": n if r.get("ok") else 0, "wall": r.get("seconds"), "receivers_cpu": cpu}

    def c_client(self) -> Path:
        if self.a.client:
            return Path(self.a.client)
        exe = self.work / "bhimg-recv"
        src = REPO / "src/bootherd/imaging/client/bhimg-recv.c"
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            sh("gcc", "-O2", "-o", str(exe), str(src), "-lzstd", "-lm")
        return exe

    def run_bootherd_procs(self, n: int, loss: float, img: Path) -> dict[str, Any]:
        client = self.c_client()
        ns = self.peers(n)
        self.set_loss(ns, loss)
        out0 = Path("/dev/shm") / f"bhimg-{os.getpid()}.raw"
        t0 = time.monotonic()
        argvs = [(x, [str(client), "--server", SERVER_IP, "--port", str(CONTROL), "--http-port",
                      str(HTTP), "--image", img.stem, "-o", str(out0) if i == 0 else "/dev/null",
                      "--quiet"]) for i, x in enumerate(ns)]
        ok, cpu, wall = self._real_receivers(argvs, [], t0)
        out0.unlink(missing_ok=True)  # receiver 0 exits 0 only if its disk's SHA-256 matched
        self.set_loss(ns, 0)
        return {"ok": ok, "wall": wall, "receivers_cpu": cpu}

    def _real_receivers(self, argvs: list[tuple[str, list[str]]], senders: list[subprocess.Popen],
                        t0: float) -> tuple[int, float, float]:
        procs = [self.net.spawn(ns, argv, self.work / f"r{i}.log") for i, (ns, argv) in
                 enumerate(argvs)]
        ok, cpu, last = 0, 0.0, t0
        for p in procs:
            code, c = wait_rusage(p, max(1.0, self.a.deadline - (time.monotonic() - t0)))
            ok += code == 0
            cpu += c
            last = max(last, time.monotonic())
        for s in senders:
            if s.poll() is None:
                self.net.kill(s)
        return ok, cpu, last - t0

    def run_udpcast(self, n: int, loss: float, img: Path) -> dict[str, Any]:
        ns = self.peers(n)
        self.set_loss(ns, loss)
        out0 = Path("/dev/shm") / f"udpcast-{os.getpid()}.bin"
        t0 = time.monotonic()
        sender = self.net.spawn(self.net.server, [
            "udp-sender", "--file", str(img), "--interface", "veth-s", "--mcast-data-address",
            GROUP, "--portbase", "9000", "--min-receivers", str(n), "--max-bitrate",
            f"{int(self.a.rate_mbps)}m", "--nokbd", "--max-wait", "60"], self.work / "udp-sender.log")
        time.sleep(0.3)
        if sender.poll() is not None:
            raise RuntimeError("udp-sender: " + (self.work / "udp-sender.log").read_text()[-300:])
        argvs = [(x, ["udp-receiver", "--file", str(out0) if i == 0 else "/dev/null",
                      "--interface", "veth-p", "--portbase", "9000", "--nokbd"])
                 for i, x in enumerate(ns)]
        ok, cpu, wall = self._real_receivers(argvs, [], t0)
        code, scpu = wait_rusage(sender, 30)
        good = out0.exists() and _sha(out0) == _sha(img)
        out0.unlink(missing_ok=True)
        self.set_loss(ns, 0)
        return {"ok": ok if good else 0, "wall": wall, "receivers_cpu": cpu, "server_cpu": scpu}

    def run_uftp(self, n: int, loss: float, img: Path) -> dict[str, Any]:
        ns = self.peers(n)
        self.set_loss(ns, loss)
        dirs = []
        for i in range(n):
            d = self.work / "uftp" / str(i)
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            if i:  # only the first keeps what it received; the others write to /dev/null
                os.symlink("/dev/null", d / img.name)
            dirs.append(d)
        daemons = [self.net.spawn(x, ["uftpd", "-d", "-q", "-x", "0", "-I", "veth-p", "-D",
                                      str(dirs[i]), "-U", f"0x{i + 1:08x}", "-L", "/dev/null"],
                                  self.work / f"uftpd{i}.log") for i, x in enumerate(ns)]
        time.sleep(0.5)
        hosts = ",".join(f"0x{i + 1:08x}" for i in range(n))
        t0 = time.monotonic()
        sender = self.net.spawn(self.net.server, [
            "uftp", "-I", "veth-s", "-R", str(int(self.a.rate_mbps * 1000)), "-Y", "none",
            "-H", hosts, "-x", "1", img.name], self.work / "uftp.log", cwd=img.parent)
        code, scpu = wait_rusage(sender, self.a.deadline)
        wall = time.monotonic() - t0
        log = (self.work / "uftp.log").read_text(errors="replace")
        from bootherd.procs import cpu_seconds
        cpu = sum(cpu_seconds(d.pid) for d in daemons)
        for d in daemons:
            self.net.kill(d, signal.SIGTERM)
        got = dirs[0] / img.name
        good = code == 0 and got.exists() and _sha(got) == _sha(img)
        failed = log.count("aborted") + log.count("Dropping")
        shutil.rmtree(self.work / "uftp", ignore_errors=True)
        self.set_loss(ns, 0)
        return {"ok": (n - failed) if good else 0, "wall": wall, "server_cpu": scpu,
                "receivers_cpu": cpu}

    def _http(self, port: int, n: int, img: Path) -> dict[str, Any]:
        code = (f"import asyncio,json,sys; sys.path.insert(0,{str(HERE)!r}); import httpload;"
                f"print(json.dumps(asyncio.run(httpload.storm({SERVER_IP!r},{port},"
                f"'/images/{img.name if port == NGINX else img.stem}',{img.stat().st_size},{n},"
                f"{self.a.deadline}))))")
        p = self.net.spawn(self.net.client, [PY, "-c", code], self.work / "http.log")
        rc, cpu = wait_rusage(p, self.a.deadline + 30)
        text = (self.work / "http.log").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        if not lines:
            print(f"# http load failed: {text[-500:]}", file=sys.stderr)
        (self.work / "http.log").unlink()
        r = json.loads(lines[-1]) if lines else {"done": 0, "seconds": None}
        return {"ok": r["done"], "wall": r["seconds"], "receivers_cpu": cpu}

    def run_http_bootherd(self, n: int, loss: float, img: Path) -> dict[str, Any]:
        return self._http(HTTP, n, img)

    def run_http_nginx(self, n: int, loss: float, img: Path) -> dict[str, Any]:
        return self._http(NGINX, n, img)


def _sha(p: Path) -> str:
    from tests.imaging.lab import sha256

    return sha256(p)


def fmt_row(r: dict[str, Any]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)
    return (f"| {r['system']} | {r['receivers']} | {100 * r['loss']:.0f} % | {f(r.get('wall'), '.2f')} "
            f"| {f(r.get('bytes_ratio'), '.3f')} | {f(r.get('server_cpu'), '.2f')} "
            f"| {f(r.get('receivers_cpu'), '.2f')} | {f(r.get('cpu_per_mib'), '.1f')} "
            f"| {f(r.get('socket_drops'), 'd')} | {f(r.get('backlog_drops'), 'd')} "
            f"| {r.get('ok')}/{r['receivers']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--receivers", default="1,10,100,1000")
    ap.add_argument("--loss", default="0,0.01")
    ap.add_argument("--rate-mbps", type=float, default=100.0,
                    help="the same cap for every multicast sender")
    ap.add_argument("--systems",
                    default="bootherd,bootherd-procs,udpcast,uftp,http-bootherd,http-nginx")
    ap.add_argument("--peer-max", type=int, default=100,
                    help="most real receiver processes (peers) per cell")
    ap.add_argument("--deadline", type=float, default=600.0)
    ap.add_argument("--work", default=str(REPO / "var" / "bench-imaging"))
    ap.add_argument("--quick", action="store_true", help="64 MiB, 1 and 10 receivers")
    ap.add_argument("--client", help="a bhimg-recv binary for bootherd-procs (default: built "
                                     "from src/bootherd/imaging/client)")
    ap.add_argument("--no-min-receivers", dest="min_receivers", action="store_false",
                    help="bootherd sessions start at the first JOIN (imaging.min_receivers 1)")
    ap.add_argument("--no-adapt", action="store_true", help="imaging.adapt_rate = false")
    a = ap.parse_args()
    if a.quick:
        a.size_mib, a.receivers = 64, "1,10"
    if os.geteuid() != 0:
        sys.exit("bench/imaging needs root (network namespaces)")
    ensure_peers()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    b = Bench(a)
    rows = []
    try:
        img = b.image()
        b.start_bootherd()
        if "http-nginx" in a.systems:
            b.start_nginx()
        print(f"# image {img.name}: {img.stat().st_size / 2**20:.1f} MiB file for a "
              f"{a.size_mib} MiB disk; multicast capped at {a.rate_mbps:g} Mbit/s; "
              f"{os.cpu_count()} CPUs")
        print("| system | receivers | loss | wall s | server bytes / image | server CPU s "
              "| receivers CPU s | receiver CPU ms / MiB | receiver socket drops "
              "| host backlog drops | done |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for n in [int(x) for x in a.receivers.split(",")]:
            for loss in [float(x) for x in a.loss.split(",")]:
                for system in a.systems.split(","):
                    if system.startswith("http") and loss:
                        continue  # TCP: loss is retransmitted, not a multicast question
                    if system in ("bootherd-procs", "udpcast", "uftp") and n > a.peer_max:
                        print(f"| {system} | {n} | {100 * loss:.0f} % | not run: {n} receiver "
                              f"processes exceed --peer-max {a.peer_max} | | | | | | | |", flush=True)
                        continue
                    r = b.cell(system, n, loss, img)
                    rows.append(r)
                    print(fmt_row(r), flush=True)
    finally:
        if b.server:
            b.net.kill(b.server, signal.SIGTERM)
        if b.nginx:
            b.net.kill(b.nginx, signal.SIGTERM)
        b.close()
    one = {(r["system"], r["loss"]): r for r in rows if r["receivers"] == 1}
    for r in rows:
        base = one.get((r["system"], r["loss"]))
        if r["system"].startswith("bootherd") and base and r["receivers"] > 1 and r.get("wall"):
            print(f"# {r['system']} {r['receivers']} receivers, {100 * r['loss']:.0f} % loss: "
                  f"{r['wall'] / base['wall']:.2f} x the time of one")
    at = {(r["system"], r["receivers"], r["loss"]): r for r in rows}
    for me in ("bootherd-procs", "bootherd"):  # real receiver processes first: like for like
        for peer in ("udpcast", "uftp"):
            for n in (100, 10):
                mine, theirs = at.get((me, n, 0.01)), at.get((peer, n, 0.01))
                if mine and theirs and mine.get("wall") and theirs.get("wall"):
                    print(f"# {n} receivers, 1 % loss: {me} {mine['wall']:.2f} s, {peer} "
                          f"{theirs['wall']:.2f} s ({theirs['wall'] / mine['wall']:.2f} x); bytes "
                          f"{mine['bytes_ratio']:.3f} x vs {theirs['bytes_ratio']:.3f} x")
                    break


if __name__ == "__main__":
    main()

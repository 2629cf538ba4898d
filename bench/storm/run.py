"""Boot-storm benchmark: bootherd at 1,000 / 5,000 / 10,000 nodes, and the DHCP+TFTP
phases of 1,000 nodes against dnsmasq and against Kea with tftp-hpa, same run.

    .venv/bin/python bench/storm/run.py [--sizes 1000,5000,10000] [--peer-nodes 1000]
                                        [--legacy-nodes 200] [--no-peers] [--workers 1]

Everything binds loopback: the nodes are a generated testbed on 127.65.0.0/16,
servers on 127.0.0.1 with high ports.  Prints nodes booted, failures, p99 boot
time per run, and legacy versus optimized request counts per node.
Goal: 10,000 nodes powered on within one second all reach ISUP, zero failures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bootherd.procs import terminate

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers import Dnsmasq, KeaTftpHpa  # noqa: E402

SUBNET = "127.65.0.0/16"
PORTS = {"dhcp": 36767, "proxy": 34011, "tftp": 31069, "bootinfo": 36969, "client": 39696,
         "order": 36970, "tmcd": 37777, "http": 38080, "relay": 36768, "imaging": 37979}
PY = sys.executable


def bootherd(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    return subprocess.run([PY, "-m", "bootherd.cli", *args], cwd=cwd, check=True, text=True,
                          capture_output=True, **kw)


def has_relay_key() -> bool:
    from bootherd.config import SCHEMA

    return any(k.name == "relay_port" for k in SCHEMA["dhcp"][1])


def write_config(work: Path) -> Path:
    relay = f"relay_port = {PORTS['relay']}\n" if has_relay_key() else ""
    cfg = work / "bootherd.toml"
    cfg.write_text(
        '[database]\nurl = "sqlite:///bootherd.db"\n'
        f'[dhcp]\nport = {PORTS["dhcp"]}\nproxy_port = {PORTS["proxy"]}\n{relay}'
        f'[tftp]\nroot = "tftpboot"\nport = {PORTS["tftp"]}\n'
        f'[bootinfo]\nport = {PORTS["bootinfo"]}\nclient_port = {PORTS["client"]}\n'
        f'order_port = {PORTS["order"]}\n'
        f'[tmcd]\nport = {PORTS["tmcd"]}\nfallback_port = 0\n'
        f'[imaging]\nport = {PORTS["imaging"]}\n'
        f'[http]\nport = {PORTS["http"]}\nroot = "www"\nlog_dir = "nodelogs"\n'
        'admin_token_file = "admin-token"\n'
        '[states]\npxewakeup_timeout = 5.0\n')
    return cfg


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.2)
    raise RuntimeError(f"port {port} not open after {timeout}s")


def storm(work: Path, nodes: int, out: Path, *extra: str, timeout: float = 1800) -> dict:
    relay = ["--relay-port", str(PORTS["relay"] if has_relay_key() else 67)]
    cmd = [PY, "-m", "bootherd.cli", "storm", "--nodes", str(nodes), "-c", "bootherd.toml",
           "--json", str(out), "--quiet", "--relay-address", "127.66.0.1", *relay, *extra]
    r = subprocess.run(cmd, cwd=work, text=True, capture_output=True, timeout=timeout)
    if not out.exists():
        raise RuntimeError(f"storm failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
    return json.loads(out.read_text())["summary"]


def line(label: str, s: dict) -> str:
    b = s["boot_time"]
    p99 = f"{b['p99']:.2f}s" if b["p99"] is not None else "-"
    return (f"{label:<44} booted {s['reached_isup']:>6}/{s['nodes']:<6} failures {s['failed']:>5}"
            f"  p99 {p99:>8}  retries {s['retries']['total']:>6}  wall {s['wall_time']:.1f}s")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,5000,10000")
    ap.add_argument("--peer-nodes", type=int, default=1000)
    ap.add_argument("--legacy-nodes", type=int, default=200)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    total = max(sizes + [args.peer_nodes, args.legacy_nodes])
    work = Path(tempfile.mkdtemp(prefix="bootherd-bench-storm-"))
    (work / "tftpboot").mkdir()
    (work / "www").mkdir()
    cfg = write_config(work)
    bootherd("db", "upgrade", "-c", str(cfg), cwd=work)
    bootherd("testbed", "generate", "--nodes", str(total), "--subnet", SUBNET, "-o", "tb.toml",
             cwd=work)
    bootherd("testbed", "import", "tb.toml", "-c", str(cfg), cwd=work)
    from bootherd.service import available

    have = available()
    names = {"dhcp": "dhcp", "tftp": "tftp", "bootinfo": "bootinfo", "tmcd": "tmcd", "http": "http"}
    phases = ",".join(p for p in names if p in have)
    print(f"work folder {work}; bootherd services in this build: {', '.join(have)}")
    results: dict[str, dict] = {}
    log = work / "serve.log"
    with open(log, "w") as lf:
        server = subprocess.Popen([PY, "-m", "bootherd.cli", "serve", "-c", str(cfg)], cwd=work,
                                  stdout=lf, stderr=subprocess.STDOUT)
        try:
            wait_port(PORTS["tmcd"] if "tmcd" in have else PORTS["http"], server, log)
            time.sleep(0.5)
            for n in sizes:
                s = storm(work, n, work / f"opt-{n}.json", "--phases", phases,
                          "--start-spread", "1", "--workers", str(args.workers))
                results[f"bootherd optimized {n}"] = s
                print(line(f"bootherd optimized, {n} nodes, spread 1s", s), flush=True)
            for prof in ("optimized", "legacy"):
                s = storm(work, args.legacy_nodes, work / f"{prof}-small.json", "--phases", phases,
                          "--profile", prof, "--tarball-bytes", "65536", "--rpm-bytes", "16384")
                results[f"bootherd {prof} {args.legacy_nodes}"] = s
                print(line(f"bootherd {prof}, {args.legacy_nodes} nodes", s), flush=True)
            if not args.no_peers and "dhcp" in have and "tftp" in have:
                s = storm(work, args.peer_nodes, work / "bootherd-dhcp-tftp.json",
                          "--phases", "dhcp,tftp")
                results["bootherd dhcp+tftp"] = s
                print(line(f"bootherd DHCP+TFTP, {args.peer_nodes} nodes", s), flush=True)
        finally:
            terminate(server, 30)
    if not args.no_peers:
        results.update(run_peers(work, args.peer_nodes))
    legacy = results.get(f"bootherd legacy {args.legacy_nodes}")
    opt = results.get(f"bootherd optimized {args.legacy_nodes}")
    if legacy and opt:
        print(f"\nrequests per node, legacy vs optimized ({args.legacy_nodes} nodes):")
        keys = sorted(set(legacy["requests"]) | set(opt["requests"]))
        for k in keys:
            lv, ov = legacy["requests"].get(k, 0), opt["requests"].get(k, 0)
            print(f"  {k:<22} legacy {lv / legacy['nodes']:>7.1f}   optimized "
                  f"{ov / opt['nodes']:>7.1f}")
    (work / "bench.json").write_text(json.dumps(results, indent=1))
    print(f"\nall figures: {work / 'bench.json'}")
    if not args.keep:
        shutil.rmtree(work / "www", ignore_errors=True)  # the big stand-in files
    return 0


def run_peers(work: Path, nodes: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    from bootherd.config import load
    from bootherd.inventory.db import make_engine
    from bootherd.inventory.snapshot import load as load_snapshot
    from bootherd.storm.runner import select_nodes

    cwd = os.getcwd()
    os.chdir(work)
    try:
        cfg = load(work / "bootherd.toml")
        snap = load_snapshot(make_engine(cfg.database_url))
    finally:
        os.chdir(cwd)
    specs = select_nodes(snap, nodes, 0, 1)
    for peer_cls in (Dnsmasq, KeaTftpHpa):
        peer = peer_cls(work / peer_cls.name, specs, relay="127.65.255.254")
        try:
            why = peer.start()
        except Exception as e:  # noqa: BLE001 - a peer that cannot start is reported, not fatal
            why = f"{type(e).__name__}: {e}"
        if why:
            print(f"{peer.name}: not run: {why}")
            peer.stop()
            continue
        try:
            s = storm(work, nodes, work / f"{peer.name}.json", "--phases", "dhcp,tftp",
                      "--server", peer.servers(), "--relay-address", peer.relay,
                      "--relay-port", str(peer.relay_port), "--no-allocate")
            out[f"{peer.name} dhcp+tftp"] = s
            print(line(f"{peer.label} DHCP+TFTP, {nodes} nodes", s), flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{peer.name}: storm failed: {e}")
        finally:
            peer.stop()
    return out


if __name__ == "__main__":
    sys.exit(main())

"""DHCPv6 rate benchmark: bootherd vs Kea's DHCPv6 server (memfile, persisted).

Same machine, same run, same load: a server namespace (veth-s fd13::1/64) holds one server
at a time; perfdhcp -6 runs in the client namespace on br0, sending SOLICITs to ff02::1:2
from 20,000 simulated clients (DUID-LLs of random MACs, unknown to the inventory), so
bootherd runs with dhcp6.unknown_clients = "pool" (allocate, persist, answer: Kea's work).
For each server the offered rate steps up until drops reach 1%; the figure is perfdhcp's
completed 4-way exchanges (SOLICIT-ADVERTISE-REQUEST-REPLY) per second at the highest
step under 1% drops.

    sudo .venv/bin/python bench/dhcp6/run.py [--period 5] [--clients 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bootherd.dhcp.netns import PREFIX, TestNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dhcp"))
from run import bench_main, rate_search, wait_log  # noqa: E402  bench/dhcp/run.py

SERVER6 = "fd13::1"
POOL = ("fd13::1:0", "fd13::ffff:ffff")
STEPS = [1000, 2000, 3000, 4000, 5000, 6000, 8000, 10000]
REFINE = 3


def parse(text: str, period: int) -> tuple[float, float]:
    """(completed SARR/s, worst drop ratio in %) from perfdhcp -6's report."""
    m = re.search(r"REQUEST-REPLY\*+\n.*?received packets: (\d+)", text, re.S)
    drops = [float(x) for x in re.findall(r"drops ratio: ([\d.]+) %", text)]
    return (int(m.group(1)) / period if m else 0.0), (max(drops) if drops else 100.0)


def start_bootherd(net: TestNet, d: Path) -> Any:
    from bootherd.inventory.db import make_engine, upgrade
    from bootherd.inventory.testbed import generate, import_testbed

    e = make_engine(f"sqlite:///{d}/bootherd.db")
    upgrade(e)
    import_testbed(e, generate(100, subnet=f"{PREFIX}.0.0/24"))
    e.dispose()
    cfg = d / "bootherd.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{d}/bootherd.db"\n'
                   f'[server]\npublic_address = "{SERVER6}"\n[log]\nlevel = "warning"\n'
                   '[dhcp]\nenabled = false\n'
                   f'[dhcp6]\nenabled = true\naddress = "{SERVER6}"\nport = 547\n'
                   'interface = "veth-s"\nunknown_clients = "pool"\n'
                   f'pool = "{POOL[0]}-{POOL[1]}"\ndynamic_lease_time = 4000\n'
                   'rapid_commit = false\n')
    log = d / "bootherd.log"
    p = net.spawn(net.server, [sys.executable, "-m", "bootherd.cli", "serve", "--only", "dhcp6",
                               "--config", str(cfg), "--set", "log.level=info"], log)
    wait_log(log, "bootherd ready")
    return p


def start_kea(net: TestNet, d: Path) -> Any:
    conf = {"Dhcp6": {
        "interfaces-config": {"interfaces": ["veth-s"]},
        # Its DUID file would go to /var/lib/kea: keep everything in the run's folder.
        "data-directory": str(d),
        "server-id": {"type": "LL", "persist": False},
        "lease-database": {"type": "memfile", "persist": True, "name": str(d / "kea6.leases"),
                           "lfc-interval": 0},
        "preferred-lifetime": 3000, "valid-lifetime": 4000,
        "subnet6": [{"id": 1, "subnet": "fd13::/64", "interface": "veth-s",
                     "pools": [{"pool": f"{POOL[0]} - {POOL[1]}"}]}],
        "loggers": [{"name": "kea-dhcp6", "severity": "WARN",
                     "output_options": [{"output": str(d / "kea-out.log")}]}],
    }}
    (d / "kea6.json").write_text(json.dumps(conf))
    env = {**os.environ, "KEA_PIDFILE_DIR": str(d), "KEA_LOCKFILE_DIR": str(d),
           "KEA_LOGGER_DESTINATION": str(d / "kea-out.log")}
    p = net.spawn(net.server, ["kea-dhcp6", "-c", str(d / "kea6.json")], d / "kea.log", env=env)
    time.sleep(1.5)
    if p.poll() is not None:
        raise RuntimeError((d / "kea.log").read_text())
    return p


STARTERS = {"bootherd": start_bootherd, "kea": start_kea}
BINARIES = {"kea": "kea-dhcp6"}


def measure(net: TestNet, name: str, d: Path, period: int, clients: int,
            verbose: bool) -> float:
    p = STARTERS[name](net, d)
    best = 0.0

    def step(rate: int) -> bool:
        nonlocal best
        r = net.sh(net.client, f"timeout -k 2 {period + 30} perfdhcp -6 -l br0 -r {rate} "
                   f"-p {period} -R {clients} -W 1000000 all", check=False)
        got, drops = parse(r.stdout + r.stderr, period)
        if verbose:
            print(f"  {name:8s} offered {rate:6d}/s -> {got:8.1f} SARR/s, drops {drops:.2f}%",
                  flush=True)
        if drops < 1.0:
            best = max(best, got)
        return drops < 1.0

    try:
        rate_search(step, STEPS, REFINE)
    finally:
        net.kill(p)
    return best


def run_all(args: argparse.Namespace, results: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory(prefix="bh-dhcp6-bench-") as tmp, TestNet() as net:
        net.sh(net.server, f"ip -6 addr add {SERVER6}/64 dev veth-s nodad")
        for _ in range(100):  # br0's link-local out of duplicate address detection
            if not net.sh(net.client, "ip -6 addr show dev br0 tentative").stdout.strip():
                break
            time.sleep(0.1)
        for name in args.servers.split(","):
            if name in BINARIES and shutil.which(BINARIES[name]) is None:
                print(f"{name}: skipped ({BINARIES[name]} not installed)")
                continue
            d = Path(tmp) / name
            d.mkdir()
            results[name] = measure(net, name, d, args.period, args.clients, not args.quiet)


def main() -> int:
    return bench_main(__doc__ or "", "bootherd,kea", run_all, "SARR/s")


if __name__ == "__main__":
    sys.exit(main())

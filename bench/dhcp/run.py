"""DHCP rate benchmark: bootherd vs Kea (memfile, persisted; 1 and 2 threads) vs dnsmasq.

Same machine, same run: a server namespace (veth-s 10.213.0.1/16) holds one server at a
time; perfdhcp runs in the client namespace as a relay (-l 10.213.0.250, replies to
giaddr:67) with 20,000 simulated clients, whose random MACs are unknown to the inventory,
so bootherd runs with unknown_clients = "pool" (the same work as Kea's pool: allocate,
persist, answer).  For each server the offered rate steps up until drops reach 1%; the
figure is perfdhcp's achieved 4-way exchange rate at the highest step under 1% drops.

    sudo .venv/bin/python bench/dhcp/run.py [--period 5] [--clients 20000]
    sudo .venv/bin/python bench/dhcp/run.py --servers bootherd --baseline /tmp/main/src
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bootherd.dhcp.netns import PREFIX, SERVER_IP, TestNet, usable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baseline  # noqa: E402  bench/baseline.py

LOCAL = f"{PREFIX}.0.250"
POOL = (f"{PREFIX}.16.1", f"{PREFIX}.255.254")

STEPS = {
    "bootherd": [2000, 4000, 6000, 7000, 8000, 9000, 10000, 12000],
    "kea": [2000, 4000, 6000, 7000, 8000, 9000, 10000, 12000],
    "kea-mt": [2000, 4000, 6000, 7000, 8000, 9000, 10000, 12000],
    "dnsmasq": [100, 200, 400, 600, 800, 1200],
}
REFINE = 3  # halvings between the last clean step and the first with drops
# perfdhcp's socket takes the host default receive buffer (212 KiB): a server that answers
# in bursts would see its replies dropped there, in the load generator.  Every server runs
# with the same larger default for the duration of the benchmark.
RMEM_DEFAULT = 8 << 20


def parse(text: str, period: int) -> tuple[float, float]:
    """(completed DORA/s, worst drop ratio in %) from perfdhcp's report.

    perfdhcp's own "Rate" divides by the period plus the -W wait; completed ACKs over the
    sending period is the figure comparable with the offered rate."""
    m = re.search(r"REQUEST-ACK\*+\n.*?received packets: (\d+)", text, re.S)
    drops = [float(x) for x in re.findall(r"drops ratio: ([\d.]+) %", text)]
    return (int(m.group(1)) / period if m else 0.0), (max(drops) if drops else 100.0)


def wait_log(path: Path, needle: str, timeout: float = 15.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path}: no {needle!r}:\n{path.read_text(errors='replace')[-2000:]}")


def start_bootherd(net: TestNet, d: Path, src: str | None = None) -> Any:
    """This checkout's bootherd, or with `src` another checkout's src/ (--baseline)."""
    cfg = d / "bootherd.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{d}/bootherd.db"\n'
                   f'[server]\npublic_address = "{SERVER_IP}"\n[log]\nlevel = "warning"\n'
                   f'[dhcp]\naddress = "{SERVER_IP}"\nport = 67\nunknown_clients = "pool"\n'
                   f'dynamic_pool = "{POOL[0]}-{POOL[1]}"\ndynamic_lease_time = 4000\n')
    baseline.inventory(d, cfg, ["--nodes", "100", "--subnet", f"{PREFIX}.0.0/24"], src)
    log = d / "bootherd.log"
    p = net.spawn(net.server, [sys.executable, "-m", "bootherd.cli", "serve", "--only", "dhcp",
                               "--config", str(cfg), "--set", "log.level=info"], log,
                  env=baseline.env(src))
    wait_log(log, "bootherd ready")
    return p


def start_kea(net: TestNet, d: Path, threads: int = 0) -> Any:
    conf: dict[str, Any] = {"Dhcp4": {
        "interfaces-config": {"interfaces": [f"veth-s/{SERVER_IP}"], "dhcp-socket-type": "udp"},
        "lease-database": {"type": "memfile", "persist": True, "name": str(d / "kea.leases"),
                           "lfc-interval": 0},
        "valid-lifetime": 4000,
        "subnet4": [{"id": 1, "subnet": f"{PREFIX}.0.0/16",
                     "pools": [{"pool": f"{POOL[0]} - {POOL[1]}"}]}],
        "loggers": [{"name": "kea-dhcp4", "severity": "WARN",
                     "output_options": [{"output": str(d / "kea-out.log")}]}],
    }}
    if threads:
        # Kea 2.2 runs single-threaded unless told; its documented packet queue size.
        conf["Dhcp4"]["multi-threading"] = {"enable-multi-threading": True,
                                            "thread-pool-size": threads,
                                            "packet-queue-size": 64}
    (d / "kea.json").write_text(json.dumps(conf))
    env = {**os.environ, "KEA_PIDFILE_DIR": str(d), "KEA_LOCKFILE_DIR": str(d),
           "KEA_LOGGER_DESTINATION": str(d / "kea-out.log")}
    p = net.spawn(net.server, ["kea-dhcp4", "-c", str(d / "kea.json")], d / "kea.log", env=env)
    time.sleep(1.5)
    if p.poll() is not None:
        raise RuntimeError((d / "kea.log").read_text())
    return p


def start_dnsmasq(net: TestNet, d: Path) -> Any:
    p = net.spawn(net.server, [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=veth-s",
        "--bind-interfaces", "--no-ping", "--dhcp-lease-max=200000",
        f"--dhcp-range={POOL[0]},{POOL[1]},255.255.0.0,4000",
        f"--dhcp-leasefile={d}/dnsmasq.leases", f"--pid-file={d}/dnsmasq.pid"],
        d / "dnsmasq.log")
    time.sleep(1.0)
    if p.poll() is not None:
        raise RuntimeError((d / "dnsmasq.log").read_text())
    return p


STARTERS = {"bootherd": start_bootherd, "kea": start_kea,
            "kea-mt": lambda net, d: start_kea(net, d, threads=2), "dnsmasq": start_dnsmasq}
BINARIES = {"kea": "kea-dhcp4", "kea-mt": "kea-dhcp4", "dnsmasq": "dnsmasq"}


def measure(net: TestNet, name: str, d: Path, period: int, clients: int,
            verbose: bool) -> tuple[float, list[tuple[int, float, float]]]:
    p = STARTERS[name](net, d)
    best = 0.0
    runs: list[tuple[int, float, float]] = []

    def step(rate: int) -> bool:
        nonlocal best
        r = net.sh(net.client, f"timeout -k 2 {period + 30} perfdhcp -4 -l {LOCAL} "
                   f"-r {rate} -p {period} -R {clients} -W 1000000 {SERVER_IP}", check=False)
        got, drops = parse(r.stdout + r.stderr, period)
        runs.append((rate, got, drops))
        if verbose:
            print(f"  {name:8s} offered {rate:6d}/s -> {got:8.1f} DORA/s, drops {drops:.2f}%",
                  flush=True)
        if drops < 1.0:
            best = max(best, got)
        return drops < 1.0

    try:
        rate_search(step, STEPS[name])
    finally:
        net.kill(p)
    return best, runs


def rate_search(step: Callable[[int], bool], steps: list[int], refine: int = REFINE) -> int:
    """Offer each rate of `steps` until `step(rate)` fails (drops over the limit), then
    halve the gap between the last clean rate and the first failing one `refine` times;
    returns the highest clean rate offered."""
    good, bad = 0, 0
    for rate in steps:
        if not step(rate):
            bad = rate
            break
        good = rate
    for _ in range(refine if bad else 0):
        mid = (good + bad) // 2
        if step(mid):
            good = mid
        else:
            bad = mid
    return good


def bench_main(doc: str, servers: str, run: Callable[[argparse.Namespace, dict], None],
               unit: str, baseline: bool = False) -> int:
    """The command line, the receive buffer default, and the table of results with the
    ratios of bootherd to each peer (bench/dhcp and bench/dhcp6)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--period", type=int, default=5, help="seconds per rate step")
    ap.add_argument("--clients", type=int, default=20000, help="perfdhcp -R")
    ap.add_argument("--servers", default=servers)
    ap.add_argument("-q", "--quiet", action="store_true")
    if baseline:
        ap.add_argument("--baseline", default=None, metavar="SRC",
                        help="also run another checkout's bootherd (its src/, extensions "
                             "built there) as server 'baseline'; bootherd / baseline is the "
                             "change's ratio")  # fmt: skip
    args = ap.parse_args()
    why = usable()
    if why or shutil.which("perfdhcp") is None:
        print(f"cannot run: {why or 'perfdhcp (kea-admin) is not installed'}")
        return 2
    results: dict[str, float] = {}
    old_rmem = raise_rmem_default(RMEM_DEFAULT)
    print(f"net.core.rmem_default {RMEM_DEFAULT} for this run (was {old_rmem})")
    try:
        run(args, results)
    finally:
        if old_rmem is not None:
            Path("/proc/sys/net/core/rmem_default").write_text(str(old_rmem))
    print()
    print(f"{'server':10s} {unit + ' (<1% drops)':>20s}")
    for name, best in results.items():
        print(f"{name:10s} {best:20.0f}")
    b = results.get("bootherd")
    if b:
        for name, v in results.items():
            if name != "bootherd" and v:
                print(f"bootherd / {name}: {b / v:.2f}x")
    return 0


def raise_rmem_default(value: int) -> int | None:
    """Sets net.core.rmem_default (host-wide: it is not per namespace); returns the old one."""
    path = Path("/proc/sys/net/core/rmem_default")
    try:
        old = int(path.read_text())
        if old < value:
            path.write_text(str(value))
        return old
    except OSError:
        return None


def main() -> int:
    return bench_main(__doc__ or "", "bootherd,kea,kea-mt,dnsmasq", run_all, "DORA/s",
                      baseline=True)


def run_all(args: argparse.Namespace, results: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory(prefix="bh-dhcp-bench-") as tmp, TestNet() as net:
        net.sh(net.client, f"ip addr add {LOCAL}/16 dev br0")
        names = args.servers.split(",")
        if args.baseline:
            STARTERS["baseline"] = lambda net, d: start_bootherd(net, d, args.baseline)
            STEPS["baseline"] = STEPS["bootherd"]
            names.append("baseline")
        for name in names:
            if name in BINARIES and shutil.which(BINARIES[name]) is None:
                print(f"{name}: skipped ({BINARIES[name]} not installed)")
                continue
            d = Path(tmp) / name
            d.mkdir()
            best, _ = measure(net, name, d, args.period, args.clients, not args.quiet)
            results[name] = best


if __name__ == "__main__":
    sys.exit(main())

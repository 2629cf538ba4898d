"""`bootherd storm`: power on N virtual nodes at once and watch them boot.

    bootherd storm --nodes N [--profile optimized|legacy] [--start-spread S]
                   [--loss F] [--server ADDRESSES] [--phases LIST]
                   [--config FILE] [--set section.key=value] [--json FILE] [--plot FILE]
                   [--family 4|6] [--boot6 pxe|http|mixed]

The nodes are the inventory's (the config's database) with 127.x control IPs;
each binds its own control IP.  `--family 6` plays UEFI firmware over IPv6 (DHCPv6
through a relay, then the loader over TFTP or HTTP) for the nodes with a control
IPv6 address.  See docs/storm.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PHASE_ALIASES = {"dhcp": "dhcp", "tftp": "tftp", "bootinfo": "loader", "loader": "loader",
                 "tmcd": "os", "os": "os", "http": "files", "files": "files"}


def parse_servers(text: str) -> dict[str, tuple[str, int]]:
    """`HOST` (every service on HOST, configured ports) is handled by the caller;
    here `name=HOST:PORT,...` with names dhcp, dhcp6, proxy, tftp, bootinfo, tmcd, http
    (an IPv6 HOST in brackets: `dhcp6=[fd00::1]:547`)."""
    out: dict[str, tuple[str, int]] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, eq, addr = item.partition("=")
        if not eq:
            raise ValueError(f"--server {item!r}: expected NAME=HOST:PORT or a bare HOST")
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--server {item!r}: expected NAME=HOST:PORT")
        if name not in ("dhcp", "dhcp6", "proxy", "tftp", "bootinfo", "tmcd", "http"):
            raise ValueError(f"--server {item!r}: unknown service {name!r}")
        out[name] = (host.removeprefix("[").removesuffix("]"), int(port))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bootherd storm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", "-n", type=int, required=True, help="virtual nodes to power on")
    ap.add_argument("--profile", choices=["optimized", "legacy"], default="optimized",
                    help="optimized: one offer, windowsize, fullconfig; legacy: proxyDHCP, "
                         "frisbee loader files, 26 TMCD requests")
    ap.add_argument("--start-spread", type=float, default=1.0,
                    help="all nodes power on within this many seconds (default 1)")
    ap.add_argument("--loss", type=float, default=0.0,
                    help="fraction of datagrams dropped in each direction (TCP: lost SYNs)")
    ap.add_argument("--phases", default=None,
                    help="phases to play, in boot order (e.g. dhcp,tftp against a peer); "
                         "default dhcp,tftp,bootinfo,tmcd,http (--family 6: dhcp,tftp)")
    ap.add_argument("--family", type=int, choices=[4, 6], default=4,
                    help="6: the IPv6 profile (DHCPv6, then the loader over IPv6)")
    ap.add_argument("--boot6", choices=["pxe", "http", "mixed"], default="pxe",
                    help="--family 6: PXE over IPv6 (TFTP), UEFI HTTP boot, or every other "
                         "node each")
    ap.add_argument("--server", default="",
                    help="HOST for every service, or NAME=HOST:PORT,... (dhcp, proxy, tftp, "
                         "bootinfo, tmcd, http); default: the config's addresses.  Several "
                         "servers of one deployment: HOST,HOST,... or groups of NAME=HOST:PORT "
                         "separated by ';' (DHCP goes to all, the rest fails over)")
    ap.add_argument("--order-poll", type=float, default=None,
                    help="a loader told WAIT asks again after S s without an ORDER "
                         "(default: 10 with several servers, else never)")
    ap.add_argument("--config", "-c", help="bootherd TOML configuration (addresses, database)")
    ap.add_argument("--db", help="database URL (overrides database.url)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a configuration key; storm.relay_port=P and "
                         "storm.relay_address=A set the relay socket")
    ap.add_argument("--relay-port", type=int, help="port the relay socket binds (where servers "
                    "send relayed replies); default dhcp.relay_port, else 67")
    ap.add_argument("--relay-address", default="127.0.0.1", help="giaddr; bound by the relay socket")
    ap.add_argument("--json", dest="json_out", metavar="FILE", help="write every figure as JSON")
    ap.add_argument("--plot", metavar="FILE", help="draw nodes per phase over time and the "
                                                   "boot-time distribution (PNG)")
    ap.add_argument("--workers", type=int, default=1, help="processes playing the nodes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0, help="give up on the storm after S s")
    ap.add_argument("--wait-timeout", type=float, default=120.0,
                    help="seconds a node told WAIT waits for an ORDER")
    ap.add_argument("--max-reboots", type=int, default=3)
    ap.add_argument("--no-allocate", action="store_true",
                    help="leave nodes told WAIT waiting (default: allocate them to "
                         "experiment storm/storm, so the server wakes them)")
    ap.add_argument("--no-prepare", action="store_true",
                    help="do not create missing loader/tarball/RPM files in the server's roots")
    ap.add_argument("--prepare-only", action="store_true",
                    help="create the files the storm's nodes would fetch, then exit (lay "
                         "them out before the server starts, as a site has them)")
    ap.add_argument("--tarball-bytes", type=int, default=4 * 2**20)
    ap.add_argument("--rpm-bytes", type=int, default=1 * 2**20)
    ap.add_argument("--loader-bytes", type=int, default=70_000)
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ap.add_argument("--bmc-subnet", default="", metavar="SUBNET",
                    help="give every node a simulated Redfish BMC on its own address of SUBNET "
                         "(e.g. 127.66.0.0/16), written into the inventory; nodes then boot "
                         "only when their BMC powers them on (docs/power.md)")
    ap.add_argument("--hung", type=float, default=0.0, metavar="F",
                    help="with --bmc-subnet: this share of nodes hangs in its kernel on its "
                         "first boot, until a power cycle")
    ap.add_argument("--power-on", action="store_true",
                    help="with --bmc-subnet: run `bootherd node power on NODES` (through the "
                         "running server, its rate cap) once the BMCs are up")
    return ap


def settings_from_args(args: argparse.Namespace, cfg: Any) -> Any:
    from . import runner
    from .runner import Settings

    phases = []
    default = "dhcp,tftp" if args.family == 6 else "dhcp,tftp,bootinfo,tmcd,http"
    for p in filter(None, (x.strip() for x in (args.phases or default).split(","))):
        if p not in PHASE_ALIASES:
            raise ValueError(f"--phases: unknown phase {p!r} (dhcp, tftp, bootinfo, tmcd, http)")
        phases.append(PHASE_ALIASES[p])
    sets: list[dict[str, tuple[str, int]]] = []
    if args.server and "=" not in args.server:
        for host in filter(None, (h.strip() for h in args.server.split(","))):
            sets.append({"dhcp": (host, cfg.dhcp.port), "proxy": (host, cfg.dhcp.proxy_port),
                         "tftp": (host, cfg.tftp.port), "bootinfo": (host, cfg.bootinfo.port),
                         "tmcd": (host, cfg.tmcd.port), "http": (host, cfg.http.port),
                         "dhcp6": (host, cfg.dhcp6.port)})
    elif args.server:
        sets = [parse_servers(g) for g in args.server.split(";") if g.strip()]
    servers = sets[0] if sets else {}
    order_poll = args.order_poll if args.order_poll is not None else \
        (10.0 if len(sets) > 1 else 0.0)
    relay_port = args.relay_port
    if relay_port is None:
        relay_port = cfg.dhcp.relay_port
    if not 0 < args.nodes:
        raise ValueError("--nodes must be at least 1")
    if not 0 <= args.loss < 1:
        raise ValueError("--loss must be in [0, 1)")
    if not 0 <= args.hung <= 1 or (args.hung and not args.bmc_subnet):
        raise ValueError("--hung must be in [0, 1], with --bmc-subnet")
    if args.power_on and not args.bmc_subnet:
        raise ValueError("--power-on needs --bmc-subnet")
    if args.bmc_subnet:
        import ipaddress

        net = ipaddress.ip_network(args.bmc_subnet)  # ValueError names the bad subnet
        if not net.is_loopback or net.num_addresses - 2 < args.nodes:
            raise ValueError(f"--bmc-subnet: {args.bmc_subnet} must be a 127.x subnet with an "
                             f"address per node ({args.nodes})")
    power_on_cmd = [sys.executable, "-m", "bootherd.cli", "node", "power", "on",
                    runner.NODES_ARG, "--json",
                    *(["-c", args.config] if args.config else []),
                    *(["--db", args.db] if args.db else []),
                    *(f"--set={s}" for s in args.set)] if args.power_on else []
    return Settings(
        nodes=args.nodes, profile=args.profile, start_spread=args.start_spread, loss=args.loss,
        phases=tuple(phases), servers=servers, relay_address=args.relay_address,
        relay_port=relay_port, seed=args.seed, max_reboots=args.max_reboots,
        wait_timeout=args.wait_timeout, timeout=args.timeout, allocate_free=not args.no_allocate,
        prepare=not args.no_prepare, loader_bytes=args.loader_bytes,
        tarball_bytes=args.tarball_bytes, rpm_bytes=args.rpm_bytes, workers=args.workers,
        server_sets=sets if len(sets) > 1 else [], order_poll=order_poll, family=args.family,
        boot6=args.boot6, bmc_subnet=args.bmc_subnet, hung=args.hung, power_on_cmd=power_on_cmd)


def _load_config(args: argparse.Namespace) -> Any:
    from .. import config as configmod

    overrides = []
    for item in args.set:
        key = item.split("=", 1)[0].strip()
        if key == "dhcp.relay_port" and "relay_port" not in {
                k.name for k in configmod.SCHEMA["dhcp"][1]}:
            # Until the schema has the key, read it here (the server reads its own).
            args.relay_port = args.relay_port or int(item.split("=", 1)[1])
            continue
        overrides.append(item)
    if args.db:
        overrides.append(f"database.url={args.db}")
    return configmod.load(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from rich.console import Console

    from ..inventory.db import make_engine
    from ..inventory.snapshot import load
    from . import report, runner

    console = Console(stderr=False)
    try:
        cfg = _load_config(args)
        st = settings_from_args(args, cfg)
        snap = load(make_engine(cfg.database_url))
    except (ValueError, OSError) as e:
        print(f"bootherd storm: {e}", file=sys.stderr)
        return 2
    if args.prepare_only:
        made = runner.prepare_files(cfg, snap, runner.select_nodes(
            snap, st.nodes, st.start_spread, st.seed, st.family, st.boot6), st)
        print(f"bootherd storm: {len(made)} files created")
        return 0
    progress_cb, stop = _progress(console, st.nodes, args.quiet)
    try:
        raw = runner.run(cfg, snap, st, progress_cb)
    except (ValueError, OSError, RuntimeError) as e:
        stop()
        print(f"bootherd storm: {e}", file=sys.stderr)
        return 2
    stop()
    summary = report.summarize(raw)
    report.print_report(summary, console)
    if "power" in raw:
        from . import bmc

        summary["power"] = bmc.summarize(raw["power"], raw["nodes"], cfg.power.power_on_rate)
        bmc.print_summary(summary["power"], raw["power"].get("power_on", {}), console)
    if args.json_out:
        report.write_json(args.json_out, summary, raw)
        console.print(f"figures: {args.json_out}")
    if args.plot:
        report.plot(args.plot, summary, raw)
        console.print(f"plot: {args.plot}")
        if "power" in raw:
            ramp = str(Path(args.plot).with_suffix("")) + "-power.png"
            bmc.plot_ramp(ramp, raw["power"], cfg.power.power_on_rate)
            console.print(f"power-on ramp: {ramp}")
    return 0 if summary["failed"] == 0 else 1


def _progress(console: Any, total: int, quiet: bool) -> tuple[Any, Any]:
    if quiet or not console.is_terminal:
        return None, lambda: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("[bold]boot storm"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
    task = prog.add_task("", total=total)
    prog.start()

    def update(counts: dict[str, int]) -> None:
        desc = " ".join(f"{k}:{v}" for k, v in counts.items() if v and k != "up")
        prog.update(task, completed=counts.get("up", 0) + counts.get("failed", 0),
                    description=desc)

    return update, prog.stop

"""`bootherd ...`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from . import config as configmod
from .logs import setup_logging


def _config(args: argparse.Namespace) -> configmod.Config:
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "db", None):
        overrides.append(f"database.url={args.db}")
    return configmod.load(getattr(args, "config", None), overrides)


def _engine(args: argparse.Namespace, check: bool = True):  # noqa: ANN202
    from .inventory.db import NoDatabase, check_current, make_engine

    cfg = _config(args)
    # Only `db upgrade` (check=False) may create a SQLite file; others name the one missing.
    try:
        engine = make_engine(cfg.database_url, create=not check)
    except NoDatabase as e:
        raise NoDatabase(f"{e} (database.url from {configmod.describe_source(cfg)})") from None
    if check:
        check_current(engine)
    return engine


def _print_table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
    Console().print(table)


def _emit(args: argparse.Namespace, rows: Any, columns: list[str] | None = None,
          title: str | None = None) -> None:
    rows = configmod.mask_record(rows)  # no listing prints a secret
    if getattr(args, "json", False) or columns is None:
        print(json.dumps(rows, indent=2, default=str))
    else:
        _print_table(rows, columns, title)


# --- commands -------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from .service import StartupError, run

    cfg = _config(args)
    setup_logging(cfg.log.level, cfg.log.format)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    try:
        uvloop.run(run(cfg, only))
    except StartupError as e:
        print(f"bootherd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_config_example(args: argparse.Namespace) -> int:
    print(configmod.example())
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    print(f"bootherd: configuration from {configmod.describe_source(cfg)}", file=sys.stderr)
    print(json.dumps(configmod.masked(cfg), indent=2))  # secrets never printed
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from .inventory.db import upgrade

    rev = upgrade(_engine(args, check=False))
    print(f"database schema at revision {rev}")
    return 0


def cmd_db_backup(args: argparse.Namespace) -> int:
    from .inventory.db import NoDatabase, backup

    cfg = _config(args)
    try:
        print(backup(cfg.database_url, Path(args.file)))
    except NoDatabase as e:
        raise NoDatabase(f"{e} (database.url from {configmod.describe_source(cfg)})") from None
    return 0


def cmd_testbed_generate(args: argparse.Namespace) -> int:
    from .inventory.testbed import generate

    text = generate(args.nodes, args.subnet, args.seed, server=args.server, bmc=args.bmc,
                    bmc_subnet=args.bmc_subnet)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _check_testbed_network(cfg: configmod.Config, text: str) -> None:
    """Refuse a testbed whose nodes use this server's address; warn, naming each
    entry, about nodes off the DHCP server's subnets or with another mask."""
    from .inventory import netcheck
    from .inventory.testbed import TestbedError, parse

    problems = netcheck.check(parse(text), cfg)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise TestbedError("; ".join(map(str, fatal)))
    warnings = [p for p in problems if not p.fatal]
    for p in warnings[:20]:
        print(f"bootherd: warning: {p}", file=sys.stderr)
    if len(warnings) > 20:
        print(f"bootherd: warning: ... and {len(warnings) - 20} more like these",
              file=sys.stderr)


def cmd_testbed_import(args: argparse.Namespace) -> int:
    from .inventory.testbed import import_testbed

    path = Path(args.file)
    text = path.read_text()
    _check_testbed_network(_config(args), text)
    counts = import_testbed(_engine(args), text, base_dir=path.resolve().parent)
    print("imported " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    return 0


def cmd_testbed_export(args: argparse.Namespace) -> int:
    from .inventory.testbed import export_secrets, export_testbed, write_secrets

    engine = _engine(args)
    ref = ""
    if args.secrets:
        # The reference is taken from the testbed file's folder when it is imported.
        secrets = Path(args.secrets)
        base = Path(args.output).resolve().parent if args.output else Path.cwd()
        ref = os.path.relpath(secrets.resolve(), base)
        write_secrets(secrets, export_secrets(engine))
        print(f"BMC passwords written to {secrets} (mode 0600)", file=sys.stderr)
    text = export_testbed(engine, ref)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _since(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def cmd_node_list(args: argparse.Namespace) -> int:
    from .inventory.ops import list_nodes

    rows = list_nodes(_engine(args))
    if args.state:
        rows = [r for r in rows if r["state"] == args.state]
    for r in rows:
        r["in_state"] = _duration(r["state_seconds"])
    _emit(args, rows, ["node_id", "type", "ip", "mac", "experiment", "vname", "state",
                       "in_state"], f"{len(rows)} nodes")
    return 0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def cmd_node_show(args: argparse.Namespace) -> int:
    from .inventory.ops import show_node

    node = configmod.mask_record(show_node(_engine(args), args.node))
    print(json.dumps(node, indent=2, default=str))
    return 0


def cmd_node_set(args: argparse.Namespace) -> int:
    from .inventory.ops import set_node

    fields = {}
    for item in args.assignments:
        if "=" not in item:
            raise ValueError(f"{item!r}: expected field=value")
        k, v = item.split("=", 1)
        fields[k.strip()] = v
    set_node(_engine(args), args.node, **fields)
    shown = configmod.mask_record(fields)
    print(f"{args.node}: set " + ", ".join(f"{k}={v!r}" for k, v in shown.items()))
    return 0


def cmd_node_events(args: argparse.Namespace) -> int:
    from .inventory.ops import node_events

    rows = node_events(_engine(args), args.node, args.limit)
    for r in rows:
        r["time"] = _since(r["ts"])
    _emit(args, rows, ["time", "state", "source", "detail"], f"{args.node} events")
    return 0


def _api_url(cfg: configmod.Config, path: str) -> str:
    host = cfg.http.address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.http.port}{path}"


def wake_through_server(cfg: configmod.Config, node: str, order: str) -> str | None:
    """Ask the running server to order the node (its admin API); None when no server
    answers there.  The order then goes through the server's lifecycle coordinator,
    whose watcher re-sends it if the node does not answer."""
    import urllib.error
    import urllib.request
    from urllib.parse import quote

    from .web.service import read_admin_token

    try:
        token = read_admin_token(cfg)
    except FileNotFoundError:
        return None  # no server has run here with a generated token
    req = urllib.request.Request(
        _api_url(cfg, f"/api/nodes/{quote(node, safe='')}/wake"), method="POST",
        data=json.dumps({"order": order}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", str(e))
        except ValueError:
            msg = str(e)
        if e.code == 404:
            raise KeyError(msg) from None
        raise ValueError(f"the server refused: {msg}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return f"{node}: {body.get('result', 'order sent')} (through the running server)"


def cmd_node_wake(args: argparse.Namespace) -> int:
    from .bootinfo.cli import wake

    cfg = _config(args)
    msg = wake_through_server(cfg, args.node, args.order)
    if msg is None:  # no server runs: send the order ourselves
        msg = wake(cfg, args.node, args.order)
    print(msg)
    return 0


def cmd_node_logs(args: argparse.Namespace) -> int:
    from .web.logs import list_logs, read_log

    cfg = _config(args)
    if args.list:
        rows = [log.as_dict() for log in list_logs(cfg, args.node, console=True)]
        for r in rows:
            r["time"] = _since(r["mtime"])
        _emit(args, rows, ["name", "size", "time"], f"{args.node} logs")
    else:
        sys.stdout.write(read_log(cfg, args.node, args.which))  # an index or a name
    return 0


def cmd_node_power(args: argparse.Namespace) -> int:
    """One power operation on many nodes, through the running server when there is one."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .inventory.model import natural_key
    from .power import client
    from .power.core import PowerOp

    cfg = _config(args)
    op = PowerOp(args.op)
    if not args.nodes and not args.all:
        raise ValueError("name nodes (pc7, pc[1-40], pid/eid) or use --all")
    err = Console(stderr=True)
    results = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                        console=err, transient=True, disable=args.json or not err.is_terminal)
    task = progress.add_task(f"power {op}", total=None, failed=0)

    def started(info: dict) -> None:
        rate = info.get("power_on_rate") or 0
        ramp = f", {rate:g} power-ons/s" if rate and op in ("on", "cycle") else ""
        progress.update(task, total=info["nodes"],
                        description=f"power {op} ({info.get('max_concurrent')} at once{ramp})")
        for name in info.get("unknown", []):
            err.print(f"[yellow]{name}: no such node[/yellow]")
        if info["nodes"] == 0:
            progress.update(task, total=0)

    def done_one(res) -> None:  # noqa: ANN001
        results.append(res)
        progress.update(task, advance=1, failed=sum(not r.ok for r in results))

    async def go() -> dict:
        server = client.running_server(cfg, args.direct)
        if server:
            return await client.run_via_server(*server, op, args.nodes, args.all, args.pxe,
                                               started, done_one)
        return await client.run_direct(cfg, op, args.nodes, args.all, args.pxe, started, done_one)

    with progress:
        summary = asyncio.run(go())
    results.sort(key=lambda r: natural_key(r.node_id))
    rows = [r.as_dict() for r in results]
    if args.json:
        print(json.dumps({"results": rows, **summary}, indent=2))
    else:
        for r in rows:
            r["result"] = "ok" if r["ok"] else f"FAILED ({r['error']})"
            r["seconds"] = f"{r['elapsed']:.2f}"
        _print_table(rows, ["node_id", "result", "power", "driver", "seconds", "message"],
                     f"power {op}: {summary['ok']} ok, {summary['failed']} failed"
                     + (f", {summary['unknown']} unknown" if summary.get("unknown") else ""))
    return 0 if summary["failed"] == 0 and not summary.get("unknown") else 1


def cmd_node_console(args: argparse.Namespace) -> int:
    """Attach to a node's serial console (the server's capture, or directly)."""
    from .power import client

    cfg = _config(args)
    stdin_fd, out, err = client.stdio()
    server = client.running_server(cfg, args.direct)
    if server:
        return asyncio.run(client.attach_via_server(*server, args.node, not args.read_only,
                                                    stdin_fd, out, err))
    from .power.targets import load_targets

    target = load_targets(_engine(args), [args.node]).get(args.node)
    if target is None or not target.console:
        raise LookupError(f"{args.node} has no console in the inventory")
    return asyncio.run(client.attach_direct(target, stdin_fd, out, err))


def cmd_experiment_create(args: argparse.Namespace) -> int:
    from .inventory.ops import create_experiment

    create_experiment(_engine(args), args.pid, args.eid, args.creator, args.swapper)
    print(f"experiment {args.pid}/{args.eid} created")
    return 0


def cmd_experiment_allocate(args: argparse.Namespace) -> int:
    from .inventory.ops import allocate

    engine = _engine(args)
    for item in args.nodes:
        node, _, vname = item.partition(":")
        allocate(engine, args.pid, args.eid, node, vname or node)
        print(f"{node} allocated to {args.pid}/{args.eid} as {vname or node}")
    return 0


def cmd_experiment_free(args: argparse.Namespace) -> int:
    from .inventory.ops import free

    engine = _engine(args)
    for node in args.nodes:
        free(engine, node)
        print(f"{node} freed")
    return 0


def cmd_experiment_list(args: argparse.Namespace) -> int:
    from .inventory.ops import list_experiments

    _emit(args, list_experiments(_engine(args)), ["pid", "eid", "creator", "swapper", "nodes"],
          "experiments")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .inventory.ops import servers

    rows = servers(_engine(args))
    for r in rows:
        r["alive"] = "yes" if r["age"] < 15 else "no"
        r["started"] = _since(r["started"])
    _emit(args, rows, ["name", "roles", "address", "started", "age", "alive"], "servers")
    return 0


def cmd_tmcc(args: argparse.Namespace) -> int:
    from .tmcd.client import main as tmcc_main

    return tmcc_main(args.rest) or 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.rest)


def cmd_storm(args: argparse.Namespace) -> int:
    from .storm.cli import main as storm_main

    return storm_main(args.rest) or 0


# --- parser ---------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, json_flag: bool = False) -> None:
    p.add_argument("--config", "-c", help="TOML configuration file")
    p.add_argument("--db", help="database URL (overrides database.url)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one configuration key (repeatable)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bootherd", description=__doc__)
    ap.add_argument("--version", action="version", version=f"bootherd {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the boot services")
    _common(p)
    p.add_argument("--only", help="comma-separated services: dhcp,tftp,bootinfo,tmcd,http,console,imaging")
    p.set_defaults(fn=cmd_serve)

    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="sub", required=True)
    p = cfg.add_parser("example", help="print the complete commented default configuration")
    p.set_defaults(fn=cmd_config_example)
    p = cfg.add_parser("check", help="validate a configuration and print the result")
    _common(p)
    p.set_defaults(fn=cmd_config_check)

    db = sub.add_parser("db", help="database").add_subparsers(dest="sub", required=True)
    p = db.add_parser("upgrade", help="create or migrate the inventory schema")
    _common(p)
    p.set_defaults(fn=cmd_db_upgrade)
    p = db.add_parser("backup", help="a consistent copy of the inventory, while servers run "
                                     "(SQLite online backup; pg_dump for PostgreSQL)")
    _common(p)
    p.add_argument("file")
    p.set_defaults(fn=cmd_db_backup)

    tb = sub.add_parser("testbed", help="testbed description files").add_subparsers(
        dest="sub", required=True)
    p = tb.add_parser("generate", help="write a realistic testbed description")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--subnet", default="10.10.0.0/16")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--server", default="",
                   help="boot server address written into MFS paths (default: bare paths, "
                        "meaning the server that answers)")
    p.add_argument("--bmc", default="", choices=["", "ipmi", "ipmitool", "redfish", "wol", "manual"],
                   help="give every node a BMC with this power driver "
                        "(password from $BOOTHERD_BMC_PASSWORD at import)")
    p.add_argument("--bmc-subnet", default="10.11.0.0/16", help="where the BMC addresses come from")
    p.add_argument("--output", "-o")
    p.set_defaults(fn=cmd_testbed_generate)
    p = tb.add_parser("import", help="replace the inventory with a testbed file (atomic)")
    _common(p)
    p.add_argument("file")
    p.set_defaults(fn=cmd_testbed_import)
    p = tb.add_parser("export", help="write the inventory as a testbed file")
    _common(p)
    p.add_argument("--output", "-o")
    p.add_argument("--secrets", metavar="FILE",
                   help="write BMC passwords to FILE (mode 0600) and refer to it; without it "
                        "the file says they stay in the inventory")
    p.set_defaults(fn=cmd_testbed_export)

    node = sub.add_parser("node", help="nodes").add_subparsers(dest="sub", required=True)
    p = node.add_parser("list", help="nodes with their state and time in it")
    _common(p, json_flag=True)
    p.add_argument("--state", help="only nodes in this state")
    p.set_defaults(fn=cmd_node_list)
    p = node.add_parser("show", help="everything about one node")
    _common(p)
    p.add_argument("node")
    p.set_defaults(fn=cmd_node_show)
    p = node.add_parser("set", help="set node fields, e.g. next_os=FRISBEE-MFS")
    _common(p)
    p.add_argument("node")
    p.add_argument("assignments", nargs="+", metavar="FIELD=VALUE")
    p.set_defaults(fn=cmd_node_set)
    p = node.add_parser("events", help="a node's state history")
    _common(p, json_flag=True)
    p.add_argument("node")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(fn=cmd_node_events)
    p = node.add_parser("wake", help="send a waiting node an ORDER to ask again")
    _common(p)
    p.add_argument("node")
    p.add_argument("--order", default="AUTO", choices=["AUTO", "REBOOT", "RESTART"])
    p.set_defaults(fn=cmd_node_wake)
    p = node.add_parser("logs", help="a node's uploaded boot logs")
    _common(p, json_flag=True)
    p.add_argument("node")
    p.add_argument("--list", action="store_true", help="list the stored logs")
    p.add_argument("which", nargs="?", default="-1",
                   help="log index or name (default -1: the latest)")
    p.set_defaults(fn=cmd_node_logs)

    p = node.add_parser("power", help="power on|off|cycle|reset|soft|status NODES (BMCs)")
    _common(p, json_flag=True)
    p.add_argument("op", choices=["on", "off", "cycle", "reset", "soft", "status"])
    p.add_argument("nodes", nargs="*", metavar="NODES",
                   help="node ids, ranges like pc[1-40], pid/eid for an experiment's nodes")
    p.add_argument("--all", action="store_true", help="every node of the inventory")
    p.add_argument("--pxe", action="store_true",
                   help="boot from the network once (set before the on, cycle or reset)")
    p.add_argument("--direct", action="store_true",
                   help="act from this process even if a server runs (its caps do not apply)")
    p.set_defaults(fn=cmd_node_power)
    p = node.add_parser("console", help="attach to a node's serial console (Ctrl-] leaves)")
    _common(p)
    p.add_argument("node")
    p.add_argument("--read-only", action="store_true", help="watch without taking the keyboard")
    p.add_argument("--direct", action="store_true",
                   help="open the console from this process, not the server's capture")
    p.set_defaults(fn=cmd_node_console)

    ex = sub.add_parser("experiment", help="experiments and allocations").add_subparsers(
        dest="sub", required=True)
    p = ex.add_parser("create")
    _common(p)
    p.add_argument("pid")
    p.add_argument("eid")
    p.add_argument("--creator", required=True)
    p.add_argument("--swapper")
    p.set_defaults(fn=cmd_experiment_create)
    p = ex.add_parser("allocate", help="allocate nodes: NODE[:VNAME] ...")
    _common(p)
    p.add_argument("pid")
    p.add_argument("eid")
    p.add_argument("nodes", nargs="+")
    p.set_defaults(fn=cmd_experiment_allocate)
    p = ex.add_parser("free", help="free nodes")
    _common(p)
    p.add_argument("nodes", nargs="+")
    p.set_defaults(fn=cmd_experiment_free)
    p = ex.add_parser("list")
    _common(p, json_flag=True)
    p.set_defaults(fn=cmd_experiment_list)

    from .imaging.cli import add_parser as add_image_parser

    add_image_parser(sub, _common, _config, _engine)

    p = sub.add_parser("status", help="servers of this deployment and their liveness")
    _common(p, json_flag=True)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("tmcc", help="TMCD client (see `bootherd tmcc -h`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_tmcc)
    p = sub.add_parser("demo", help="run bootherd on embedded defaults and show it working",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("storm", help="boot-storm simulator (see `bootherd storm -h`)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_storm)
    return ap


def _database_error(args: argparse.Namespace, e: Exception) -> str:
    """A database failure named with its database: unreachable, missing tables (the
    schema was never created) or anything else, never a schema hint for all three."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from .inventory.db import describe

    orig = getattr(e, "orig", None)
    reason = (str(orig) if orig else str(e)).strip().splitlines()[0]
    try:
        where = describe(_config(args).database_url)
    except configmod.ConfigError:
        where = "the inventory"
    missing = "no such table" in reason or ("relation" in reason and "does not exist" in reason)
    if missing and isinstance(e, (OperationalError, ProgrammingError)):
        return f"database {where}: {reason}: the schema is missing; run `bootherd db upgrade`"
    if isinstance(e, OperationalError):
        return f"database {where} is unreachable or failing: {reason}"
    return f"database {where}: {reason}"


# Commands with their own argument parsers get the rest of the line untouched.
PASSTHROUGH = {"tmcc": cmd_tmcc, "storm": cmd_storm, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        args = argparse.Namespace(rest=argv[1:], fn=PASSTHROUGH[argv[0]])
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from sqlalchemy.exc import DBAPIError

    from .inventory.db import InventoryUnavailable
    from .inventory.ops import Conflict, NotFound
    from .inventory.testbed import TestbedError

    try:
        return args.fn(args)
    except (configmod.ConfigError, TestbedError, NotFound, Conflict, InventoryUnavailable,
            ValueError, FileNotFoundError) as e:
        print(f"bootherd: {e}", file=sys.stderr)
        return 2
    except LookupError as e:  # KeyError included: an unknown node, log or order
        print(f"bootherd: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except DBAPIError as e:
        print(f"bootherd: {_database_error(args, e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

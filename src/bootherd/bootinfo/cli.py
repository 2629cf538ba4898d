"""`bootherd node wake NODE` and `bootherd node events NODE`: plain functions
the lead's CLI wires into argparse (see `register` for a ready-made wiring).

wake works whether or not `bootherd serve` runs, and in another process: a
loader accepts orders only from port bootinfo.order_port (6970), which the
running server holds; it binds that port with SO_REUSEPORT, so the CLI binds
the same port the same way (same user), sends one ORDER and closes.  If the
port cannot be shared (another user's process, no SO_REUSEPORT) the order goes
from an ephemeral port and the result says so: Emulab loaders ignore those.
The PXEWAKEUP event is written to the database directly.
"""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, and_, select

from ..inventory import schema as s
from ..inventory.live import StateEvent, Writer
from ..policy import BootType
from ..states import State
from .server import bind_order_socket, order_packet


def _control_ip(engine: Engine, node_id: str) -> str:
    with engine.connect() as conn:
        if conn.execute(select(s.nodes.c.node_id).where(s.nodes.c.node_id == node_id)).first() \
                is None:
            raise KeyError(f"unknown node {node_id!r}")
        ip = conn.execute(select(s.interfaces.c.ip).where(and_(
            s.interfaces.c.node_id == node_id, s.interfaces.c.role == "ctrl"))).scalar()
    if not ip:
        raise ValueError(f"node {node_id} has no control IP")
    return ip


def wake(config: Any, node_id: str, kind: str = "AUTO", engine: Engine | None = None) -> str:
    """Send an ORDER (AUTO, REBOOT or RESTART) to NODE's loader; returns a one-line report.

    Raises KeyError (unknown node), ValueError (bad kind, no control IP)."""
    from ..inventory.db import make_engine

    try:
        order = BootType[kind.upper()]
    except KeyError:
        raise ValueError(f"order must be AUTO, REBOOT or RESTART, not {kind!r}") from None
    pkt = order_packet(order)
    engine = engine or make_engine(config.database_url)
    ip = _control_ip(engine, node_id)
    bi = config.bootinfo
    note = ""
    try:
        sock = bind_order_socket(bi.address, bi.order_port)
    except OSError as e:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((bi.address, 0))
        note = (f" (warning: port {bi.order_port} unavailable: {e.strerror}; sent from port "
                f"{sock.getsockname()[1]}, which Emulab loaders ignore)")
    with sock:
        sock.setblocking(True)
        sock.sendto(pkt, (ip, bi.client_port))
        src = sock.getsockname()
    with engine.begin() as conn:
        Writer._write_events(conn, [StateEvent(node_id, State.PXEWAKEUP, "cli", time.time(),
                                               f"{order.name} from cli")])
    return (f"{node_id}: sent {order.name} order to {ip}:{bi.client_port} "
            f"from {src[0]}:{src[1]}{note}")


def events(engine: Engine, node_id: str, limit: int = 20) -> list[dict]:
    """The node's last `limit` state events, oldest first."""
    e = s.node_events
    with engine.connect() as conn:
        rows = conn.execute(select(e).where(e.c.node_id == node_id)
                            .order_by(e.c.ts.desc(), e.c.id.desc()).limit(limit)).mappings().all()
    out = [{"ts": r["ts"],
            "time": datetime.fromtimestamp(r["ts"], UTC).isoformat(timespec="milliseconds"),
            "state": r["state"], "source": r["source"], "detail": r["detail"]}
           for r in reversed(rows)]
    return out


def format_events(rows: list[dict], as_json: bool = False) -> str:
    if as_json:
        return json.dumps(rows, indent=2)
    return "\n".join(f"{r['time']}  {r['state']:<11} {r['source']:<9} {r['detail']}"
                     for r in rows)


def register(node_subparsers: Any) -> None:
    """Add `wake` and `events` to the `bootherd node` subparsers.

    Each sets `node_func(args, config) -> int`; the lead's main calls it with
    the loaded Config."""
    w = node_subparsers.add_parser("wake", help="send an ORDER to a node waiting in its loader")
    w.add_argument("node")
    w.add_argument("--order", default="AUTO", choices=["AUTO", "REBOOT", "RESTART"])
    w.set_defaults(node_func=_cmd_wake)
    ev = node_subparsers.add_parser("events", help="a node's recent state events")
    ev.add_argument("node")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--limit", type=int, default=20)
    ev.set_defaults(node_func=_cmd_events)


def _cmd_wake(args: Any, config: Any) -> int:
    try:
        print(wake(config, args.node, args.order))
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}")
        return 1
    return 0


def _cmd_events(args: Any, config: Any) -> int:
    from ..inventory.db import make_engine

    print(format_events(events(make_engine(config.database_url), args.node, args.limit),
                        args.json))
    return 0

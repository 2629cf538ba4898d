"""`bootherd node wake NODE`: send a waiting node's loader an ORDER.

`bootherd node wake` asks the running server (its admin API), so the order
goes through the server's lifecycle coordinator and its watcher knows of it.
`wake` here is the fallback for when no server runs: a loader accepts orders
only from port bootinfo.order_port (6970); the CLI binds that port with
SO_REUSEPORT (as the server does), sends one ORDER and closes.  If the port
cannot be shared (another user's process, no SO_REUSEPORT) the order goes from
an ephemeral port and the result says so: Emulab loaders ignore those.  With
no server running, the PXEWAKEUP event is written to the database directly.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any

from sqlalchemy import Engine, and_, select

from ..boottype import order_kind
from ..inventory import schema as s
from ..inventory.live import StateEvent, Writer
from ..states import State
from .core import order_packet
from .server import bind_order_socket


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

    order = order_kind(kind)
    pkt = order_packet(order)
    engine = engine or make_engine(config.database_url, create=False)
    ip = _control_ip(engine, node_id)
    bi = config.bootinfo
    note = ""
    try:
        sock = bind_order_socket(bi.address, bi.order_port)
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise ValueError(
                f"bootinfo.address {bi.address} is not an address of this host, and orders "
                "go out from it: run `bootherd node wake` on the boot server (or with its "
                "configuration), or set bootinfo.address") from None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((bi.address, 0))
        note = (f" (warning: port {bi.order_port} unavailable: {e.strerror}; sent from port "
                f"{sock.getsockname()[1]}, which Emulab loaders ignore)")
    with sock:
        sock.setblocking(True)
        try:
            sock.sendto(pkt, (ip, bi.client_port))
        except OSError as e:
            raise ValueError(f"{node_id}: cannot send the order to {ip}:{bi.client_port} from "
                             f"{bi.address}: {e.strerror}") from None
        src = sock.getsockname()
    with engine.begin() as conn:
        Writer._write_events(conn, [StateEvent(node_id, State.PXEWAKEUP, "cli", time.time(),
                                               f"{order.name} from cli")])
    return (f"{node_id}: sent {order.name} order to {ip}:{bi.client_port} "
            f"from {src[0]}:{src[1]}{note}")

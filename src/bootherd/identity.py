"""This server's name in the inventory's `servers` table, and pruning the dead.

With server.name empty the name is kept in server.name_file: the host name the
first time (with a suffix if a live server already has it), the same name at
every restart after, so a restart replaces its own row in `bootherd status`
instead of adding one.  If another live server uses the kept name (two servers
started from one folder) this one runs as NAME-PID and says so.  Rows whose
heartbeat is older than server.forget_after are deleted.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from typing import Any

from sqlalchemy import Engine, delete, select

from .inventory import schema as s

log = logging.getLogger("bootherd.identity")

ALIVE_SECONDS = 15.0  # a heartbeat (every 5 s) younger than this: the server lives


def _live_names(engine: Engine, now: float) -> set[str]:
    with engine.connect() as conn:
        return {r.name for r in conn.execute(select(s.servers.c.name, s.servers.c.heartbeat))
                if r.heartbeat is not None and now - r.heartbeat < ALIVE_SECONDS}


def server_name(cfg: Any, engine: Engine, now: float | None = None) -> str:
    """server.name, or the kept default name (see the module doc)."""
    if cfg.server.name:
        return cfg.server.name
    now = time.time() if now is None else now
    path = cfg.path(cfg.server.name_file)
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        name = ""
    live = _live_names(engine, now)
    if not name:
        name = socket.gethostname() or "bootherd"
        if name in live:
            name = f"{name}-{secrets.token_hex(2)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(name + "\n")
        os.replace(tmp, path)
        log.info("server name %s kept in %s", name, path)
    if name in live:
        mine = f"{name}-{os.getpid()}"
        log.warning("server name %s (from %s) is in use by a live server: running as %s",
                    name, path, mine)
        return mine
    return name


def prune(engine: Engine, forget_after: float, now: float | None = None) -> list[str]:
    """Delete the rows of servers silent for more than `forget_after` seconds."""
    if forget_after <= 0:
        return []
    cutoff = (time.time() if now is None else now) - forget_after
    with engine.begin() as conn:
        gone = [r.name for r in conn.execute(select(s.servers.c.name)
                                             .where(s.servers.c.heartbeat < cutoff))]
        if gone:
            conn.execute(delete(s.servers).where(s.servers.c.name.in_(gone)))
    if gone:
        log.info("pruned servers silent for over %ds: %s", int(forget_after), ", ".join(gone))
    return gone

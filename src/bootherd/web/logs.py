"""Node boot logs: uploaded by nodes over HTTP, read by operators.

A node is identified by its own source address (the inventory's control IP),
never by anything it claims.  Each upload becomes
``<log_dir>/<node_id>/<UTC timestamp>.log``; the oldest are removed beyond
``http.logs_per_node``.  An upload is written to a temporary file first and
renamed when complete, so a refused or broken upload never replaces or
damages an earlier log.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class LogTooLarge(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"log upload larger than {limit} bytes (http.max_log_bytes); "
                         "nothing was stored")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class LogInfo:
    node_id: str
    name: str
    path: Path
    size: int
    mtime: float

    def as_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "name": self.name, "size": self.size,
                "mtime": self.mtime}


def node_dir(log_dir: Path, node_id: str) -> Path:
    if not _SAFE_ID.match(node_id):
        raise ValueError(f"not a valid node id: {node_id!r}")
    return log_dir / node_id


def _log_dir(config: Any) -> Path:
    return config.path(config.http.log_dir)


CONSOLE = "console"  # the name under which a node's captured serial console is read


def console_dir(log_dir: Path, node_id: str) -> Path:
    """Where a node's console capture lives: current.log plus rotated current.log.N."""
    return node_dir(log_dir, node_id) / CONSOLE


def list_console_logs(config: Any, node_id: str) -> list[LogInfo]:
    """The node's console logs, newest first: `console`, then `console.1` ... (older)."""
    d = console_dir(_log_dir(config), node_id)
    out = []
    for k in range(0, 1000):
        path = d / ("current.log" if k == 0 else f"current.log.{k}")
        try:
            st = path.stat()
        except FileNotFoundError:
            if k == 0:
                continue  # nothing captured yet; older ones may still be there
            break
        out.append(LogInfo(node_id, CONSOLE if k == 0 else f"{CONSOLE}.{k}", path,
                           st.st_size, st.st_mtime))
    return out


def list_logs(config: Any, node_id: str, console: bool = False) -> list[LogInfo]:
    """A node's stored boot logs, oldest first (then its console logs, with `console`)."""
    if console:
        return list_logs(config, node_id) + list_console_logs(config, node_id)
    d = node_dir(_log_dir(config), node_id)
    out = []
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".log"))
    except FileNotFoundError:
        return []
    for n in names:
        try:
            st = (d / n).stat()
        except FileNotFoundError:  # rotated away meanwhile
            continue
        out.append(LogInfo(node_id, n, d / n, st.st_size, st.st_mtime))
    return out


def read_log(config: Any, node_id: str, which: int | str = -1) -> str:
    """One log's text: `which` is an index into list_logs (-1 = newest) or a name;
    `console` is the node's captured serial console, `console.N` an older one.

    Raises LookupError when there is no such log.
    """
    if isinstance(which, str) and (which == CONSOLE or which.startswith(CONSOLE + ".")):
        match = [li for li in list_console_logs(config, node_id) if li.name == which]
        if not match:
            raise LookupError(f"{node_id}: no console log {which!r} (is console capture on "
                              "and the node's console in the inventory?)")
        return match[0].path.read_bytes().decode("utf-8", errors="replace")
    logs = list_logs(config, node_id)
    if isinstance(which, str) and not which.lstrip("-").isdigit():
        match = [li for li in logs if li.name == which]
        if not match:
            raise LookupError(f"{node_id}: no log named {which!r}")
        info = match[0]
    else:
        try:
            info = logs[int(which)]
        except IndexError:
            raise LookupError(f"{node_id}: no log {which} ({len(logs)} stored)") from None
    return info.path.read_bytes().decode("utf-8", errors="replace")


class LogStore:
    """Writes uploads for the HTTP handler (blocking calls: run in a thread)."""

    def __init__(self, log_dir: Path, max_bytes: int, keep: int):
        self.log_dir = log_dir
        self.max_bytes = max_bytes
        self.keep = max(1, keep)

    def begin(self, node_id: str) -> tuple[Path, Any]:
        d = node_dir(self.log_dir, node_id)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".upload-{os.getpid()}-{time.monotonic_ns()}.tmp"
        return tmp, open(tmp, "wb")

    def commit(self, node_id: str, tmp: Path, now: float | None = None) -> Path:
        d = node_dir(self.log_dir, node_id)
        now = time.time() if now is None else now
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        final = d / f"{stamp}.log"
        n = 1
        while final.exists():  # two uploads in the same microsecond
            final = d / f"{stamp}-{n}.log"
            n += 1
        os.replace(tmp, final)
        self.rotate(node_id)
        return final

    @staticmethod
    def abort(tmp: Path) -> None:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass

    def rotate(self, node_id: str) -> list[str]:
        d = node_dir(self.log_dir, node_id)
        names = sorted(n for n in os.listdir(d) if n.endswith(".log"))
        gone = names[:-self.keep] if len(names) > self.keep else []
        for n in gone:
            try:
                (d / n).unlink()
            except FileNotFoundError:
                pass
        return gone

"""server.user: give up root once the privileged ports are bound.

The files bootherd made or opened as root before (the SQLite inventory and its
WAL, the admin token, the server name, the log file, the folders it writes)
are handed to the user first, so the server keeps working after the switch.
"""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path
from typing import Any

from .config import ConfigError

log = logging.getLogger("bootherd.privileges")


def lookup(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"server.user: no user {name!r} on this host") from None


def owned_paths(cfg: Any) -> list[Path]:
    """What the server writes after start, as far as it exists now."""
    from .inventory.db import sqlite_path

    out: list[Path] = []
    db = sqlite_path(cfg.database_url)
    if db is not None:
        # Not its folder: that may be anyone's (the WAL files exist while the server runs).
        out += [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    for value in (cfg.http.admin_token_file, cfg.server.name_file, cfg.log.file,
                  cfg.http.log_dir, cfg.tftp.upload_dir):
        if value:
            out.append(cfg.path(value))
    return [p for p in out if p.exists()]


def drop(cfg: Any) -> str | None:
    """Switch to server.user (with its groups); returns what was done, None if unset."""
    name = cfg.server.user
    if not name:
        return None
    pw = lookup(name)
    if os.geteuid() == pw.pw_uid:
        return f"already running as {name}"
    if os.geteuid() != 0:
        raise ConfigError(f"server.user: cannot switch to {name!r}: not running as root")
    for p in owned_paths(cfg):
        os.chown(p, pw.pw_uid, pw.pw_gid)
        if p.is_dir():  # the folder's files too (node logs, uploads)
            for child in p.rglob("*"):
                os.chown(child, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    os.initgroups(name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ["HOME"] = pw.pw_dir
    return f"dropped privileges to {name} (uid {pw.pw_uid}, gid {pw.pw_gid})"

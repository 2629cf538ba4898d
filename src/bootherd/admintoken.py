"""The admin API's token: configured (http.admin_token), or generated once and kept.

With http.admin_token empty the token lives in http.admin_token_file (0600,
created at the first start, kept across restarts); `bootherd token show`
prints it, `bootherd token rotate` replaces it and a running server takes the
new one at its next request (the file is re-read when it changes).  The 401
answer says where the token is.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from . import secretfile
from .config import ConfigError


def token_file(cfg: Any) -> Path:
    return cfg.path(cfg.http.admin_token_file).absolute()


def where(cfg: Any) -> str:
    """Where an operator finds the token, for logs and the 401 message."""
    if cfg.http.admin_token:
        return "http.admin_token in the server's configuration"
    return f"{token_file(cfg)} on the server (`bootherd token show`)"


def read_or_create(cfg: Any) -> str:
    """The token: configured, kept in the token file, or generated into it now."""
    if cfg.http.admin_token:
        return cfg.http.admin_token
    return secretfile.read_or_create(token_file(cfg))


def read(cfg: Any) -> str:
    """The token as a CLI on the server's host reads it (FileNotFoundError: none yet)."""
    return cfg.http.admin_token or token_file(cfg).read_text().strip()


def rotate(cfg: Any) -> str:
    """A new token in the token file; returns it."""
    if cfg.http.admin_token:
        raise ConfigError("http.admin_token is set in the configuration: change it there "
                          "(rotate replaces only a generated token)")
    tok = secrets.token_hex(32)  # as secretfile.read_or_create draws it
    secretfile.write_private(token_file(cfg), tok + "\n")
    return tok


class TokenCheck:
    """Compares a presented token with the current one; a token file that changed
    (rotate) is read again, at most once per change."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.token = read_or_create(cfg)
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.cfg.http.admin_token:
            return None
        try:
            st = os.stat(token_file(self.cfg))
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def current(self) -> str:
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.token = read(self.cfg) or self.token
            except OSError:
                pass
        return self.token

    def matches(self, presented: str) -> bool:
        tok = self.current()
        return bool(tok) and hmac.compare_digest(
            presented.encode("utf-8", "surrogateescape"), tok.encode())

    def hint(self) -> str:
        return where(self.cfg)


def app_accepts(app: Any, presented: str) -> bool:
    """Whether an aiohttp application's admin token is `presented`: its TokenCheck
    (app["admin_token_check"], which follows a rotation), else the plain token string
    app["admin_token"] (an application built without a configuration)."""
    checker = app.get("admin_token_check")
    if checker is not None:
        return checker.matches(presented)
    token = str(app.get("admin_token") or "")
    return bool(token) and hmac.compare_digest(
        presented.encode("utf-8", "surrogateescape"), token.encode())


def app_hint(app: Any) -> str:
    checker = app.get("admin_token_check")
    return f"; the token is {checker.hint()}" if checker is not None else ""

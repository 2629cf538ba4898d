"""Checks `bootherd serve` makes before it binds anything: folders and addresses.

A root that is a file, or that this user cannot read, would start and then
refuse every request; a public address no service listens on would send every
node to a dead end.  Both are refused here with ConfigError naming the key.  A
missing folder is created empty and said so in the log (a fresh install).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from .config import ConfigError

log = logging.getLogger("bootherd.preflight")

WILDCARDS = ("0.0.0.0", "::", "")
# key -> (the services that use it, must bootherd write there?)
ROOTS: dict[tuple[str, str], tuple[tuple[str, ...], bool]] = {
    ("tftp", "root"): (("tftp", "http"), False),  # HTTP serves the loaders from it too
    ("tftp", "upload_dir"): (("tftp",), True),
    ("http", "root"): (("http",), False),
    ("http", "log_dir"): (("http",), True),
}


def check_folder(cfg: Any, section: str, key: str, write: bool) -> Path | None:
    """The folder of `section.key`, created if missing; ConfigError if unusable."""
    value = getattr(getattr(cfg, section), key)
    if not value:
        return None
    where = f"{section}.{key}"
    path = cfg.path(value)
    if not path.exists():
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise ConfigError(f"{where}: {path} does not exist and cannot be created: "
                              f"{e.strerror}") from None
        log.warning("%s %s did not exist: created it empty", where, path)
        return path
    if not path.is_dir():
        raise ConfigError(f"{where}: {path} is not a folder")
    need = os.R_OK | os.X_OK | (os.W_OK if write else 0)
    if not os.access(path, need):
        what = "readable and writable" if write else "readable"
        raise ConfigError(f"{where}: {path} is not {what} by this user (uid {os.geteuid()})")
    try:
        next(os.scandir(path), None)
    except OSError as e:
        raise ConfigError(f"{where}: {path} cannot be listed: {e.strerror}") from None
    return path


def check_roots(cfg: Any, services: list[str]) -> None:
    for (section, key), (users, write) in ROOTS.items():
        if any(s in services for s in users):
            check_folder(cfg, section, key, write)
    if cfg.log.file:
        parent = cfg.path(cfg.log.file).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"log.file: cannot write into {parent}")


def is_local(address: str) -> bool:
    """True if this host has `address` (a socket can be bound to it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def check_public_address(cfg: Any, services: list[str]) -> None:
    """server.public_address, when set, must be where a service of this process listens:
    its own address, or the wildcard on a host that has it."""
    public = cfg.server.public_address
    if not public or not services:
        return
    # Services that listen (the console capture, for one, has no address).
    addresses = {s: a for s in services if (a := getattr(getattr(cfg, s), "address", ""))}
    if public in addresses.values():
        return
    if any(a in WILDCARDS for a in addresses.values()) and is_local(public):
        return
    listed = ", ".join(f"{s}.address = {a}" for s, a in addresses.items())
    why = "" if is_local(public) else "; this host does not have that address"
    raise ConfigError(
        f"server.public_address: no service listens on {public} ({listed}){why}. Set the "
        "services' addresses to it (or 0.0.0.0), or leave server.public_address empty so "
        "that replies advertise the address each request arrived on")


def check_public_address6(cfg: Any, services: list[str]) -> None:
    """DHCPv6 boot URLs name this server by one IPv6 address (policy.public_address6):
    with dhcp6.address the wildcard and no address configured, they would say `[::]`."""
    if "dhcp6" not in services:
        return
    from .policy import public_address6

    if public_address6(cfg) in WILDCARDS:
        raise ConfigError(
            "server.public_address6: required with dhcp6.address = \"::\" (DHCPv6 boot "
            "file URLs name this server's IPv6 address); or set an IPv6 "
            "server.public_address, or bind dhcp6.address to that address")


def check(cfg: Any, services: list[str]) -> None:
    """Everything above; ConfigError names the first problem."""
    check_roots(cfg, services)
    check_public_address(cfg, services)
    check_public_address6(cfg, services)


HINTS = {
    errno.EADDRINUSE: "another server, bootherd or not, listens there",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
    errno.EADDRNOTAVAIL: "no interface of this host has that address",
}


def bind_failure(service: str, e: OSError) -> str:
    """One line for a service that could not bind: its name once, the address, the
    system's reason and a hint; never "[Errno None]", nor a reason said twice (each
    service and asyncio phrase their errors differently: only the address, the
    interface and the errno are taken from them)."""
    text = next((a for a in (e.strerror, *e.args) if isinstance(a, str)), "")
    m = re.search(r"\('([^']*)', (\d+)\)", text) or \
        re.search(r"(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):(\d+)", text)
    on = re.search(r" on ([A-Za-z][\w.-]*):", text)  # dhcp.interface (not "on 10.0.0.1:")
    reason = os.strerror(e.errno) if e.errno else ""
    if m is None or not reason:
        for prefix in (f"{service}: ", f"{service.upper()}: "):
            text = text.removeprefix(prefix)
        return f"{service}: {text or reason or type(e).__name__}"
    host = m.group(1)
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    line = f"{service}: cannot bind {host}:{m.group(2)}{' on ' + on.group(1) if on else ''}: " \
           f"{reason}"
    hint = HINTS.get(e.errno or 0)
    return f"{line} ({hint})" if hint else line

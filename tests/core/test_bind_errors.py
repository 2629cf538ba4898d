"""A service that cannot bind stops start-up with one clear line: the service named once,
the address, the reason and a hint; no traceback, no "[Errno None]", no repeats."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bootherd.procs import free_port

PY = sys.executable
SERVICES = ["dhcp", "tftp", "bootinfo", "tmcd", "http"]


def start(tmp_path: Path, service: str, *sets: str) -> subprocess.CompletedProcess:
    db = f"sqlite:///{tmp_path}/i.db"
    subprocess.run([PY, "-m", "bootherd.cli", "db", "upgrade", "--db", db], check=True,
                   capture_output=True)
    return subprocess.run([PY, "-m", "bootherd.cli", "serve", "--only", service, "--db", db,
                           "--set", f"tftp.root={tmp_path}", "--set", f"http.root={tmp_path}",
                           "--set", f"http.log_dir={tmp_path}/logs",
                           "--set", f"http.admin_token_file={tmp_path}/tok",
                           *(x for s in sets for x in ("--set", s))],
                          capture_output=True, text=True, timeout=60)


def check_line(r: subprocess.CompletedProcess, service: str, reason: str) -> str:
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"bootherd: {service}: "), line
    assert line.count(service) + line.count(service.upper()) == 1, line
    assert "[Errno" not in line and "None" not in line and "Traceback" not in r.stderr, line
    assert reason in line, line
    return line


@pytest.mark.parametrize("service", SERVICES)
def test_port_in_use(tmp_path: Path, service: str) -> None:
    port = free_port()
    kind = socket.SOCK_STREAM if service in ("tmcd", "http") else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as held:
        held.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            held.listen()
        r = start(tmp_path, service, f"{service}.port={port}")
    line = check_line(r, service, "Address already in use")
    assert f"127.0.0.1:{port}" in line
    assert line.endswith("(another server, bootherd or not, listens there)"), line


@pytest.mark.parametrize("service", SERVICES)
def test_address_not_on_this_host(tmp_path: Path, service: str) -> None:
    r = start(tmp_path, service, f"{service}.address=192.0.2.77",
              f"{service}.port={free_port()}")
    line = check_line(r, service, "192.0.2.77")
    assert re.search(r"(Cannot assign requested address|not available).*"
                     r"\(no interface of this host has that address\)", line), line

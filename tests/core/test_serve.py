"""`bootherd serve` as operators run it: a separate process, changed live from
another process, stopped by SIGTERM, refusing a port it cannot bind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootherd.bootinfo import codec
from bootherd.boottype import BootType
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.snapshot import load
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.procs import free_port


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bootherd.cli", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=60)


@pytest.fixture
def deployment(tmp_path):  # noqa: ANN001, ANN201
    url = f"sqlite:///{tmp_path}/inv.db"
    engine = make_engine(url)
    upgrade(engine)
    import_testbed(engine, generate(40, subnet="127.42.0.0/24"))
    ports = {"bootinfo": free_port(), "client": free_port(), "order": free_port()}
    conf = tmp_path / "bootherd.toml"
    conf.write_text(f'[database]\nurl = "{url}"\n'
                    f'[bootinfo]\nport = {ports["bootinfo"]}\nclient_port = {ports["client"]}\n'
                    f'order_port = {ports["order"]}\n')
    yield tmp_path, conf, engine, ports
    engine.dispose()


def start(conf: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bootherd.cli", "serve", "-c", str(conf),
                             *extra], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def ask(node_ip: str, ports: dict, timeout: float = 20.0) -> codec.BootWhat:
    """A loader's bootinfo request from the node's own address, retried like a loader."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((node_ip, ports["client"]))
        s.settimeout(0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.sendto(codec.request(), ("127.0.0.1", ports["bootinfo"]))
            try:
                data, _ = s.recvfrom(1024)
            except TimeoutError:
                continue
            return codec.decode(data).boot_what()
    raise AssertionError("no bootinfo reply")


def test_change_from_another_process_reaches_the_running_server(deployment):
    tmp, conf, engine, ports = deployment
    node = next(n for n in load(engine).nodes.values() if n.allocation is None)
    proc = start(conf, tmp, "--only", "bootinfo")
    try:
        assert ask(node.control_ip, ports).type == BootType.WAIT
        r = cli("experiment", "allocate", "proj0", "exp0", f"{node.node_id}:live1", "-c",
                str(conf), cwd=tmp)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 20
        answer = ask(node.control_ip, ports)
        while answer.type == BootType.WAIT and time.monotonic() < deadline:
            time.sleep(0.1)
            answer = ask(node.control_ip, ports)
        assert answer.type == BootType.PART  # the default OS, seen without a restart
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "inventory reloaded" in out


def test_a_port_that_cannot_be_bound_is_a_clear_error(deployment):
    tmp, conf, _, ports = deployment
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocker:
        blocker.bind(("127.0.0.1", ports["bootinfo"]))
        proc = start(conf, tmp, "--only", "bootinfo")
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "bootinfo" in out and str(ports["bootinfo"]) in out


def test_sigint_stops_cleanly(deployment):
    tmp, conf, _, _ = deployment
    proc = start(conf, tmp, "--only", "bootinfo")
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "bootherd ready" in line or not line:
            break
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, "".join(lines) + out
    assert "bootherd stopped" in out

"""A `bootherd serve` with every service for the storm tests: its own folder,
ports and generated inventory, started as a subprocess and killed by its pid.
Not a conftest.py: test modules import it (see tests/web/web_helpers.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.procs import free_port, terminate


@contextmanager
def storm_server(work: Path, nodes: int, subnet: str, seed: int, relay_line: str | None = None,
                 extra: str = "") -> Iterator[tuple[Path, dict[str, int], subprocess.Popen]]:
    """Serve `nodes` generated nodes on `subnet` from `work`; yields (config, ports,
    process).  `relay_line`: the [dhcp] relay_port line (default: on the relay port);
    `extra`: more TOML sections."""
    ports = {k: free_port() for k in ("dhcp", "proxy", "tftp", "bootinfo", "client", "order",
                                       "tmcd", "http", "relay", "imaging")}
    if relay_line is None:
        relay_line = f"relay_port = {ports['relay']}\n"
    (work / "tftpboot").mkdir()
    (work / "www").mkdir()
    cfg_path = work / "bootherd.toml"
    cfg_path.write_text(
        '[database]\nurl = "sqlite:///inventory.db"\npoll_interval = 0.1\n'
        f'[dhcp]\nport = {ports["dhcp"]}\nproxy_port = {ports["proxy"]}\n{relay_line}'
        f'[tftp]\nroot = "tftpboot"\nport = {ports["tftp"]}\n'
        f'[bootinfo]\nport = {ports["bootinfo"]}\nclient_port = {ports["client"]}\n'
        f'order_port = {ports["order"]}\n'
        f'[tmcd]\nport = {ports["tmcd"]}\nfallback_port = 0\n'
        f'[imaging]\nport = {ports["imaging"]}\n'
        f'[http]\nport = {ports["http"]}\nroot = "www"\nlog_dir = "nodelogs"\n'
        'admin_token_file = "admin-token"\n' + extra)
    engine = make_engine(f"sqlite:///{work}/inventory.db")
    upgrade(engine)
    import_testbed(engine, generate(nodes, subnet=subnet, seed=seed))
    engine.dispose()
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bootherd.cli", "serve", "-c", str(cfg_path)],
                            cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", ports["tmcd"]), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bootherd serve did not start:\n"
                                       + (work / "serve.log").read_text()) from None
                time.sleep(0.1)
        time.sleep(0.3)  # the UDP services start before TMCD; give HTTP its moment too
        yield cfg_path, ports, proc
    finally:
        terminate(proc)
        log.close()

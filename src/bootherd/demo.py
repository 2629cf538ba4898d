"""`bootherd demo`: bootherd on its embedded defaults, shown working.

Generates a sample testbed whose nodes live on 127.64.0.0/16 (every node has
its own loopback source address), starts `bootherd serve` as a child process,
talks to it the way nodes and operators do, and ends with a boot storm.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from .procs import terminate

console = Console()


def _bootherd(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bootherd.cli", *args], cwd=cwd, check=check,
                          text=True, capture_output=True)


def _wait_port(host: str, port: int, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"bootherd did not open {host}:{port} within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bootherd demo")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--dir", default="var/demo")
    ap.add_argument("--no-storm", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.dir).resolve()
    if work.exists():
        shutil.rmtree(work)
    (work / "tftpboot").mkdir(parents=True)
    (work / "www").mkdir()
    config = work / "bootherd.toml"
    config.write_text(
        '[database]\nurl = "sqlite:///bootherd.db"\n'
        '[tftp]\nroot = "tftpboot"\n[http]\nroot = "www"\nlog_dir = "nodelogs"\n'
        'admin_token_file = "admin-token"\n')
    _make_files(work)
    console.rule("[bold]bootherd demo")
    console.print(f"work folder: {work}")
    console.print(_bootherd("db", "upgrade", "-c", str(config), cwd=work).stdout.strip())
    _bootherd("testbed", "generate", "--nodes", str(args.nodes), "--subnet", "127.64.0.0/16",
              "-o", "testbed.toml", cwd=work)
    console.print(_bootherd("testbed", "import", "testbed.toml", "-c", str(config),
                            cwd=work).stdout.strip())
    log = open(work / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "bootherd.cli", "serve", "-c", str(config)],
                              cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port("127.0.0.1", 7777 if _has("tmcd") else 8080)
        time.sleep(0.5)
        console.print(f"[green]bootherd serve running[/] (pid {server.pid}, log {work / 'serve.log'})")
        console.print(f"web console while it runs: http://127.0.0.1:8080/ui/ (admin token in "
                      f"{work / 'admin-token'})")
        _show(work, config, args)
    finally:
        terminate(server)
        log.close()
    console.print("[green]bootherd stopped cleanly[/]" if server.returncode == 0
                  else f"[red]bootherd exited with {server.returncode}[/]")
    return 0 if server.returncode == 0 else 1


def _has(module: str) -> bool:
    import importlib.util

    names = {"tmcd": "bootherd.tmcd.service", "storm": "bootherd.storm.cli",
             "http": "bootherd.web.service", "dhcp": "bootherd.dhcp.service"}
    return importlib.util.find_spec(names[module]) is not None


def _make_files(work: Path) -> None:
    # Stand-ins for a loader, a kernel and tarballs, with realistic sizes.
    for name, size in (("undionly.kpxe", 70_000), ("snponly.efi", 200_000), ("ipxe.efi", 1_000_000)):
        (work / "tftpboot" / name).write_bytes(os.urandom(size))
    for sub in ("tarballs", "rpms", "kernels"):
        (work / "www" / sub).mkdir()


def _show(work: Path, config: Path, args: argparse.Namespace) -> None:
    c = ["-c", str(config)]
    rows = _bootherd("node", "list", "--json", *c, cwd=work).stdout
    import json

    nodes = json.loads(rows)
    free = next(n for n in nodes if not n["experiment"])
    console.print(f"{len(nodes)} nodes in the inventory; {sum(1 for n in nodes if n['experiment'])}"
                  " allocated to experiments")
    if _has("tmcd"):
        def status() -> str:
            r = _bootherd("tmcc", "-s", "127.0.0.1", "-l", free["ip"], "-b", "status", cwd=work,
                          check=False)
            return r.stdout.strip() or r.stderr.strip()

        console.print(f"TMCD, asked by {free['node_id']} from {free['ip']}: {status()}")
        console.print(_bootherd("experiment", "allocate", "proj0", "exp0",
                                f"{free['node_id']}:demo1", *c, cwd=work).stdout.strip())
        t0 = time.monotonic()
        answer = status()
        while "ALLOCATED" not in answer and time.monotonic() - t0 < 10:
            time.sleep(0.05)
            answer = status()
        console.print(f"TMCD, asked again (no restart, {time.monotonic() - t0:.2f}s later): {answer}")
    if _has("storm") and not args.no_storm:
        console.rule(f"boot storm: {args.nodes} nodes")
        subprocess.run([sys.executable, "-m", "bootherd.cli", "storm", "--nodes", str(args.nodes),
                        "-c", str(config), "--plot", str(work / "storm.png"),
                        "--json", str(work / "storm.json")], cwd=work, check=False)
    else:
        out = _bootherd("node", "list", *c, cwd=work).stdout.splitlines()
        console.print("\n".join(out[:12]))


if __name__ == "__main__":
    sys.exit(main())

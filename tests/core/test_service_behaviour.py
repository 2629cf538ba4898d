"""`bootherd serve` behaves like a service: SIGHUP re-reads what can change live and
reopens its log file (saying what it did), SIGUSR1 logs its state, neither kills it;
systemd's notify protocol (READY once ports are bound, WATCHDOG, RELOADING, STOPPING)
over a NOTIFY_SOCKET we bind; a server name that survives restarts and dead servers
pruned; folders and the public address checked at start; privileges dropped once
the ports are bound; `node wake` with a bootinfo address that is not here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import insert

from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine
from bootherd.procs import free_port, terminate

PY = sys.executable


class Server:
    def __init__(self, tmp: Path, extra: str = "", only: str = "http"):
        self.tmp = tmp
        self.port = free_port()
        self.cfg = tmp / "b.toml"
        self.logfile = tmp / "bootherd.log"
        self.write(extra)
        self.only = only
        self.proc: subprocess.Popen | None = None
        self.out = tmp / "stdout.log"

    def write(self, extra: str = "", level: str = "info", server: str = "",
              tftp: str = "") -> None:
        """The configuration; `server` and `tftp` add keys to those tables, `extra`
        adds tables."""
        self.cfg.write_text(
            f'[database]\nurl = "sqlite:///{self.tmp}/i.db"\n'
            f'[log]\nlevel = "{level}"\nfile = "{self.logfile}"\n'
            f'[server]\nname_file = "{self.tmp}/server-name"\n{server}'
            f'[http]\nport = {self.port}\nroot = "{self.tmp}/www"\n'
            f'log_dir = "{self.tmp}/logs"\nadmin_token_file = "{self.tmp}/token"\n'
            f'[tftp]\nroot = "{self.tmp}/tftp"\n{tftp}' + extra)

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
        return subprocess.run([PY, "-m", "bootherd.cli", *args, "-c", str(self.cfg)],
                              cwd=self.tmp, capture_output=True, text=True, timeout=60, **kw)

    def start(self, env: dict | None = None, prefix: tuple[str, ...] = ()) -> None:
        if not (self.tmp / "i.db").exists():
            assert self.cli("db", "upgrade").returncode == 0
        with open(self.out, "a") as out:
            self.proc = subprocess.Popen(
                [*prefix, PY, "-m", "bootherd.cli", "serve", "--only", self.only, "-c",
                 str(self.cfg)], cwd=self.tmp, stdout=out, stderr=out,
                env={**os.environ, **(env or {})})
        self.wait_for("bootherd ready")

    def log(self) -> str:
        p = self.logfile
        return (p.read_text() if p.exists() else "") + self.out.read_text()

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.log():
                return
            assert self.proc is not None and self.proc.poll() is None, self.log()
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in:\n{self.log()}")

    def stop(self) -> int | None:
        return terminate(self.proc) if self.proc is not None else None


@pytest.fixture
def server(tmp_path: Path):  # noqa: ANN201
    srv = Server(tmp_path)
    yield srv
    srv.stop()


def test_sighup_reloads_live_keys_and_reopens_the_log(server: Server) -> None:
    server.start()
    assert server.proc is not None
    server.write(level="debug", extra="[dhcp]\nport = 6768\n")
    os.rename(server.tmp / "bootherd.log", server.tmp / "bootherd.log.1")  # logrotate
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for("SIGHUP: configuration re-read")
    text = (server.tmp / "bootherd.log").read_text()  # a new file: reopened
    assert f"re-read from {server.cfg}; applied: log.level; need a restart: dhcp.port; " \
           f"reopened {server.tmp}/bootherd.log" in text, text
    server.write(level="loud")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for("configuration not reloaded")
    assert "log.level: must be one of" in server.log()
    server.proc.send_signal(signal.SIGUSR1)
    server.wait_for("SIGUSR1: state: services=http")
    server.wait_for("SIGUSR1: nodes by state")
    time.sleep(0.3)
    assert server.proc.poll() is None  # neither signal killed it
    assert server.stop() == 0


def test_sd_notify_ready_watchdog_reload_stopping(server: Server) -> None:
    path = server.tmp / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    try:
        server.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1\nSTATUS=serving http")
        with socket.create_connection(("127.0.0.1", server.port), timeout=2):
            pass  # READY came once the port was bound
        pings = [sock.recv(4096) for _ in range(3)]
        assert pings == [b"WATCHDOG=1"] * 3
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        got = [sock.recv(4096).decode() for _ in range(6)]
        got = [g for g in got if g != "WATCHDOG=1"]
        assert got[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and got[1] == "READY=1"
        server.proc.send_signal(signal.SIGTERM)
        rest = []
        while "STOPPING=1" not in rest:
            rest.append(sock.recv(4096).decode())
        assert server.proc.wait(20) == 0
    finally:
        sock.close()


def test_server_name_survives_restarts_and_dead_servers_are_pruned(server: Server) -> None:
    assert server.cli("db", "upgrade").returncode == 0
    e = make_engine(f"sqlite:///{server.tmp}/i.db")
    with e.begin() as c:
        c.execute(insert(s.servers).values(name="gone", roles="dhcp", address="10.0.0.9",
                                           started=1.0, heartbeat=time.time() - 200_000))
    e.dispose()
    names = []
    for _ in range(2):
        server.start()
        rows = json.loads(server.cli("status", "--json").stdout)
        names.append([r["name"] for r in rows])
        server.stop()
    kept = (server.tmp / "server-name").read_text().strip()
    assert kept == socket.gethostname()
    assert names == [[kept], [kept]]  # one row, the same name; "gone" pruned (1 day)


def test_two_servers_from_one_folder_keep_apart(server: Server) -> None:
    server.start()
    other = Server(server.tmp)
    other.cfg, other.logfile = server.tmp / "c.toml", server.tmp / "other.log"
    other.out = server.tmp / "other.out"
    other.write()
    try:
        other.start()
        rows = json.loads(server.cli("status", "--json").stdout)
        assert len(rows) == 2 and len({r["name"] for r in rows}) == 2
        assert f"running as {socket.gethostname()}-{other.proc.pid}" in other.log()
    finally:
        other.stop()


def test_roots_are_checked_at_start(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    assert srv.cli("db", "upgrade").returncode == 0
    srv.start()
    assert (tmp_path / "tftp").is_dir()
    assert f"tftp.root {tmp_path}/tftp did not exist: created it empty" in srv.log()
    srv.stop()
    (tmp_path / "www").rmdir()
    (tmp_path / "www").write_text("not a folder")
    r = subprocess.run([PY, "-m", "bootherd.cli", "serve", "--only", "http", "-c",
                        str(srv.cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == \
        f"bootherd: http.root: {tmp_path}/www is not a folder"


@pytest.fixture
def open_tmp():  # noqa: ANN201
    """A folder another user can reach (pytest's tmp_path sits in root's 0700 folder)."""
    d = Path(tempfile.mkdtemp(prefix="bootherd-t-", dir="/tmp"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_unreadable_root_is_refused(open_tmp: Path) -> None:
    tmp_path = open_tmp
    srv = Server(tmp_path)
    assert srv.cli("db", "upgrade").returncode == 0
    for p in tmp_path.iterdir():
        p.chmod(0o666)
    (tmp_path / "tftp").mkdir(mode=0o700)  # root's, and nobody may read it
    (tmp_path / "www").mkdir(mode=0o777)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        PY, "-m", "bootherd.cli", "serve", "--only", "http", "-c", str(srv.cfg)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"bootherd: tftp.root: {tmp_path}/tftp is not readable by this user (uid 65534)"


@pytest.mark.parametrize(("public", "why"), [
    ("192.0.2.55", "this host does not have that address"),
    ("127.0.0.2", "(http.address = 127.0.0.1)"),
])
def test_public_address_nobody_listens_on_is_refused(tmp_path: Path, public: str,
                                                     why: str) -> None:
    srv = Server(tmp_path)
    srv.write(server=f'public_address = "{public}"\n')
    assert srv.cli("db", "upgrade").returncode == 0
    r = subprocess.run([PY, "-m", "bootherd.cli", "serve", "--only", "http", "-c",
                        str(srv.cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("bootherd: server.public_address: no service listens on ") \
        and why in line, line


def test_dhcp6_on_the_wildcard_needs_an_address_to_advertise(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    assert srv.cli("db", "upgrade").returncode == 0
    r = subprocess.run([PY, "-m", "bootherd.cli", "serve", "--only", "dhcp6", "-c",
                        str(srv.cfg), "--set", "dhcp6.enabled=true", "--set", "dhcp6.address=::",
                        "--set", f"dhcp6.port={free_port()}"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        'bootherd: server.public_address6: required with dhcp6.address = "::"'), r.stderr


def test_serve_in_a_fresh_folder_creates_no_inventory(tmp_path: Path) -> None:
    r = subprocess.run([PY, "-m", "bootherd.cli", "serve", "--only", "http", "--set",
                        f"http.port={free_port()}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and f"no inventory at {tmp_path}/var/bootherd.db" in r.stderr
    assert "built-in defaults" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no database, and no roots made for nothing


def test_node_wake_with_a_bootinfo_address_not_here(tmp_path: Path) -> None:
    from bootherd.inventory.testbed import generate

    srv = Server(tmp_path, '[bootinfo]\naddress = "192.0.2.66"\n')
    assert srv.cli("db", "upgrade").returncode == 0
    (tmp_path / "tb.toml").write_text(generate(2, subnet="127.33.0.0/24"))
    assert srv.cli("testbed", "import", str(tmp_path / "tb.toml")).returncode == 0
    r = srv.cli("node", "wake", "pc1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (
        "bootherd: bootinfo.address 192.0.2.66 is not an address of this host, and orders go "
        "out from it: run `bootherd node wake` on the boot server (or with its "
        "configuration), or set bootinfo.address")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_privileges_dropped_once_ports_are_bound(open_tmp: Path) -> None:
    tmp_path = open_tmp
    srv = Server(tmp_path, only="http,tftp")
    srv.write(server='user = "nobody"\n', tftp="port = 69\n")  # 69: a privileged port
    srv.start()
    assert srv.proc is not None
    status = Path(f"/proc/{srv.proc.pid}/status").read_text()
    uid = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uid == ["65534"] * 4, status
    assert "dropped privileges to nobody (uid 65534" in srv.log()
    # Still serving, and still writing its inventory as nobody.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=2):
        pass
    assert os.stat(tmp_path / "i.db").st_uid == 65534
    time.sleep(6)  # a heartbeat written as nobody
    assert "heartbeat failed" not in srv.log()
    assert srv.stop() == 0

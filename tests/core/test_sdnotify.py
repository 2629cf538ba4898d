"""sd_notify over a fake NOTIFY_SOCKET (the datagram socket systemd would pass), and
the shipped unit and configuration: Type=notify with a watchdog, Debian paths."""

from __future__ import annotations

import configparser
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from bootherd import config as configmod
from bootherd.sdnotify import Notifier

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "systemd" / "bootherd.service"
CONF = ROOT / "contrib" / "bootherd.toml"


def listen(tmp_path: Path, abstract: bool = False) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"bootherd-test-{secrets.token_hex(4)}"
        s.bind("\0" + name)
        env = "@" + name
    else:
        env = str(tmp_path / "notify")
        s.bind(env)
    s.settimeout(5)
    return s, env


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_to_the_socket(tmp_path: Path, abstract: bool) -> None:
    sock, env = listen(tmp_path, abstract)
    with sock:
        n = Notifier({"NOTIFY_SOCKET": env, "WATCHDOG_USEC": "4000000",
                      "WATCHDOG_PID": str(os.getpid())})
        assert n.enabled and n.watchdog_interval == 2.0
        assert n.ready("serving 5 services")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving 5 services"
        n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        n.reloading()
        msg = sock.recv(4096).decode()
        assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=") and msg.split("=")[-1].isdigit()
        n.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        n.close()


def test_notifier_without_socket_or_for_another_pid_does_nothing(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and n.watchdog_interval is None
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000000",
                  "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None  # the watchdog is another process's
    assert not n.ready()  # nobody listens: logged once, never raised


def test_unit_is_type_notify_with_watchdog_and_debian_paths() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    svc = unit["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0
    assert svc["ExecStart"].split()[1:] == ["serve", "--config", str(configmod.DEFAULT_CONFIG)]
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "CAP_NET_BIND_SERVICE" in svc["AmbientCapabilities"]
    assert svc["StateDirectory"] == "bootherd" and svc["LogsDirectory"] == "bootherd"
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                           text=True)
        assert "bootherd.service" not in r.stderr or "Unknown" not in r.stderr, r.stderr


def test_shipped_configuration_is_valid_and_uses_the_units_folders() -> None:
    cfg = configmod.load(CONF)
    assert cfg.database_url == "sqlite:////var/lib/bootherd/bootherd.db"
    assert (cfg.dhcp.port, cfg.dhcp.proxy_port, cfg.tftp.port) == (67, 4011, 69)
    assert cfg.server.public_address == ""
    for key in (cfg.log.file, cfg.tftp.root, cfg.http.root, cfg.http.log_dir,
                cfg.http.admin_token_file):
        assert Path(key).is_absolute()
        assert key.startswith(("/var/lib/bootherd/", "/var/log/bootherd/", "/srv/tftp")), key

"""The admin token: generated once, kept across restarts (0600), where it is said in the
log and in the 401 answer, shown and rotated by `bootherd token`, a rotation taken
by the running server at once."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bootherd.procs import free_port, terminate

PY = sys.executable


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bootherd.cli", *args, "-c", str(tmp / "b.toml")],
                          cwd=tmp, capture_output=True, text=True, timeout=60)


def setup(tmp: Path) -> int:
    port = free_port()
    (tmp / "b.toml").write_text(
        f'[database]\nurl = "sqlite:///{tmp}/i.db"\n[http]\nport = {port}\n'
        f'root = "{tmp}/www"\nlog_dir = "{tmp}/logs"\nadmin_token_file = "{tmp}/token"\n'
        f'[tftp]\nroot = "{tmp}/tftp"\n')
    assert cli(tmp, "db", "upgrade").returncode == 0
    return port


def serve(tmp: Path, port: int) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        p = subprocess.Popen([PY, "-m", "bootherd.cli", "serve", "--only", "http", "-c",
                              str(tmp / "b.toml")], cwd=tmp, stdout=out, stderr=out)
    for _ in range(200):
        if "bootherd ready" in log.read_text():
            return p, log
        assert p.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError(log.read_text())


def get(port: int, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/nodes",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_token_survives_restarts_and_rotates_live(tmp_path: Path) -> None:
    port = setup(tmp_path)
    assert cli(tmp_path, "token", "show").returncode == 1  # no server has made one yet
    p, log = serve(tmp_path, port)
    try:
        first = (tmp_path / "token").read_text().strip()
        assert stat.S_IMODE(os.stat(tmp_path / "token").st_mode) == 0o600
        assert f"admin API token in {tmp_path}/token" in log.read_text()
        assert first not in log.read_text()
        shown = cli(tmp_path, "token", "show")
        assert shown.returncode == 0 and shown.stdout.strip() == first
        assert get(port, first)[0] == 200
        code, body = get(port, "wrong")
        assert code == 401 and f"the token is {tmp_path}/token on the server" in body["error"]
        assert "bootherd token show" in body["error"]
        rotated = cli(tmp_path, "token", "rotate")
        assert rotated.returncode == 0
        new = rotated.stdout.strip()
        assert new != first and (tmp_path / "token").read_text().strip() == new
        assert get(port, new)[0] == 200 and get(port, first)[0] == 401
    finally:
        terminate(p)
    p, _ = serve(tmp_path, port)  # a restart keeps the rotated token
    try:
        assert (tmp_path / "token").read_text().strip() == new
        assert get(port, new)[0] == 200
    finally:
        terminate(p)


def test_configured_token_is_not_rotated(tmp_path: Path) -> None:
    setup(tmp_path)
    r = subprocess.run([PY, "-m", "bootherd.cli", "token", "rotate", "-c",
                        str(tmp_path / "b.toml"), "--set", "http.admin_token=fixed-one"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "http.admin_token is set in the configuration" in r.stderr

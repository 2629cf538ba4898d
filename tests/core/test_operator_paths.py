"""Where the CLI looks and what it says about it: the configuration it read, the
inventory it opened (never an empty one created by a mistyped folder), an unreachable
PostgreSQL called unreachable, and no secret in anything it prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bootherd import config as configmod
from bootherd.procs import free_port

PY = sys.executable


def bootherd(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != configmod.ENV_CONFIG}
    e.update(env or {})
    return subprocess.run([PY, "-m", "bootherd.cli", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=60)


def test_fresh_folder_creates_nothing_and_names_the_path(tmp_path: Path) -> None:
    for cmd in (["node", "list"], ["status"], ["testbed", "export"]):
        r = bootherd(*cmd, cwd=tmp_path)
        assert r.returncode == 1, r  # README: exit codes (could not be done)
        assert f"no inventory at {tmp_path}/var/bootherd.db" in r.stderr
        assert "built-in defaults" in r.stderr and "/etc/bootherd/bootherd.toml" in r.stderr
        assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_bootherd_config_variable_is_read_and_named(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/inv.db"\n')
    env = {configmod.ENV_CONFIG: str(cfg)}
    assert bootherd("db", "upgrade", cwd=tmp_path, env=env).returncode == 0
    assert (tmp_path / "inv.db").exists()
    r = bootherd("node", "list", "--json", cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "[]"
    r = bootherd("config", "check", cwd=tmp_path, env=env)
    assert f"configuration from {cfg}" in r.stderr
    missing = bootherd("config", "check", cwd=tmp_path,
                       env={configmod.ENV_CONFIG: str(tmp_path / "nope.toml")})
    assert missing.returncode == 2 and "nope.toml: configuration file not found" in missing.stderr


def test_etc_default_is_used_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(configmod.ENV_CONFIG, raising=False)
    etc = tmp_path / "bootherd.toml"
    monkeypatch.setattr(configmod, "DEFAULT_CONFIG", etc)
    assert configmod.load().source is None
    etc.write_text('[server]\nname = "from-etc"\n')
    cfg = configmod.load()
    assert cfg.source == etc and cfg.server.name == "from-etc"
    monkeypatch.setenv(configmod.ENV_CONFIG, str(tmp_path / "other.toml"))
    (tmp_path / "other.toml").write_text('[server]\nname = "from-env"\n')
    assert configmod.load().server.name == "from-env"
    assert configmod.load(etc).server.name == "from-etc"  # -c wins


def test_unreachable_postgresql_is_reported_as_unreachable(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://bootherd:hunter2@127.0.0.1:{free_port()}/bootherd"
    for cmd in (["node", "list"], ["db", "upgrade"]):
        r = bootherd(*cmd, "--db", url, cwd=tmp_path)
        assert r.returncode == 1
        assert "is unreachable" in r.stderr and "Connection refused" in r.stderr, r.stderr
        assert "db upgrade" not in r.stderr and "schema" not in r.stderr
        assert "hunter2" not in r.stderr and "bootherd:********@127.0.0.1" in r.stderr


def test_missing_schema_is_reported_as_missing(tmp_path: Path) -> None:
    (tmp_path / "empty.db").write_bytes(b"")
    r = bootherd("node", "list", "--db", f"sqlite:///{tmp_path}/empty.db", cwd=tmp_path)
    assert r.returncode == 1 and "schema at nothing" in r.stderr and "db upgrade" in r.stderr


def test_config_check_masks_secrets(tmp_path: Path) -> None:
    r = bootherd("config", "check", "--json", "--set", "http.admin_token=s3cr3t-token",
                 "--db", "postgresql+psycopg://bootherd:pa55word@db.example/bootherd",
                 cwd=tmp_path)
    assert r.returncode == 0
    assert "s3cr3t-token" not in r.stdout + r.stderr and "pa55word" not in r.stdout + r.stderr
    assert '"admin_token": "********"' in r.stdout
    assert "postgresql+psycopg://bootherd:********@db.example/bootherd" in r.stdout


def test_node_secrets_are_masked_in_cli_output(tmp_path: Path) -> None:
    from bootherd.inventory.testbed import generate

    db = f"sqlite:///{tmp_path}/i.db"
    (tmp_path / "tb.toml").write_text(generate(3, subnet="127.31.0.0/24"))
    assert bootherd("db", "upgrade", "--db", db, cwd=tmp_path).returncode == 0
    assert bootherd("testbed", "import", "tb.toml", "--db", db, cwd=tmp_path).returncode == 0
    r = bootherd("node", "set", "pc1", "privkey=0badc0ffee1234", "--db", db, cwd=tmp_path)
    assert r.returncode == 0 and "0badc0ffee1234" not in r.stdout and "********" in r.stdout
    r = bootherd("node", "show", "pc1", "--db", db, cwd=tmp_path)
    assert r.returncode == 0 and "0badc0ffee1234" not in r.stdout and "********" in r.stdout
    r = bootherd("node", "show", "pc1", "--json", "--db", db, cwd=tmp_path)
    assert r.returncode == 0 and "0badc0ffee1234" not in r.stdout
    assert '"privkey": "********"' in r.stdout
    # ... and it was stored: the export (a backup format, not a listing) keeps it.
    assert "0badc0ffee1234" in bootherd("testbed", "export", "--db", db, cwd=tmp_path).stdout

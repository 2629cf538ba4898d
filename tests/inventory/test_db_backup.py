"""`bootherd db backup FILE`: a consistent copy of a live inventory.  A plain copy of a
SQLite file in WAL mode misses what the WAL holds (recent events, leases); the online
backup API does not, while a writer keeps committing."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bootherd.inventory.db import check_current, make_engine, upgrade
from bootherd.inventory.testbed import export_testbed, generate, import_testbed

PY = sys.executable


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "bootherd.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_sqlite_backup_while_a_writer_is_busy(tmp_path: Path) -> None:
    db = tmp_path / "inv.db"
    e = make_engine(f"sqlite:///{db}")
    upgrade(e)
    import_testbed(e, generate(10, subnet="10.77.0.0/24"))
    e.dispose()
    committed = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal committed
        conn = sqlite3.connect(db, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # everything stays in the WAL
        while not stop.is_set():
            with conn:
                conn.execute("INSERT INTO node_events (node_id, ts, state, source, detail) "
                             "VALUES ('pc1', ?, 'BOOTING', 'test', '')", (time.time(),))
            committed += 1
        conn.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        while committed < 300:
            time.sleep(0.01)
        before = committed
        plain = tmp_path / "plain.db"
        shutil.copy(db, plain)  # what an operator's cp takes
        r = cli("db", "backup", str(tmp_path / "backup.db"), "--db", f"sqlite:///{db}")
        during = committed
    finally:
        stop.set()
        t.join()
    assert r.returncode == 0, r.stderr
    assert "SQLite online backup" in r.stdout
    assert during > before, "the writer must have been busy during the backup"
    with sqlite3.connect(plain) as c:
        lost = c.execute("SELECT count(*) FROM node_events").fetchone()[0]
    assert lost < before, "the plain copy must miss the WAL (else this test shows nothing)"
    with sqlite3.connect(tmp_path / "backup.db") as c:
        got = c.execute("SELECT count(*) FROM node_events").fetchone()[0]
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert before <= got <= committed
    # The copy is a working inventory with the same configuration.
    copy = make_engine(f"sqlite:///{tmp_path}/backup.db", create=False)
    check_current(copy)
    assert export_testbed(copy) == export_testbed(make_engine(f"sqlite:///{db}"))
    assert not (tmp_path / "backup.db.partial").exists()


def test_backup_of_missing_database_names_it(tmp_path: Path) -> None:
    r = cli("db", "backup", str(tmp_path / "b.db"), "--db", f"sqlite:///{tmp_path}/none.db")
    assert r.returncode == 1 and f"no inventory at {tmp_path}/none.db" in r.stderr
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "b.db").exists()


@pytest.mark.postgres
def test_postgresql_backup_runs_pg_dump(pg_url: str, tmp_path: Path) -> None:
    if shutil.which("pg_dump") is None:
        pytest.skip("pg_dump is not installed")
    e = make_engine(pg_url)
    upgrade(e)
    import_testbed(e, generate(5, subnet="10.77.0.0/24"))
    e.dispose()
    out = tmp_path / "inv.pgdump"
    r = cli("db", "backup", str(out), "--db", pg_url)
    assert r.returncode == 0, r.stderr
    assert "pg_dump custom format" in r.stdout
    password = pg_url.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
    assert f":{password}@" not in r.stdout and ":********@" in r.stdout
    listing = subprocess.run(["pg_restore", "--list", str(out)], capture_output=True, text=True)
    assert listing.returncode == 0 and "TABLE public node_events" in listing.stdout

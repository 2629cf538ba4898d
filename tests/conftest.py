"""Shared fixtures: inventories on SQLite and, where a server is reachable, PostgreSQL,
and one in memory (no database) for protocol cores."""

from __future__ import annotations

import contextlib
import os
import time
import uuid

import pytest
from sqlalchemy import create_engine, text

from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.memory import snapshot_from_text
from bootherd.inventory.testbed import generate

PG_URL = os.environ.get("BOOTHERD_TEST_PG_URL", "")


@contextlib.contextmanager
def _pg_database():  # noqa: ANN202
    """A fresh PostgreSQL database for one test; dropped afterwards."""
    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL tests: BOOTHERD_TEST_PG_URL is not set")
        pytest.skip("no PostgreSQL server (set BOOTHERD_TEST_PG_URL)")
    name = f"bootherd_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        _drop(admin, name)
        admin.dispose()


def _drop(admin, name: str) -> None:  # noqa: ANN001
    """Drop a test database; a lingering autovacuum worker only delays it."""
    for attempt in range(10):
        try:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except Exception:  # noqa: BLE001
            if attempt == 9:
                raise
            time.sleep(0.5)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):  # noqa: ANN001, ANN201
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/inventory.db"
        return
    with _pg_database() as url:
        yield url


@pytest.fixture
def pg_url():  # noqa: ANN201
    with _pg_database() as url:
        yield url


@pytest.fixture(scope="module")
def module_pg_url():  # noqa: ANN201
    """One PostgreSQL database shared by the tests of a module (a costly deployment)."""
    with _pg_database() as url:
        yield url


@pytest.fixture
def engine(db_url):  # noqa: ANN001, ANN201
    e = make_engine(db_url)
    upgrade(e)
    yield e
    e.dispose()


@pytest.fixture(scope="session")
def memory_snapshot():  # noqa: ANN201
    """The snapshot of a generated 20-node testbed (pc1 = 10.99.0.2), built in memory
    exactly as a server would load it after importing the file.  For other inventories:
    inventory.memory.snapshot_from_text(text); for a change: inventory.memory.with_nodes."""
    return snapshot_from_text(generate(20, subnet="10.99.0.0/24"))


@pytest.fixture
def sqlite_engine(tmp_path):  # noqa: ANN001, ANN201
    e = make_engine(f"sqlite:///{tmp_path}/inventory.db")
    upgrade(e)
    yield e
    e.dispose()

"""Database engines and schema migrations for the inventory."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError

MIGRATIONS = Path(__file__).with_name("migrations")


class InventoryUnavailable(RuntimeError):
    """The inventory cannot be used: missing, unreachable, or at another schema.
    The message names the database (its password masked) and what to do."""


class NoDatabase(InventoryUnavailable):
    pass


class DatabaseUnreachable(InventoryUnavailable):
    pass


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other backends and in-memory databases)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[1] if "///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def describe(url: str) -> str:
    """A database for messages: the file of SQLite, the URL without password otherwise."""
    from ..config import mask_url

    path = sqlite_path(url)
    return str(path.absolute()) if path is not None else mask_url(url)


def make_engine(url: str, create: bool = True) -> Engine:
    """An engine with the settings bootherd relies on for each backend.

    With create=False a SQLite file that does not exist is not created: NoDatabase
    names it (a command run in the wrong folder must not leave an empty inventory)."""
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None and not create and not path.exists():
            raise NoDatabase(f"no inventory at {path.absolute()}: create it with "
                             "`bootherd db upgrade`, or name the right one with -c CONFIG "
                             "or --db URL")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # durable across process kill in WAL mode
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)


def _alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Bring the schema to `revision`; returns the revision now in place."""
    cfg = _alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(engine) or ""


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str:
    return ScriptDirectory.from_config(_alembic_config(engine)).get_current_head() or ""


class SchemaOutOfDate(InventoryUnavailable):
    pass


def check_current(engine: Engine) -> None:
    """Refuse to serve from a database that is unreachable or whose schema is behind
    this code."""
    url = engine.url.render_as_string(hide_password=False)
    try:
        with engine.connect() as conn:
            cur = MigrationContext.configure(conn).get_current_revision()
    except OperationalError as e:
        reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e).splitlines()[0]
        raise DatabaseUnreachable(f"database {describe(url)} is unreachable: {reason}") \
            from None
    head = head_revision(engine)
    if cur != head:
        raise SchemaOutOfDate(
            f"database {describe(url)}: schema at {cur or 'nothing'}, this bootherd needs "
            f"{head}: run `bootherd db upgrade`")


def backup(url: str, dest: Path) -> str:
    """A consistent copy of the inventory at `dest`; returns a one-line report.

    SQLite: the online backup API, which copies the database as one read transaction
    sees it, WAL content included (copying the file misses what the WAL holds) while
    writers go on.  The copy is written beside `dest` and renamed into place once
    it passes an integrity check.  PostgreSQL: pg_dump (custom format), when installed;
    the password goes through the environment, never the command line."""
    import sqlite3

    path = sqlite_path(url)
    if url.startswith("sqlite"):
        if path is None:
            raise InventoryUnavailable("an in-memory database cannot be backed up")
        if not path.exists():
            raise NoDatabase(f"no inventory at {path.absolute()}")
        tmp = dest.with_name(dest.name + ".partial")
        tmp.unlink(missing_ok=True)
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            out = sqlite3.connect(tmp)
            try:
                src.backup(out)  # one step: one consistent snapshot
                ok = out.execute("PRAGMA integrity_check").fetchone()[0]
                events = out.execute("SELECT count(*) FROM node_events").fetchone()[0]
            finally:
                out.close()
        finally:
            src.close()
        if ok != "ok":
            tmp.unlink(missing_ok=True)
            raise InventoryUnavailable(f"backup of {path.absolute()} failed its integrity "
                                       f"check: {ok}")
        os.replace(tmp, dest)
        return (f"backed up {path.absolute()} to {dest.absolute()} "
                f"({dest.stat().st_size} bytes, {events} node events; SQLite online backup)")
    return _pg_dump(url, dest)


def _pg_dump(url: str, dest: Path) -> str:
    import shutil
    import subprocess

    from sqlalchemy.engine import make_url

    u = make_url(url)
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise InventoryUnavailable(
            f"{describe(url)} is PostgreSQL: back it up with pg_dump "
            f"(pg_dump --format=custom --file {dest} ...); pg_dump is not installed here")
    env = dict(os.environ)
    if u.password:
        env["PGPASSWORD"] = str(u.password)
    args = [pg_dump, "--format=custom", f"--file={dest}", "--no-password"]
    for opt, value in (("--host", u.host), ("--port", u.port), ("--username", u.username)):
        if value:
            args.append(f"{opt}={value}")
    args.append(u.database or "")
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise InventoryUnavailable(f"pg_dump of {describe(url)} failed: "
                                   f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return (f"backed up {describe(url)} to {dest.absolute()} ({dest.stat().st_size} bytes; "
            "pg_dump custom format, restore with pg_restore)")

"""Two `bootherd serve` processes on one PostgreSQL serve one testbed.

- a storm through both (the relay sends every DHCP request to each) boots every node,
  with one lease row per node at its inventory address and no address twice;
- an inventory change made through one database reaches both servers within a second;
- `bootherd status` lists both servers, their roles, alive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from multi_helpers import assert_booted_and_unique, db_check, deploy, storm

from bootherd.inventory.db import make_engine
from bootherd.inventory.ops import servers as server_rows

pytestmark = pytest.mark.postgres

NODES = int(os.environ.get("BOOTHERD_MULTI_NODES", "2000"))
NET = 71


@pytest.fixture(scope="module")
def two(tmp_path_factory, module_pg_url):  # noqa: ANN001, ANN201
    dep = deploy(tmp_path_factory.mktemp("multi"), module_pg_url, 2, NODES, NET)
    try:
        dep.start(0)
        dep.start(1)
        yield dep
    finally:
        dep.stop()


def test_two_servers_storm_no_failures_no_duplicates(two):  # noqa: ANN001
    raw, summary, started = storm(two, NODES, NET, timeout=240.0, spread=2.0)
    db = db_check(two.pg_url, [n["node"] for n in raw["nodes"]], started)
    assert_booted_and_unique(summary, raw, db, NODES)
    # Both servers did the work: leases and nodes followed both.
    by_server = {r["server"] for r in db["leases"]}
    assert by_server == {"srv0", "srv1"}, by_server
    used = {i for n in raw["nodes"] for i in n["servers_used"]}
    assert used == {0, 1}
    for i in (0, 1):
        assert "Traceback" not in two.log(i)


def test_live_change_reaches_both_servers_within_a_second(two):  # noqa: ANN001
    """An operator's change (one UPDATE) is served by both servers within 1 s."""
    from sqlalchemy import update

    from bootherd.inventory import schema as s

    engine = make_engine(two.pg_url)
    node = "pc" + str(NODES + 5)
    with engine.begin() as conn:
        conn.execute(update(s.nodes).where(s.nodes.c.node_id == node)
                     .values(boot_cmdline="multi-change-1"))
    t0 = time.monotonic()
    seen: dict[int, float] = {}
    while len(seen) < 2 and time.monotonic() - t0 < 5:
        for i, host in enumerate(two.hosts):
            if i in seen:
                continue
            # The generation every server reports in /metrics follows the database.
            with urllib.request.urlopen(f"http://{host}:{two.ports['http']}/metrics",
                                        timeout=2) as r:
                text = r.read().decode()
            gen = [ln for ln in text.splitlines() if ln.startswith("bootherd_inventory_snapshot_generation ")]
            with engine.connect() as conn:
                want = conn.execute(__import__("sqlalchemy").select(s.generation.c.value)).scalar()
            if gen and float(gen[0].split()[-1]) >= want:
                seen[i] = time.monotonic() - t0
        time.sleep(0.02)
    engine.dispose()
    assert len(seen) == 2, seen
    assert max(seen.values()) < 1.0, seen


def test_status_shows_both_servers(two):  # noqa: ANN001
    engine = make_engine(two.pg_url)
    rows = {r["name"]: r for r in server_rows(engine)}
    engine.dispose()
    assert {"srv0", "srv1"} <= set(rows)
    r = subprocess.run([sys.executable, "-m", "bootherd.cli", "status", "--db", two.pg_url,
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    listed = data["servers"] if isinstance(data, dict) else data
    mine = {x["name"]: x for x in listed if x["name"] in ("srv0", "srv1")}
    assert set(mine) == {"srv0", "srv1"}
    for name, x in mine.items():
        assert x["alive"] == "yes", x
        assert set(x["roles"].split(",")) == {"dhcp", "tftp", "bootinfo", "tmcd", "http", "imaging"}
        assert x["address"] == two.hosts[int(name[-1])]

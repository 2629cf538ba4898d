"""Live changes: a change made by another process reaches a running server's
snapshot without a restart (SQLite generation polling, PostgreSQL NOTIFY)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed


async def wait_for(pred, timeout: float = 15.0) -> float:  # noqa: ANN001
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_change_from_another_process_reaches_the_snapshot(engine, db_url):
    import_testbed(engine, generate(40, subnet="127.41.0.0/24"))
    live = LiveInventory(engine, poll_interval=0.2)
    await live.start()
    try:
        seen = []
        live.on_change(lambda old, new: seen.append((old.generation, new.generation)))
        node = next(n for n in live.snapshot.nodes.values() if n.allocation is None)
        assert node.next_os is None
        # Another process, as an operator's CLI call would be.
        subprocess.run([sys.executable, "-m", "bootherd.cli", "node", "set", node.node_id,
                        "next_os=FRISBEE-MFS", "--db", db_url], check=True, capture_output=True)
        await wait_for(lambda: live.snapshot.nodes[node.node_id].next_os == "FRISBEE-MFS")
        assert seen and seen[-1][1] > seen[-1][0]
    finally:
        await live.stop()


async def test_record_state_is_durable_and_visible(engine):
    from bootherd.inventory import ops

    import_testbed(engine, generate(5))
    live = LiveInventory(engine, poll_interval=0.2, write_batch_interval=0.01)
    await live.start()
    try:
        for st in ("PXEBOOTING", "BOOTING", "TBSETUP", "ISUP"):
            live.record_state("pc2", st, "test")
        assert live.state_of("pc2")[0] == "ISUP"
        assert await asyncio.to_thread(live.writer.flush)
        assert [e["state"] for e in ops.node_events(engine, "pc2")] == \
            ["PXEBOOTING", "BOOTING", "TBSETUP", "ISUP"]
    finally:
        await live.stop()
    # A new process starts with the states the last one recorded.
    again = LiveInventory(engine)
    assert again.state_of("pc2")[0] == "ISUP"
    again.writer.close()


def test_ten_thousand_node_testbed_round_trips(sqlite_engine):
    from bootherd.inventory.testbed import export_testbed

    text = generate(10_000, subnet="10.64.0.0/16")
    assert import_testbed(sqlite_engine, text)["nodes"] == 10_000
    assert export_testbed(sqlite_engine) == text


def test_lifecycle_rows_and_state_servers_in_batches(engine):
    """The writer's `lifecycle` jobs: columns of one node from several jobs merge, other
    columns are kept, a batch of thousands of rows goes in bounded statements; each
    state names the server that recorded it."""
    from sqlalchemy import select

    from bootherd.inventory import schema as s
    from bootherd.inventory.live import LifecycleRow, StateEvent, Writer
    from bootherd.lifecycle import store

    w = Writer(engine, interval=0.01)
    try:
        w.lifecycle(LifecycleRow("pc1", {"wait_via": "bootinfo", "wait_server": "A",
                                         "wait_ts": 1.0}, 1.0))
        assert w.flush()
        n = 6000  # more rows than one statement takes
        for i in range(n):
            w.lifecycle(LifecycleRow(f"n{i}", {"order_kind": "AUTO", "order_resends": 0,
                                               "order_server": "A", "order_ts": 2.0,
                                               "wait_via": ""}, 2.0))
        w.lifecycle(LifecycleRow("pc1", {"config_digest": "d1"}, 3.0))
        w.lifecycle(LifecycleRow("pc1", {"config_digest": "d2"}, 4.0))
        w.event(StateEvent("pc1", "BOOTING", "bootinfo", 5.0, "", "A"))
        assert w.flush()
        assert w.stats.errors == 0
    finally:
        w.close()
    rows = {r["node_id"]: r for r in store.load(engine)}
    assert len(rows) == n + 1
    pc1 = rows["pc1"]
    assert (pc1["wait_via"], pc1["wait_server"], pc1["config_digest"], pc1["updated"]) == \
        ("bootinfo", "A", "d2", 4.0)
    assert rows["n5999"]["order_kind"] == "AUTO"
    with engine.connect() as c:
        assert c.execute(select(s.node_states.c.server)
                         .where(s.node_states.c.node_id == "pc1")).scalar() == "A"



def test_a_batch_keeps_each_nodes_newest_state_whatever_the_queue_order(engine):
    """An event queued after a newer one (a decision stamped before it waited for the
    database) is history, not the node's state: node_states keeps the newest."""
    from sqlalchemy import select

    from bootherd.inventory import schema as s
    from bootherd.inventory.live import StateEvent, Writer

    w = Writer(engine, interval=0.2)  # both events in one batch
    try:
        w.event(StateEvent("pc1", "ISUP", "tmcd", 6.0, "", "A"))
        w.event(StateEvent("pc1", "PXEWAKEUP", "bootinfo", 5.0, "", "A"))
        assert w.flush()
    finally:
        w.close()
    with engine.connect() as c:
        row = c.execute(select(s.node_states.c.state, s.node_states.c.since)
                        .where(s.node_states.c.node_id == "pc1")).one()
        events = c.execute(select(s.node_events.c.state)
                           .where(s.node_events.c.node_id == "pc1")).scalars().all()
    assert tuple(row) == ("ISUP", 6.0)
    assert sorted(events) == ["ISUP", "PXEWAKEUP"]

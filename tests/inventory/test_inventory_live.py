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

"""Reload on free with a running server: a node freed from its experiment through
the admin API (`POST /api/nodes/ID/free`) or the CLI (`bootherd experiment free`)
enters the reload cycle when imaging.reload_on_free asks for it, and not otherwise.
(The rules themselves: test_reload.py.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import select

from bootherd.config import build
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.metrics import Metrics
from bootherd.service import Context, wire
from bootherd.states import State

SUBNET = "127.69.0.0/24"


def events(engine, node_id: str) -> list[tuple[str, str, str]]:  # noqa: ANN001
    with engine.connect() as c:
        rows = c.execute(select(s.node_events.c.state, s.node_events.c.source,
                                s.node_events.c.detail)
                         .where(s.node_events.c.node_id == node_id)
                         .order_by(s.node_events.c.id)).all()
    return [tuple(r) for r in rows]


async def until(check, what: str, seconds: float = 10.0) -> None:  # noqa: ANN001
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds:g} s: {what}")


@pytest.mark.parametrize("on", [True, False], ids=["reload_on_free", "off"])
async def test_freeing_a_node_reloads_it_only_when_the_config_asks(tmp_path: Path, on: bool):
    db = tmp_path / "i.db"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    import_testbed(engine, generate(6, subnet=SUBNET))
    (tmp_path / "www").mkdir()
    settings = {"http": {"port": 0, "root": str(tmp_path / "www"),
                         "admin_token_file": str(tmp_path / "admin-token")},
                "database": {"url": f"sqlite:///{db}"},
                "imaging": {"mfs_kernel": "mfs/vmlinuz", "reload_on_free": on,
                            "free_image": "clean"}}
    cfg = build(settings, base_dir=tmp_path)
    conf = tmp_path / "bootherd.toml"
    conf.write_text(f'[database]\nurl = "sqlite:///{db}"\n')
    live = LiveInventory(engine, poll_interval=0.05, write_batch_interval=0.01,
                         server_name="me")
    await live.start()
    w = wire(Context(cfg, live, Metrics(), server_name="me"), ["http"])
    await w.start()
    try:
        snap = live.snapshot
        by_api, by_cli = sorted(n for n, node in snap.nodes.items()
                                if node.allocation is not None)[:2]
        exp = {n: f"{snap.nodes[n].allocation.pid}/{snap.nodes[n].allocation.eid}"
               for n in (by_api, by_cli)}
        http = w["http"]
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {http.app['admin_token']}"}) as sess, \
                sess.post(f"http://127.0.0.1:{http.port}/api/nodes/{by_api}/free") as r:
            assert r.status == 200, await r.text()
        cli = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bootherd.cli", "experiment", "free",
                             "-c", str(conf), by_cli], capture_output=True, text=True)
        assert cli.returncode == 0, cli.stderr
        await until(lambda: all(live.snapshot.nodes[n].allocation is None
                                for n in (by_api, by_cli)), "the frees in the snapshot")
        core = w.lifecycle.core
        if not on:
            await asyncio.sleep(0.3)  # time for a (wrong) reload to be decided
            for nid in (by_api, by_cli):
                assert live.state_of(nid) is None or live.state_of(nid)[0] != State.RELOADSETUP
                assert nid not in core.life or not core.life[nid].reload
            assert not w.ctx.metrics.protocol("lifecycle").get("reloads_on_free")
            return
        for nid in (by_api, by_cli):
            await until(lambda nid=nid: (live.state_of(nid) or ("",))[0] == State.RELOADSETUP,
                        f"{nid} in RELOADSETUP")
            assert core.life[nid].reload == "clean"
            want = (State.RELOADSETUP, "free", f"clean (freed from {exp[nid]})")
            await until(lambda nid=nid, want=want: want in events(engine, nid),
                        f"{nid}'s RELOADSETUP event in the database")
        assert w.ctx.metrics.protocol("lifecycle")["reloads_on_free"] == 2
        # Its next boot question is the imaging MFS, as after `node reload`.
        mac = live.snapshot.nodes[by_api].interfaces[0].mac.replace(":", "-")
        async with aiohttp.ClientSession() as sess, \
                sess.get(f"http://127.0.0.1:{http.port}/ipxe?mac={mac}") as r:
            script = await r.text()
        assert "mfs/vmlinuz" in script and "bootherd.image=clean" in script, script
    finally:
        await w.stop()
        await live.stop()
        engine.dispose()

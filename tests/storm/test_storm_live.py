"""Boot storms against a live `bootherd serve` (subprocess, all services present).

200 nodes of a generated testbed on 127.x, optimized profile: every node
reaches ISUP with zero failures and the inventory holds ISUP for each; the
same storm with 5% injected loss still boots every node, with retries counted.
Phases whose server is not in this build are left out (and named in the skip
reason of `test_storm_all_phases_present`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from storm_server import storm_server

from bootherd.config import SCHEMA, load
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine
from bootherd.inventory.snapshot import load as load_snapshot
from bootherd.service import available
from bootherd.storm import report, runner

NODES = 200
SUBNET = "127.91.0.0/16"
RELAY = "127.92.0.1"
PHASE_OF_SERVICE = {"dhcp": "dhcp", "tftp": "tftp", "bootinfo": "loader", "tmcd": "os",
                    "http": "files"}


def _has_relay_key() -> bool:
    return any(k.name == "relay_port" for k in SCHEMA["dhcp"][1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # noqa: ANN001, ANN201
    work = tmp_path_factory.mktemp("storm")
    with storm_server(work, NODES + 20, SUBNET, 3, None if _has_relay_key() else "",
                      '[states]\npxewakeup_timeout = 3.0\n') as (cfg_path, ports, proc):
        cwd = os.getcwd()
        os.chdir(work)  # config paths are relative to the cwd
        try:
            cfg = load(cfg_path)
        finally:
            os.chdir(cwd)
        yield {"work": work, "cfg": cfg, "ports": ports, "proc": proc}


def _phases() -> tuple[str, ...]:
    have = set(available())
    return tuple(PHASE_OF_SERVICE[sv] for sv in ("dhcp", "tftp", "bootinfo", "tmcd", "http")
                 if sv in have)


def _storm(server: dict, loss: float) -> tuple[dict, dict, float]:
    cfg = server["cfg"]
    snap = load_snapshot(make_engine(cfg.database_url))
    relay_port = server["ports"]["relay"] if _has_relay_key() else 67
    st = runner.Settings(nodes=NODES, profile="optimized", start_spread=1.0, loss=loss,
                         phases=_phases(), relay_address=RELAY, relay_port=relay_port, seed=5,
                         timeout=100.0, wait_timeout=60.0, tarball_bytes=256 * 1024,
                         rpm_bytes=64 * 1024)
    started = time.time()
    raw = runner.run(cfg, snap, st)
    return raw, report.summarize(raw), started


def _states(server: dict, node_ids: list[str], since: float, timeout: float = 10.0) -> dict:
    engine = make_engine(server["cfg"].database_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with engine.connect() as conn:
                rows = {r.node_id: (r.state, r.since) for r in conn.execute(
                    select(s.node_states).where(s.node_states.c.node_id.in_(node_ids)))}
            done = all(rows.get(n, ("", 0))[0] == "ISUP" and rows[n][1] >= since for n in node_ids)
            if done or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)
    finally:
        engine.dispose()


def _check_all_booted(server: dict, raw: dict, summary: dict, started: float) -> None:
    assert summary["nodes"] == NODES
    assert summary["failed"] == 0, summary["failure_reasons"]
    assert summary["reached_isup"] == NODES
    if "os" in _phases():
        ids = [n["node"] for n in raw["nodes"]]
        rows = _states(server, ids, started)
        not_up = {n: rows.get(n) for n in ids if rows.get(n, ("",))[0] != "ISUP"}
        assert not not_up, f"{len(not_up)} nodes not ISUP in node_states: {list(not_up.items())[:5]}"
        assert all(rows[n][1] >= started for n in ids)


def test_storm_200_nodes_all_reach_isup(server):  # noqa: ANN001
    raw, summary, started = _storm(server, 0.0)
    _check_all_booted(server, raw, summary, started)
    assert summary["retries"]["total"] == 0  # nothing lost on loopback at 200 nodes
    reqs = summary["requests"]
    if "os" in _phases():
        assert reqs["tmcd"] == 4 * NODES  # status, fullconfig, state TBSETUP, state ISUP
    if "dhcp" in _phases():
        assert reqs["dhcp"] >= 6 * NODES  # three DISCOVER/REQUEST exchanges per node
    # The simulator's loop-lag probe sampled the whole storm: every sample plus its sleep
    # fits in the storm's time, and there were many.
    lag = summary["timer_lag"]
    assert lag["count"] > 50
    assert 0 <= lag["p50"] <= lag["max"] < summary["wall_time"] + 1
    covered = lag["count"] * runner.LAG_PROBE_INTERVAL + sum(raw["timer_lag"])
    assert covered <= (raw["finished"] - raw["started"]) + 1


def test_storm_200_nodes_with_5_percent_loss(server):  # noqa: ANN001
    raw, summary, started = _storm(server, 0.05)
    _check_all_booted(server, raw, summary, started)
    assert summary["retries"]["total"] > 0
    # Each retry is named by its phase and exchange; they add up to the phases' counts.
    by = summary["retries_by_protocol"]
    for phase, n in summary["retries"].items():
        if phase != "total":
            assert sum(v for k, v in by.items() if k.split("/")[0] == phase) == n, (phase, by)
    dropped = summary["dropped_datagrams"]
    assert dropped["sent"] + dropped["received"] > 0


def test_storm_all_phases_present() -> None:
    missing = [sv for sv in PHASE_OF_SERVICE if sv not in available()]
    if missing:
        pytest.skip(f"services not in this build, their phases were left out: {missing}")


def test_storm_cli_json_and_plot(server, tmp_path):  # noqa: ANN001
    """The demo's invocation: `bootherd storm --nodes N -c CONFIG --plot F --json F`."""
    work: Path = server["work"]
    relay = ["--relay-port", str(server["ports"]["relay"])] if _has_relay_key() else []
    phases = ",".join({"dhcp": "dhcp", "tftp": "tftp", "loader": "bootinfo", "os": "tmcd",
                       "files": "http"}[p] for p in _phases())
    r = subprocess.run([sys.executable, "-m", "bootherd.cli", "storm", "--nodes", "30",
                        "-c", "bootherd.toml", "--relay-address", "127.92.0.2", *relay,
                        "--phases", phases, "--rpm-bytes", "1000", "--tarball-bytes", "1000",
                        "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")],
                       cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "30/30 nodes" in r.stdout
    import json

    data = json.loads((tmp_path / "s.json").read_text())
    assert data["summary"]["reached_isup"] == 30
    assert set(data["timeline"]["series"]) >= {"off", "up"}
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_storm_prepare_only_lays_out_the_files_and_boots_nothing(server, tmp_path):  # noqa: ANN001
    """`--prepare-only`: the loaders, tarballs and RPMs the nodes would fetch are created
    in the server's roots (here fresh ones), and no node is played."""
    work: Path = server["work"]
    www, tftp = tmp_path / "www", tmp_path / "tftp"
    www.mkdir()
    tftp.mkdir()
    r = subprocess.run([sys.executable, "-m", "bootherd.cli", "storm", "--prepare-only",
                        "--nodes", "30", "-c", "bootherd.toml", f"--set=http.root={www}",
                        f"--set=tftp.root={tftp}", "--phases", "dhcp,tftp,bootinfo,tmcd,http",
                        "--tarball-bytes", "1000"],
                       cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    made = [p for p in (*www.rglob("*"), *tftp.rglob("*")) if p.is_file()]
    assert made and f"{len(made)} files created" in r.stdout
    assert any(p.suffix == ".gz" and p.stat().st_size == 1000 for p in made)  # a tarball
    assert any(p.is_relative_to(tftp) for p in made)  # a loader
    assert "nodes" not in r.stdout.replace("files created", "")

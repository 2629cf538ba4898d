"""Multicast imaging end to end, in network namespaces: `bootherd serve` sending, real
receivers (`bootherd image receive`, and the static C client) writing disks."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootherd.dhcp.netns import usable

from .disks import make_disk
from .lab import Lab, cli, result, sha256

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    why = usable()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("imaging")
    lab = Lab(tmp, rate_mbps=200.0)
    try:
        disk = make_disk(tmp, size_mib=32, part_mib=24, files_mib=12)
        cli("image", "create", str(disk), "-o", "deb", "-c", str(lab.conf), "-q", cwd=tmp)
        lab.disk = disk
        lab.image_sha = json.loads(cli("image", "show", "deb", "-c", str(lab.conf),
                                       cwd=tmp).stdout)["sha256"]
        lab.start()
        yield lab
    finally:
        lab.close()


def test_receivers_with_loss_late_joiner_and_a_dead_one(lab: Lab) -> None:
    t = lab.tmp
    lossy = [lab.add_receiver_ns(loss=0.05) for _ in range(2)]
    tx0 = lab.tx_bytes()
    procs = {"clean": lab.receive(lab.net.client, "deb", t / "clean.raw")}
    for i, ns in enumerate(lossy):
        procs[f"lossy{i}"] = lab.receive(ns, "deb", t / f"lossy{i}.raw")
    procs["dead"] = lab.receive(lab.net.client, "deb", t / "dead.raw", "--drop", "0.5")
    time.sleep(1.0)
    lab.net.kill(procs.pop("dead"), signal.SIGKILL)  # dies mid-session, holding chunks
    procs["late"] = lab.receive(lab.net.client, "deb", t / "late.raw", "--drop", "0.05")
    results = {k: result(p, t / f"{k}.raw") for k, p in procs.items()}
    for k, r in results.items():
        assert r["exit"] == 0 and r["ok"], (k, r)
        assert r["via"] == "multicast", (k, r)
        assert sha256(t / f"{k}.raw") == lab.image_sha, k
    assert results["lossy0"]["useful"] > 0 and results["late"]["duplicates"] >= 0
    image_bytes = (t / "images" / "deb.bhimg").stat().st_size
    sent = lab.tx_bytes() - tx0
    # One session served all of them: the late joiner costs a second pass at most.
    assert sent < 2.5 * image_bytes, (sent, image_bytes)
    sessions = lab.api("/api/imaging/sessions")
    assert any(e["image"] == "deb" for e in sessions["ended"]) or sessions["sessions"]

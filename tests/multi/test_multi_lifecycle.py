"""Two `bootherd serve` processes on one PostgreSQL, and the node lifecycle between them.

- a node booting through server B is never timed out, woken or marked failed by
  server A's watcher (A has short timeouts, B long ones), while A's watcher does act
  on the nodes that are its own (the controls, so the test cannot pass by a watcher
  that does nothing);
- a restarted server still flags `UPDATE=1` (isalive) for a configuration change made
  while it was down, and `UPDATE=0` for a node whose configuration did not change;
- with imaging.reload_on_free on both, each freed node is reloaded once: by the server
  that handled its last boot contact, or, for a node that never booted, by its heir.

The nodes are played by sockets on their control addresses: a bootinfo loader that
keeps listening for orders, and TMCD requests from the node's address.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from multi_helpers import deploy
from sqlalchemy import func, select, update

from bootherd.bootinfo import codec
from bootherd.bootinfo.codec import Opcode
from bootherd.boottype import BootType
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine
from bootherd.inventory.ops import allocate, free
from bootherd.inventory.snapshot import load as load_snapshot
from bootherd.lifecycle.core import heir
from bootherd.lifecycle.ladder import SOURCE as LADDER

pytestmark = pytest.mark.postgres

NET = 81
WATCHFUL = ("pxewakeup_timeout = 1.5\npxewakeup_retries = 1\nbooting_timeout = 2.5\n"
            "check_interval = 0.2\n")
PATIENT = "pxewakeup_timeout = 600.0\nbooting_timeout = 600.0\ncheck_interval = 0.2\n"


class Loader:
    """A node's bootinfo loader: asks a server, and keeps every datagram sent to it."""

    def __init__(self, ip: str, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, port))
        self.received: list[tuple[codec.Packet, str]] = []

    def ask(self, server: tuple[str, int]) -> codec.BootWhat:
        self.sock.sendto(codec.request(), server)
        self.sock.settimeout(5)
        while True:
            data, src = self.sock.recvfrom(2048)
            pkt = codec.decode(data)
            if pkt.opcode == Opcode.REPLY:
                return pkt.boot_what()
            self.received.append((pkt, src[0]))

    def orders(self, wait: float = 0.0) -> list[tuple[BootType, str]]:
        """(kind, server address) of the orders received so far."""
        self.sock.settimeout(0.05)
        deadline = time.monotonic() + wait
        while True:
            try:
                data, src = self.sock.recvfrom(2048)
                self.received.append((codec.decode(data), src[0]))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    break
        return [(p.boot_what().type, ip) for p, ip in self.received if p.opcode == Opcode.ORDER]

    def close(self) -> None:
        self.sock.close()


def tmcd(node_ip: str, server: tuple[str, int], line: str) -> str:
    with socket.create_connection(server, timeout=5, source_address=(node_ip, 0)) as c:
        c.sendall(line.encode() + b"\n")
        out = b""
        while chunk := c.recv(65536):
            out += chunk
    return out.decode()


def api_wake(dep, i: int, node_id: str) -> None:  # noqa: ANN001
    token = (Path(dep.configs[i].parent) / "admin-token").read_text().strip()
    req = urllib.request.Request(
        f"http://{dep.hosts[i]}:{dep.ports['http']}/api/nodes/{node_id}/wake", method="POST",
        headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 202, json.loads(r.read())


def events(engine, node_id: str) -> list[tuple[str, str, str]]:  # noqa: ANN001
    e = s.node_events
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(select(e.c.state, e.c.source, e.c.detail)
                                            .where(e.c.node_id == node_id).order_by(e.c.id))]


def _set_timeouts(dep, i: int, text: str) -> None:  # noqa: ANN001
    cfg = dep.configs[i]
    cfg.write_text(cfg.read_text().replace("pxewakeup_timeout = 3.0\n", text))


@pytest.fixture
def two(tmp_path, pg_url):  # noqa: ANN001, ANN201
    dep = deploy(tmp_path, pg_url, 2, 10, NET)
    _set_timeouts(dep, 0, WATCHFUL)  # A
    _set_timeouts(dep, 1, PATIENT)   # B
    try:
        dep.start(0)
        dep.start(1)
        yield dep
    finally:
        dep.stop()


def test_a_node_booting_through_b_is_left_alone_by_a(two) -> None:  # noqa: ANN001
    dep = two
    engine = make_engine(dep.pg_url)
    snap = load_snapshot(engine)
    nodes = sorted(snap.nodes.values(), key=lambda n: n.node_id)
    booted = [n for n in nodes if n.allocation is not None and n.control_ip]
    free = [n for n in nodes if n.allocation is None and n.control_ip]
    x, y, v, u = booted[:4]   # x, v boot through B; y, u are A's own (the controls)
    w = free[0]               # told WAIT by both, last by B
    a = (dep.hosts[0], dep.ports["bootinfo"])
    b = (dep.hosts[1], dep.ports["bootinfo"])
    loaders = {n.node_id: Loader(n.control_ip, dep.ports["client"]) for n in (x, y, v, u, w)}
    try:
        # x: answered by A, then (rebooted, its ROM chose the other server) by B, and
        # reports TBSETUP to B's TMCD.
        assert loaders[x.node_id].ask(a).type is not BootType.WAIT
        assert loaders[y.node_id].ask(a).type is not BootType.WAIT
        assert loaders[w.node_id].ask(a).type is BootType.WAIT
        time.sleep(0.3)
        assert loaders[x.node_id].ask(b).type is not BootType.WAIT
        assert loaders[w.node_id].ask(b).type is BootType.WAIT
        assert tmcd(x.control_ip, (dep.hosts[1], dep.ports["tmcd"]), "state TBSETUP") == ""
        # v and u are woken through A's API; v then boots through B, u never answers.
        api_wake(dep, 0, v.node_id)
        api_wake(dep, 0, u.node_id)
        time.sleep(0.3)
        assert loaders[v.node_id].ask(b).type is not BootType.WAIT
        # w gets something to boot: whoever spoke to it last wakes it.
        time.sleep(0.5)
        allocate(engine, x.allocation.pid, x.allocation.eid, w.node_id, "late")

        time.sleep(6.0)  # A's timeouts are 1.5 s and 2.5 s; it checks every 0.2 s
        orders = {nid: ld.orders(wait=0.2) for nid, ld in loaders.items()}
    finally:
        for ld in loaders.values():
            ld.close()

    # A's own nodes: its watcher works.  The recovery ladder (the default policy) has no BMC
    # to cycle them with, so after its soft step it fails them at once.
    assert ("BOOTFAILED", LADDER) in [e[:2] for e in events(engine, y.node_id)]
    assert orders[u.node_id] == [(BootType.AUTO, dep.hosts[0])] * 2  # the order, one re-send
    assert ("PXEFAILED", LADDER) in [e[:2] for e in events(engine, u.node_id)]
    # The nodes booting through B: never timed out, re-sent to, woken or failed by A.
    for n in (x, v):
        evs = events(engine, n.node_id)
        assert not [e for e in evs if e[0] in ("BOOTFAILED", "PXEFAILED")], evs
        assert not [e for e in evs if e[2].startswith("re-sent")], evs
    assert orders[x.node_id] == []
    assert orders[v.node_id] == [(BootType.AUTO, dep.hosts[0])]  # the API's order only
    assert orders[w.node_id] == [(BootType.AUTO, dep.hosts[1])]  # woken by B, not by A
    with engine.connect() as c:
        st = dict(c.execute(select(s.node_states.c.node_id, s.node_states.c.server)
                            .where(s.node_states.c.node_id.in_([x.node_id, v.node_id]))).all())
    assert st == {x.node_id: "srv1", v.node_id: "srv1"}
    for i in (0, 1):
        assert "Traceback" not in dep.log(i)
    engine.dispose()


def test_a_restarted_server_still_flags_a_change_made_while_it_was_down(two) -> None:  # noqa: ANN001
    dep = two
    engine = make_engine(dep.pg_url)
    snap = load_snapshot(engine)
    changed, same = sorted((n for n in snap.nodes.values() if n.allocation and n.control_ip),
                           key=lambda n: n.node_id)[:2]
    a = (dep.hosts[0], dep.ports["tmcd"])
    for n in (changed, same):
        assert tmcd(n.control_ip, a, "fullconfig").startswith("*** ")
        assert tmcd(n.control_ip, a, "isalive") == "UPDATE=0\n"
    time.sleep(0.5)  # the digests reach the database in the writer's next batch
    dep.kill(0)      # SIGKILL: nothing is flushed on the way out
    with engine.begin() as c:
        c.execute(update(s.allocations).where(s.allocations.c.node_id == changed.node_id)
                  .values(startupcmd="/usr/local/bin/changed-while-down"))
    dep.start(0)
    assert tmcd(changed.control_ip, a, "isalive") == "UPDATE=1\n"
    assert tmcd(same.control_ip, a, "isalive") == "UPDATE=0\n"
    assert "changed-while-down" in tmcd(changed.control_ip, a, "fullconfig")
    assert tmcd(changed.control_ip, a, "isalive") == "UPDATE=0\n"
    engine.dispose()


RELOAD_ON_FREE = ('[imaging]\nmfs_kernel = "mfs/vmlinuz"\nreload_on_free = true\n'
                  'free_image = "clean"\n')


def test_a_freed_node_is_reloaded_once_by_one_server(tmp_path, pg_url) -> None:  # noqa: ANN001
    dep = deploy(tmp_path, pg_url, 2, 10, NET + 2)
    for cfg in dep.configs:
        cfg.write_text(cfg.read_text().replace("[imaging]\n", RELOAD_ON_FREE, 1))
    engine = make_engine(dep.pg_url)
    try:
        dep.start(0)
        dep.start(1)
        snap = load_snapshot(engine)
        allocated = sorted((n for n in snap.nodes.values() if n.allocation and n.control_ip),
                           key=lambda n: n.node_id)
        x, y, *never = allocated[:8]  # x boots through A, y through B, the others never
        assert tmcd(x.control_ip, (dep.hosts[0], dep.ports["tmcd"]), "state TBSETUP") == ""
        assert tmcd(y.control_ip, (dep.hosts[1], dep.ports["tmcd"]), "state TBSETUP") == ""
        time.sleep(0.5)  # the states reach the database in the writers' next batch
        freed = [x, y, *never]
        for n in freed:
            free(engine, n.node_id)
        ids = [n.node_id for n in freed]

        def reloads() -> dict[str, int]:
            ev = s.node_events
            with engine.connect() as c:
                return dict(c.execute(select(ev.c.node_id, func.count())
                                      .where(ev.c.node_id.in_(ids), ev.c.state == "RELOADSETUP",
                                             ev.c.source == "free")
                                      .group_by(ev.c.node_id)).all())

        deadline = time.monotonic() + 15
        while len(reloads()) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # both servers polled the frees: a second reload would be in by now
        assert reloads() == dict.fromkeys(ids, 1)
        with engine.connect() as c:
            by = dict(c.execute(select(s.node_states.c.node_id, s.node_states.c.server)
                                .where(s.node_states.c.node_id.in_(ids))).all())
        want = {x.node_id: "srv0", y.node_id: "srv1",
                **{n.node_id: heir(["srv0", "srv1"], n.node_id) for n in never}}
        assert by == want
        for i in (0, 1):
            assert "Traceback" not in dep.log(i)
    finally:
        dep.stop()
        engine.dispose()

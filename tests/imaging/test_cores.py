"""The imaging protocol cores, server and receivers together in memory with a fake clock
(tests/imaging/sim.py): loss, late joiners, dead receivers, forged datagrams, a damaged
image, a restarted server, the HTTP fallback."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bootherd.imaging import format as fmt
from bootherd.imaging import wire

from .sim import FileSource, Net, make_image


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("img"), 6 << 20)


def _raw(image: Path) -> bytes:
    return (image.parent / "disk1.raw").read_bytes()


def _check(net: Net, nodes) -> None:  # noqa: ANN001
    h = net.source.header
    for n in nodes:
        assert n.finished is not None and n.finished.ok, n.finished
        assert hashlib.sha256(n.disk).digest() == h.image_sha256


ADDR = ("10.0.0.9", 1)


def _one_session(image: Path, **server_kw):  # noqa: ANN202
    """A server core with one receiver joined: (server, session, a chunk with data)."""
    from bootherd.imaging import sessions as sv

    srv = sv.Server(group="239.1.1.1", ports=range(5000, 5001), **server_kw)
    [op] = srv.datagram(0.0, ADDR, wire.encode(wire.Join(7, 1, "img")))
    [joined] = srv.opened(0.0, op.image, FileSource(image))
    s = srv.sessions[wire.decode(joined.packets[0]).session]
    return srv, s, next(ch.index for ch in s.header.chunks if ch.stored_len)


def test_one_pass_serves_everyone_at_the_cost_of_one(image: Path) -> None:
    net = Net(image)
    nodes = [net.add() for _ in range(8)]
    net.run()
    _check(net, nodes)
    h = net.source.header
    sent = net.server.counters["data_bytes"]
    # payload + 20-byte headers + 3 % proactive repair, once for all eight
    assert h.data_size < sent < 1.08 * h.data_size
    assert net.opens == 1 and net.server.counters["sessions_started"] == 1
    assert [e.reason for e in net.ended] == ["last receiver left"]


def test_loss_at_each_receiver_is_repaired_for_all_at_once(image: Path) -> None:
    net = Net(image)
    nodes = [net.add(loss=0.05) for _ in range(10)]
    net.run()
    _check(net, nodes)
    sent = net.server.counters["data_bytes"]
    assert sent < 1.2 * net.source.header.data_size  # repairs shared, not per receiver
    assert net.server.counters["repair_packets"] > 0


def test_heavy_loss_still_completes_over_multicast(image: Path) -> None:
    # Losing the last datagrams of a repair burst must not look like "still coming":
    # the receiver's next request is answered (it used to wait for them forever).
    net = Net(image, seed=11)
    nodes = [net.add(loss=0.25) for _ in range(3)]
    net.run()
    _check(net, nodes)
    assert all(n.rx.via == "multicast" for n in nodes)


def test_many_receivers_at_one_percent_stay_near_one_image(image: Path) -> None:
    net = Net(image)
    nodes = [net.add(loss=0.01) for _ in range(40)]
    net.run()
    _check(net, nodes)
    assert net.server.counters["data_bytes"] < 1.1 * net.source.header.data_size


def test_late_joiner_catches_up_from_the_next_pass(image: Path) -> None:
    net = Net(image, rate=20e6)
    first = net.add()
    while first.rx.done < 3:
        net.run(until=net.now + 0.01)
    late = net.add(loss=0.02)
    net.run()
    _check(net, [first, late])
    assert net.opens == 1  # joined the running session
    assert late.rx.stats.useful > 0


def test_a_receiver_that_dies_does_not_stall_the_others(image: Path) -> None:
    net = Net(image, rate=20e6, receiver_timeout=1.0, idle_timeout=2.0)
    dead = net.add(loss=0.3)  # asks for a lot, then goes silent
    alive = [net.add(loss=0.02) for _ in range(3)]
    net.run(until=0.05)
    dead.alive = False
    net.run()
    _check(net, alive)
    net.run(until=net.now + 5, all_of_it=True)  # the dead one expires, the session ends
    assert net.server.counters["receivers_expired"] == 1
    assert not net.server.sessions


def test_forged_datagrams_are_caught_by_the_digest_never_written(image: Path) -> None:
    net = Net(image)
    victim = net.add()
    victim.tamper = 8
    net.run()
    _check(net, [victim])
    assert victim.rx.stats.bad_chunks > 0  # dropped whole and asked for again
    raw = _raw(image)
    h = net.source.header
    for off in victim.writes:  # every write was the true data of its chunk
        c = h.chunks[off // h.chunk_size]
        assert bytes(victim.disk[off:off + c.raw_len]) == raw[off:off + c.raw_len]


def test_a_damaged_image_is_refused_to_receivers(image: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.bhimg"
    data = bytearray(image.read_bytes())
    h = fmt.read_header(image)
    c = next(c for c in h.chunks if c.stored_len)
    data[c.offset + 5] ^= 0xFF
    bad.write_bytes(bytes(data))
    net = Net(bad)
    n = net.add()
    net.run()
    assert n.finished is not None and not n.finished.ok
    assert "damaged" in n.finished.message
    assert net.server.counters["damaged_chunks"] == 1
    assert not any(n.disk)  # nothing written


def test_a_restarted_server_is_joined_again(image: Path) -> None:
    net = Net(image, rate=10e6)
    n = net.add()
    while n.rx.done < 2:
        net.run(until=net.now + 0.01)
    old = net.server
    net.server = type(old)(group="239.1.1.1", ports=range(5000, 5004), rate=10e6)
    n.listening = False
    net.run()
    _check(net, [n])
    assert net.server.counters["unknown_session"] >= 1
    assert n.rx.via == "multicast"


def test_no_multicast_falls_back_to_http(image: Path) -> None:
    net = Net(image)
    net.block_multicast = True  # JOINED arrives, DATA never does
    n = net.add()
    net.run()
    _check(net, [n])
    assert n.rx.via == "http" and n.rx.stats.http_chunks > 0
    assert "no multicast data" in n.rx.fallback_reason


def test_requests_that_crossed_the_data_are_not_answered_twice(image: Path) -> None:
    srv, session, c = _one_session(image, rate=0, fec_proactive=0)
    sid, addr = session.id, ADDR
    srv.datagram(0.0, addr, wire.encode(wire.Request(sid, 1, 0, 0, ((c, 1),), ())))
    effects, _ = srv.poll(0.0)
    sent = [p for e in effects for p in e.packets]
    last_seq = wire.decode(sent[-1]).seq
    # Asked again by a receiver that had not seen the burst yet: crossed, ignored.
    srv.datagram(0.1, addr, wire.encode(wire.Request(sid, 2, 0, last_seq - 1, ((c, 1),), ())))
    assert not srv.sessions[sid].pending[c]
    # By one that saw it all and still has nothing of it: lost, queued again.
    srv.datagram(0.2, addr, wire.encode(wire.Request(sid, 2, 0, last_seq, ((c, 1),), ())))
    assert srv.sessions[sid].pending[c]
    # Repairs in flight are subtracted from what a receiver says it needs.
    srv.poll(0.3)
    seq = srv.sessions[sid].seq - 1
    srv.datagram(0.4, addr, wire.encode(wire.Request(sid, 3, 0, seq, (), ((c, 0, 3),))))
    srv.poll(0.4)
    srv.datagram(0.5, addr, wire.encode(wire.Request(sid, 4, 0, seq, (), ((c, 0, 3),))))
    assert not srv.sessions[sid].pending[c]  # the three are on their way to it too


def test_file_source_reads_what_the_index_says(image: Path) -> None:
    src = FileSource(image)
    for c in src.header.chunks:
        assert fmt.chunk_ok(c, src.read(c.index))


def _staggered(net: Net, count: int, gap: float) -> list:
    nodes = [net.add()]
    for _ in range(count - 1):
        net.run(until=net.now + gap, all_of_it=True)
        nodes.append(net.add())
    return nodes


def test_a_reload_gathers_its_receivers_so_staggered_nodes_cost_one_image(image: Path) -> None:
    # Four nodes reloaded at once boot a second apart; the session waits for all four
    # (expect, one per reload order) and sends the image once for them together.
    net = Net(image, rate=20e6)
    for _ in range(4):
        net.server.expect("img", 0.0, 30.0)
    nodes = _staggered(net, 4, 1.0)
    net.run()
    _check(net, nodes)
    assert net.opens == 1 and net.server.counters["joins_held"] > 0
    assert all(n.rx.stats.held > 0 for n in nodes[:3]) and nodes[3].rx.stats.held == 0
    assert net.server.counters["data_bytes"] < 1.08 * net.source.header.data_size
    # Without the gather each late node costs what it missed again.
    plain = Net(image, rate=20e6)
    late = _staggered(plain, 4, 0.1)
    plain.run()
    _check(plain, late)
    assert plain.server.counters["data_bytes"] > 1.15 * plain.source.header.data_size


def test_a_gather_ends_at_its_deadline_when_a_node_never_comes(image: Path) -> None:
    net = Net(image, rate=20e6)
    for _ in range(3):
        net.server.expect("img", 0.0, 4.0)
    nodes = [net.add(), net.add()]  # the third node never boots
    net.run()
    _check(net, nodes)
    assert net.now >= 4.0 and all(n.rx.stats.http_chunks == 0 for n in nodes)  # multicast
    assert "img" not in net.server.gathers


def test_a_receiver_that_cannot_keep_up_slows_the_session_instead_of_losing_data(
        image: Path) -> None:
    # A receiver that takes in 1 MB/s from an 8 MB/s session: its buffer fills, it says
    # so in its REQUESTs, the session slows to what it takes, and the image costs about
    # one image instead of repairs for everything its full buffer dropped.
    def run(adapt: bool) -> tuple[Net, list]:
        net = Net(image, rate=8e6, adapt_rate=adapt)
        nodes = [net.add(), net.add()]
        nodes[1].drain, nodes[1].buffer = 1e6, 512 << 10
        net.run(until=300)
        _check(net, nodes)
        return net, nodes

    net, nodes = run(True)
    s_bytes = net.server.counters["data_bytes"]
    assert net.server.counters["rate_decreases"] > 0
    assert s_bytes < 1.1 * net.source.header.data_size, s_bytes
    fixed, fixed_nodes = run(False)
    assert fixed.server.counters["rate_decreases"] == 0
    assert fixed_nodes[1].overflowed > 10 * max(1, nodes[1].overflowed)
    assert fixed.server.counters["data_bytes"] > 1.3 * fixed.source.header.data_size


def test_random_loss_does_not_slow_a_session(image: Path) -> None:
    # Isolated losses are the erasure code's job; only runs (full buffers) and a filling
    # buffer are strain.
    net = Net(image, rate=20e6)
    nodes = [net.add(loss=0.05) for _ in range(5)]
    net.run()
    _check(net, nodes)
    assert net.server.counters["rate_decreases"] == 0


def test_a_session_slows_once_per_overload_and_speeds_up_when_calm(image: Path) -> None:
    from bootherd.imaging import sessions as sv

    srv, s, c = _one_session(image, rate=10e6, idle_timeout=60)
    addr = ADDR

    def report(now: float, backlog: int, lost: int = 0) -> None:
        srv.datagram(now, addr, wire.encode(wire.Request(
            s.id, 1, 0, s.sent_seq, ((c, 1),), (), wire.Feedback(s.sent_seq, lost, backlog))))

    srv.poll(0.0)
    assert s.rate == pytest.approx(10e6 * sv.START)  # slow start: doubles until strain
    t = 0.0
    while s.rate < 10e6:
        t += 0.05
        srv.poll(t)
    assert t <= 3 * sv.DOUBLING + 0.05
    report(t + 0.1, 60)  # its buffer fills
    assert s.rate == pytest.approx(10e6 * sv.DECREASE)
    report(t + 0.15, 70)  # the same overload, within SLOW_HOLD: once
    assert s.rate == pytest.approx(10e6 * sv.DECREASE)
    report(t + 0.4, 65)  # full but draining: the rate holds
    assert s.rate == pytest.approx(10e6 * sv.DECREASE)
    report(t + 0.6, 0, lost=20)  # a run lost: slower again
    assert s.rate <= 10e6 * sv.DECREASE ** 2
    slowed = s.rate
    report(t + 0.9, 10, lost=20)  # calm: no new loss, buffer low
    assert s.rate == slowed
    t += 0.9
    end = t + sv.CALM + 1 / sv.INCREASE
    while t < end:
        t += 0.05
        srv.poll(t)
    assert s.rate == pytest.approx(10e6)


def test_run_loss_counts_runs_that_never_came_not_late_or_isolated_datagrams() -> None:
    from bootherd.imaging.receiver import GAP_SETTLE, RUN_LOST, RunLoss

    r = RunLoss()
    seqs = list(range(1, 100))
    seqs.remove(50)  # isolated losses: the erasure code's job
    seqs.remove(70)
    del seqs[10:30]  # arrives late, after 40..99 (reordered by the host's queues)
    seqs += list(range(11, 31))
    seqs += list(range(100 + 3 * RUN_LOST, 200))  # a run of 3 x RUN_LOST lost
    seqs += [200 + GAP_SETTLE + 10]
    for q in seqs:
        r.add(q)
    assert r.lost == 3 * RUN_LOST  # the run; the late ones came, the last gap is open


def test_min_receivers_holds_a_new_session_until_they_joined(image: Path) -> None:
    net = Net(image, rate=20e6, min_receivers=3, gather_timeout=30.0)
    nodes = _staggered(net, 3, 1.0)
    net.run()
    _check(net, nodes)
    assert net.opens == 1 and net.server.counters["joins_held"] > 0
    assert net.server.counters["data_bytes"] < 1.08 * net.source.header.data_size
    # ... at most gather_timeout when one never comes
    short = Net(image, rate=20e6, min_receivers=3, gather_timeout=2.0)
    two = [short.add(), short.add()]
    short.run()
    _check(short, two)
    assert short.now >= 2.0 and all(n.rx.stats.http_chunks == 0 for n in two)


def test_a_backlogged_receiver_is_not_sent_what_waits_in_its_buffer(image: Path) -> None:
    # Its buffer holds seconds of data: what it asks for may be queued there, unread,
    # long after its previous REQUEST.  Its feedback says so; only what it saw counts.
    def ask_twice(backlog: int) -> bool:
        srv, session, c = _one_session(image, rate=0, fec_proactive=0)
        sid, addr = session.id, ADDR
        fb = wire.Feedback(0, 0, backlog)
        srv.datagram(0.0, addr, wire.encode(wire.Request(sid, 1, 0, 0, ((c, 1),), (), fb)))
        srv.poll(0.0)  # the chunk goes out
        for t in (0.5, 1.0):  # it asks again, still having seen none of it
            srv.datagram(t, addr, wire.encode(wire.Request(sid, 1, 0, 0, ((c, 1),), (), fb)))
        return bool(srv.sessions[sid].pending[c])

    assert not ask_twice(backlog=40)  # in its buffer: not sent again
    assert ask_twice(backlog=0)  # an empty buffer and still nothing of it: lost

"""The request layer (bootherd.tftp.sessions): one test per rule, no sockets, explicit now."""

import subprocess
import sys

import pytest

from bootherd.tftp import core
from bootherd.tftp.core import End
from bootherd.tftp.sessions import (
    STALE_REQUEST_WINDOW,
    Limits,
    RequestError,
    Requests,
    State,
    busy_packet,
)

A = ("10.0.0.1", 1001)
A2 = ("10.0.0.1", 1002)  # same client IP, another TID
B = ("10.0.0.2", 2001)
C = ("10.0.0.3", 3001)


def rrq(name="f", **opts):
    return core.encode_request(core.RRQ, name, "octet", {k: str(v) for k, v in opts.items()})


def arrive(req, data, client, now=0.0):
    """A request that becomes a session, placed: (session, step)."""
    arrival = req.receive(data, client, now)
    assert arrival.session is not None and arrival.reply is None
    return arrival.session, req.place(arrival.session, now)


def run(req, session, data=b"x" * 100, now=0.0):
    """Prepare and start a read of ``data``, as the transport would."""
    xfer = req.read_transfer(session, core.BytesSource(data))
    session.state = State.RUNNING
    xfer.start(now)
    return xfer


def complete(req, session, now=1.0):
    xfer = session.xfer
    xfer.on_packet(core.encode_ack(xfer.sent), now)
    assert xfer.ok
    return req.end(session, now)


def test_core_and_request_layer_load_no_transport_and_no_c():
    code = ("import sys; from bootherd.tftp import core, sessions; "
            "print(sorted(m for m in sys.modules if m.startswith('bootherd'))); "
            "print(sorted(m for m in ('socket', '_socket', 'asyncio', 'selectors') "
            "if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()  # fmt: skip
    assert out == ["['bootherd', 'bootherd.tftp', 'bootherd.tftp.core', 'bootherd.tftp.sessions']",
                   "[]"]  # fmt: skip


# ----------------------------------------------------------------- admission


def test_admits_up_to_max_transfers_then_queues_then_refuses():
    req = Requests(Limits(max_transfers=2, max_per_client=8))
    for client in (A, B):
        s, step = arrive(req, rrq(), client)
        assert step.start == [s] and s.state is State.PREPARING
    queued, step = arrive(req, rrq(), C)
    assert step.start == [] and queued.state is State.QUEUED and req.counters.queued == 1
    # the queue holds as many as there are slots; one more is refused at once
    arrive(req, rrq(), ("10.0.0.4", 1))
    late, step = arrive(req, rrq(), ("10.0.0.5", 1))
    assert step.refused == [late] and late.state is State.ENDED
    assert req.counters.busy_rejections == 1 and req.active == 2
    assert busy_packet() == core.encode_error(0, "server busy, retry")


def test_per_client_cap_queues_only_that_client():
    req = Requests(Limits(max_transfers=10, max_per_client=1))
    first, _ = arrive(req, rrq(), A)
    second, step = arrive(req, rrq(), A2)
    assert step.start == [] and second.state is State.QUEUED
    other, step = arrive(req, rrq(), B)  # another client is not held up behind A's queue
    assert step.start == [other]
    run(req, first)
    _, step = complete(req, first)
    assert step.start == [second] and second.state is State.PREPARING


def test_a_freed_slot_goes_to_the_queue_in_order_past_capped_clients():
    req = Requests(Limits(max_transfers=2, max_per_client=1))
    a, _ = arrive(req, rrq(), A)
    b, _ = arrive(req, rrq(), B)
    a2, _ = arrive(req, rrq(), A2)  # queued: no slot
    c, _ = arrive(req, rrq(), C)  # queued behind a2
    run(req, b)
    _, step = complete(req, b)  # b's slot: a2 is still capped (a runs), c gets it
    assert step.start == [c] and a2.state is State.QUEUED
    run(req, a)
    _, step = complete(req, a)
    assert step.start == [a2]


def test_queued_request_is_refused_busy_after_queue_wait():
    req = Requests(Limits(max_transfers=1, queue_wait=1.0))
    arrive(req, rrq(), A, now=0.0)
    waiting, _ = arrive(req, rrq(), B, now=0.0)
    assert req.expire(0.9).refused == []
    step = req.expire(1.0)
    assert step.refused == [waiting] and waiting.state is State.ENDED
    assert B not in req.sessions and req.counters.busy_rejections == 1


def test_refused_request_frees_its_slot_for_the_queue():
    req = Requests(Limits(max_transfers=1))
    s, _ = arrive(req, rrq("missing"), A)
    waiting, _ = arrive(req, rrq(), B)
    reply, step = req.refuse(s, RequestError(core.ERR_NOT_FOUND, "file not found"))
    assert core.parse_packet(reply) == core.Error(1, "file not found")
    assert step.start == [waiting] and req.counters.request_errors == 1 and A not in req.sessions


# ----------------------------------------------------------------- duplicates, supersession


def test_identical_request_for_a_live_session_is_a_retransmission():
    req = Requests(Limits())
    s, _ = arrive(req, rrq(), A)
    arrival = req.receive(rrq(), A, 0.1)
    assert arrival.session is None and arrival.supersedes is None and arrival.reply is None
    assert req.counters.duplicate_requests == 1 and req.sessions[A] is s


def test_different_request_from_the_same_tid_supersedes_the_live_one():
    req = Requests(Limits())
    old, _ = arrive(req, rrq("a"), A)
    run(req, old)
    arrival = req.receive(rrq("b"), A, 0.5)
    assert arrival.supersedes is old and arrival.session.request.filename == "b"
    with pytest.raises(ValueError):  # the old one must end first
        req.place(arrival.session, 0.5)
    old.xfer.abandon(0.5, End.SUPERSEDED, "superseded by a new request")
    stats, _ = req.end(old, 0.5)
    assert stats.end is End.SUPERSEDED and not stats.ok
    assert req.place(arrival.session, 0.5).start == [arrival.session]
    assert req.counters.superseded == 1 and req.counters.transfers_failed == 1


def test_identical_request_soon_after_success_is_a_stale_copy():
    req = Requests(Limits())
    s, _ = arrive(req, rrq(), A)
    run(req, s)
    complete(req, s, now=1.0)
    assert req.receive(rrq(), A, 1.0 + STALE_REQUEST_WINDOW - 0.1).session is None
    assert req.counters.duplicate_requests == 1
    assert req.receive(rrq("other"), A, 1.5).session is not None  # a different file is served
    assert req.receive(rrq(), A, 1.0 + STALE_REQUEST_WINDOW).session is not None  # a retry


def test_identical_request_after_a_failure_is_served():
    req = Requests(Limits())
    s, _ = arrive(req, rrq(), A)
    xfer = run(req, s)
    xfer.on_packet(core.encode_error(0, "bye"), 0.5)
    req.end(s, 0.5)
    assert req.receive(rrq(), A, 0.6).session is not None


def test_expire_forgets_old_successes():
    req = Requests(Limits())
    s, _ = arrive(req, rrq(), A)
    run(req, s)
    complete(req, s, now=1.0)
    req.expire(1.0 + STALE_REQUEST_WINDOW)
    assert req._recent == {}


# ----------------------------------------------------------------- requests refused at once


@pytest.mark.parametrize(
    "data, answer, counter",
    [
        (core.encode_request(core.RRQ, "f", "mail"), core.Error(4, "unsupported mode 'mail'"),
         "request_errors"),
        (core.encode_request(core.WRQ, "f"), core.Error(2, "access violation: uploads disabled"),
         "request_errors"),
        (core.encode_ack(1), core.Error(4, "illegal TFTP operation"), None),
        (core.encode_error(0, "x"), None, None),
        (b"\x00\x09junk", None, "malformed"),
    ],
)  # fmt: skip
def test_requests_answered_without_a_session(data, answer, counter):
    req = Requests(Limits(uploads=False))
    arrival = req.receive(data, A, 0.0)
    assert arrival.session is None and req.sessions == {}
    assert (core.parse_packet(arrival.reply) if arrival.reply else None) == answer
    if counter:
        assert getattr(req.counters, counter) == 1


def test_bad_option_values_are_refused_with_error_8_and_oversized_uploads_with_3():
    req = Requests(Limits(uploads=True, max_upload=1000))
    s, _ = arrive(req, rrq(blksize=2), A)
    with pytest.raises(RequestError) as ei:
        req.read_transfer(s, core.BytesSource(b"x"))
    assert ei.value.code == core.ERR_OPTIONS
    w, _ = arrive(req, core.encode_request(core.WRQ, "up", "octet", {"tsize": "1001"}), B)
    with pytest.raises(RequestError) as ei:
        req.write_transfer(w)
    assert ei.value.code == core.ERR_DISK_FULL


# ----------------------------------------------------------------- endings and probes


def test_size_probe_aborted_after_the_oack_is_not_a_failure():
    req = Requests(Limits())
    s, _ = arrive(req, rrq(tsize=0, blksize=1468), A)
    xfer = run(req, s, b"x" * 5000)
    assert xfer.oack_pending
    xfer.on_packet(core.encode_error(8, "probe"), 0.1)
    stats, _ = req.end(s, 0.1)
    assert stats.probe and not stats.ok and stats.end is End.PEER_ERROR
    assert req.counters.probes_aborted == 1 and req.counters.transfers_failed == 0


def test_probe_superseded_by_the_real_request_is_a_probe_too():
    req = Requests(Limits())
    s, _ = arrive(req, rrq(tsize=0), A)
    run(req, s)
    s.xfer.abandon(0.1, End.SUPERSEDED, "superseded by a new request")
    stats, _ = req.end(s, 0.1)
    assert stats.probe and req.counters.probes_aborted == 1


@pytest.mark.parametrize("why", ["no tsize", "after data", "timeout"])
def test_what_is_not_a_probe(why):
    req = Requests(Limits(retries=0))
    s, _ = arrive(req, rrq() if why == "no tsize" else rrq(tsize=0), A)
    xfer = run(req, s, b"x" * 5000)
    if why == "after data":
        xfer.on_packet(core.encode_ack(0), 0.1)
    if why == "timeout":
        xfer.on_timer(10.0)
    else:
        xfer.on_packet(core.encode_error(8, "stop"), 0.2)
    stats, _ = req.end(s, 10.0)
    assert not stats.probe and req.counters.transfers_failed == 1


def test_stats_of_a_failed_read_count_acknowledged_bytes():
    req = Requests(Limits())
    s, _ = arrive(req, rrq(), A, now=0.0)
    xfer = run(req, s, b"x" * 2000, now=1.0)  # blksize 512: 4 blocks
    xfer.on_packet(core.encode_ack(1), 1.2)
    xfer.on_packet(core.encode_ack(2), 1.4)
    xfer.on_packet(core.encode_error(0, "gone"), 1.5)
    stats, _ = req.end(s, 2.0)
    assert (stats.bytes, stats.blocks, stats.duration, stats.path) == (1024, 3, 0.5, "f")
    assert stats.error == "peer error 0: gone" and req.counters.bytes_sent == 1536


def test_a_session_ended_while_prepared_reports_nothing():
    req = Requests(Limits())
    s, _ = arrive(req, rrq(), A)
    req.read_transfer(s, core.BytesSource(b"x"))  # negotiated, never started
    s.xfer.abandon(0.1, End.SUPERSEDED, "superseded by a new request")
    stats, _ = req.end(s, 0.1)
    assert stats is None and req.active == 0 and req.counters.transfers_failed == 0


def test_a_running_transfer_must_end_before_its_session():
    req = Requests(Limits())
    s, _ = arrive(req, rrq(), A)
    run(req, s)
    with pytest.raises(ValueError):
        req.end(s, 0.1)


def test_an_upload_that_cannot_be_stored_is_a_failure():
    req = Requests(Limits(uploads=True))
    s, _ = arrive(req, core.encode_request(core.WRQ, "log"), A)
    w = req.write_transfer(s)
    s.state = State.RUNNING
    w.start(0.0)
    w.on_packet(core.encode_data(1, b"short"), 0.1)
    assert w.ok
    stats, _ = req.end(s, 0.1, failure=(End.STORE_FAILED, "cannot store upload: disk full"))
    assert not stats.ok and stats.end is End.STORE_FAILED and stats.direction == "write"
    assert req.counters.transfers_failed == 1 and req.counters.bytes_received == 5


def test_stop_hands_back_every_live_session_and_empties_the_queue():
    req = Requests(Limits(max_transfers=1))
    running, _ = arrive(req, rrq(), A)
    queued, _ = arrive(req, rrq(), B)
    assert req.stop() == [running]
    assert queued.state is State.ENDED and req.expire(100.0).refused == []

"""Hypothesis fuzzing of the packet parser, the state machine and a live server."""

import asyncio
import os
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootherd.tftp import TFTPServer, core, native
from bootherd.tftp.client import fetch

from .conftest import NativeRead, sha

names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=20)  # fmt: skip
requests = st.builds(
    core.Request,
    st.sampled_from([core.RRQ, core.WRQ]),
    names,
    st.sampled_from(["octet", "netascii"]),
    st.dictionaries(names.map(str.lower), st.text(max_size=8).filter(lambda s: "\0" not in s),
                    max_size=4),
)  # fmt: skip
packets = st.one_of(
    requests,
    st.builds(core.Data, st.integers(0, 65535), st.binary(max_size=600)),
    st.builds(core.Ack, st.integers(0, 65535)),
    st.builds(core.Error, st.integers(0, 65535), names),
)


@given(st.binary(max_size=700))
@settings(max_examples=3000, deadline=None)
def test_parser_never_crashes(data):
    try:
        pkt = core.parse_packet(data)
    except core.MalformedPacket:
        return
    core.encode(pkt)  # whatever parses can be re-encoded


@given(packets)
@settings(max_examples=1000, deadline=None)
def test_codec_roundtrip(pkt):
    assert core.parse_packet(core.encode(pkt)) == pkt


@given(
    st.binary(max_size=5000),
    st.sampled_from([8, 512, 1000]),
    st.integers(1, 8),
    st.lists(st.one_of(st.integers(0, 70), st.binary(max_size=8), st.just(None)), max_size=60),
)
@settings(max_examples=500, deadline=None)
def test_read_state_machine_invariants(data, blksize, windowsize, events):
    t = core.ReadTransfer(core.BytesSource(data), blksize=blksize, windowsize=windowsize,
                          timeout=1.0, retries=3)  # fmt: skip
    now = 0.0
    t.start(now)
    for ev in events:
        now += 0.3
        if t.done:
            break
        if ev is None:
            t.on_timer(now + 10)
        else:
            pkt = core.encode_ack(ev) if isinstance(ev, int) else ev
            try:
                out, deadline = t.on_packet(pkt, now)
            except core.MalformedPacket:
                continue
            assert (deadline is None) == t.done
        assert 0 <= t.acked <= t.sent <= len(data) // blksize + 1
    if t.done and t.ok:
        assert t.acked == len(data) // blksize + 1 or t.sent == t.nblocks


_ATTRIBUTES = ("done", "ok", "end", "error", "peer_error", "acked", "sent", "attempt",
               "blocks_sent", "bytes_sent", "retransmissions", "deadline", "finished")


@pytest.mark.skipif(not native.available and not os.environ.get("CI"),
                    reason="extension not built")  # fmt: skip
@given(
    st.binary(max_size=3000),
    st.sampled_from([8, 512, 1000]),
    st.integers(1, 8),
    st.booleans(),
    st.booleans(),
    st.lists(st.one_of(st.integers(0, 12), st.integers(0, 70000), st.binary(max_size=12),
                       packets.map(core.encode),
                       st.just(None)), max_size=60),  # fmt: skip
)
@settings(max_examples=1500, deadline=None)
def test_native_machine_agrees_with_read_transfer(data, blksize, windowsize, oack, at_oack,
                                                  events):  # fmt: skip
    """Random events, the same answers: the Python core against the C machine that the
    native data path runs from the OACK (or past the first window)."""
    opts = {"blksize": str(blksize)} if oack else None
    kw = {"blksize": blksize, "windowsize": windowsize, "timeout": 1.0, "retries": 3,
          "oack": opts}  # fmt: skip
    py = core.ReadTransfer(core.BytesSource(data), **kw)
    c = NativeRead(core.BytesSource(data), at_oack=at_oack, **kw)

    def step(t, ev, now):
        try:
            if ev is None:
                return t.on_timer(now)
            return t.on_packet(core.encode_ack(ev) if isinstance(ev, int) else ev, now)
        except core.MalformedPacket:
            return "malformed"

    assert py.start(0.0) == c.start(0.0)
    now = 0.0
    for ev in events:
        now += 10.0 if ev is None else 0.25
        assert step(py, ev, now) == step(c, ev, now), ev
        assert {a: getattr(py, a) for a in _ATTRIBUTES} == {a: getattr(c, a) for a in _ATTRIBUTES}
        if py.done:
            break


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzroot")
    (root / "file").write_bytes(bytes(range(256)) * 300)
    loop = asyncio.new_event_loop()
    srv = TFTPServer("127.0.0.1", 0, str(root), default_timeout=0.2, retries=2,
                     max_per_client=100000)  # fmt: skip
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(srv.start(), loop).result(5)
    yield srv, loop, root
    asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.one_of(st.binary(max_size=600), packets.map(core.encode)), st.booleans())
def test_live_server_survives_garbage(threaded_server, data, to_transfer):
    srv, loop, root = threaded_server
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.bind(("127.0.0.1", 0))
    try:
        target = ("127.0.0.1", srv.port)
        if to_transfer:  # aim at a live transfer socket (its TID) instead
            s.sendto(core.encode_request(core.RRQ, "file"), target)
            _, target = s.recvfrom(2000)
        s.sendto(data, target)
    finally:
        s.close()
    assert srv.counters.internal_errors == 0


def test_live_server_still_serves_after_fuzz(threaded_server):
    srv, loop, root = threaded_server
    fut = asyncio.run_coroutine_threadsafe(fetch("127.0.0.1", srv.port, "file"), loop)
    assert fut.result(10).sha256 == sha((root / "file").read_bytes())
    assert srv.counters.internal_errors == 0

"""The native data path (bootherd._tftpdata): what it takes over and how it gives it back.

The behaviour every transfer must have (rollover, loss, probes, unknown TIDs...) is tested
both ways by the server tests (the ``datapath`` fixture), and the C rules are the core's:
test_core.py runs its event vectors on both (``make``), test_fuzz.py compares them on
random events.  These are the hand-over's own paths: constants and outcomes as the core
has them, a transfer taken back when superseded or when the server stops, a file that
changes under a streamed transfer, packets that end a transfer, and the C classifier
against the Python parser.
"""

import asyncio
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootherd.tftp import TFTPServer, core, native
from bootherd.tftp.client import fetch

from .conftest import sha
from .test_fuzz import packets
from .test_server import Raw, wait_for

pytestmark = pytest.mark.skipif(not native.available and not os.environ.get("CI"),
                                reason="extension not built")  # fmt: skip


def test_built_under_ci():
    # CI installs gcc and the headers: a silently missing extension would hide a slow path.
    assert native.available


def test_constants_and_outcomes_are_the_cores():
    from bootherd import _tftpdata as c
    from bootherd.tftp.sessions import Limits

    assert (c.RRQ, c.WRQ, c.DATA, c.ACK, c.ERROR, c.OACK) == (
        core.RRQ, core.WRQ, core.DATA, core.ACK, core.ERROR, core.OACK)
    assert (c.ERR_UNDEFINED, c.ERR_ILLEGAL_OP, c.ERR_UNKNOWN_TID) == (
        core.ERR_UNDEFINED, core.ERR_ILLEGAL_OP, core.ERR_UNKNOWN_TID)
    assert (c.MIN_BLKSIZE, c.MAX_BLKSIZE, c.MAX_BACKOFF_SHIFT) == (
        core.MIN_BLKSIZE, core.MAX_BLKSIZE, core.MAX_BACKOFF_SHIFT)
    # With the default windowsize cap every read can be handed over.
    assert Limits().max_windowsize <= c.MAX_WINDOW <= c.GSO_MAX_SEGS
    # Every way the machine ends a transfer is a core.End: the ends only a transport or the
    # request layer decides (superseded, stopping, ...) are the others.
    assert [core.End(name) for name in c.OUTCOMES] == [
        core.End.COMPLETED, core.End.PEER_ERROR, core.End.TIMEOUT, core.End.UNEXPECTED,
        core.End.FILE_CHANGED]
    # An outcome carries what core.Progress needs; the machine takes core.Handover's fields.
    outcome_fields = {"end", "message", "peer_code", "acked", "sent", "attempt", "blocks_sent",
                      "bytes_sent", "retransmissions", "ended_ago", "remaining"}
    assert set(c.Outcome.__match_args__) == outcome_fields
    handover = core.ReadTransfer(core.BytesSource(b"x" * 600)).handover(0.0)
    with pytest.raises(ValueError):  # sent 0: not past the first window; keywords accepted
        c.ReadMachine(0.0, source=b"x" * 600, file_fd=-1, **handover.as_kwargs())
    with pytest.raises(TypeError):
        c.ReadMachine(0.0, source=b"", file_fd=-1, **handover.as_kwargs(), extra=1)
    # At its OACK (sent 0) a machine needs the OACK's bytes; one too long for it stays in
    # Python (a client's "timeout 1.000...0" is echoed whole).
    long_oack = core.ReadTransfer(core.BytesSource(b"x" * 600),
                                  oack={"timeout": "1." + "0" * 600}).handover(0.0)
    with pytest.raises(ValueError):
        c.ReadMachine(0.0, source=b"x" * 600, file_fd=-1, **long_oack.as_kwargs())
    at_oack = core.ReadTransfer(core.BytesSource(b"x" * 600), oack={"tsize": "600"})
    c.ReadMachine(0.0, source=b"x" * 600, file_fd=-1, **at_oack.handover(0.0).as_kwargs())


def _parser_says(data: bytes) -> int:
    try:
        pkt = core.parse_packet(data)
    except core.MalformedPacket:
        return -1
    if isinstance(pkt, core.Request):
        return pkt.opcode
    return {core.Data: 3, core.Ack: 4, core.Error: 5, core.OAck: 6}[type(pkt)]


# Request-shaped bytes: opcode, then a few NUL-separated fields (some empty, some
# non-ASCII), so the classifier's string rules are exercised, not just random noise.
fields = st.lists(st.sampled_from([b"", b"a", b"octet", b"\xff", b"blksize", b"1468"]),
                  max_size=6)  # fmt: skip
shaped = st.builds(
    lambda op, parts, tail: bytes([0, op]) + b"\0".join(parts) + tail,
    st.integers(0, 8), fields, st.sampled_from([b"", b"\0", b"\0\0"]),
)


@given(st.one_of(st.binary(max_size=80), packets.map(core.encode), shaped))
@settings(max_examples=5000, deadline=None)
def test_classifier_agrees_with_the_parser(data):
    assert native.classify(data) == _parser_says(data)


async def test_reads_are_handed_over(root):
    for setting, handed in ((True, 2), (False, 0)):
        async with TFTPServer("127.0.0.1", 0, str(root), native_data_path=setting) as srv:
            for opts in (None, {"blksize": 1468, "windowsize": 8, "tsize": 0}):
                r = await fetch("127.0.0.1", srv.port, "f1m", options=opts)
                assert r.sha256 == sha((root / "f1m").read_bytes())
            await wait_for(lambda s=srv: s.counters.transfers_ok == 2)
            assert srv.counters.native_transfers == handed
            assert srv.counters.bytes_sent == 2 * 2**20


async def test_cached_reads_are_handed_over_at_their_oack(root):
    """A file the store has ready (cached) goes native once its OACK is out: the OACK's
    retransmission, ACK 0, the probe's ERROR 8 and the data are the pump's.  A file not
    cached waits for ACK 0 in Python, so its size probe reads nothing; at ACK 0 it is read
    and goes native, the pump answering that ACK."""
    done = []
    probe = {"tsize": "0", "blksize": "1468", "windowsize": "4"}
    async with TFTPServer("127.0.0.1", 0, str(root), default_timeout=0.2,
                          on_transfer_done=done.append) as srv:  # fmt: skip
        addr = ("127.0.0.1", srv.port)
        raw = Raw()
        raw.send(core.encode_request(core.RRQ, "sub/inner.bin", "octet", probe), addr)
        oack, tid = await raw.recv()
        raw.send(core.encode_error(8, "probe done"), tid)
        await wait_for(lambda: srv.counters.probes_aborted == 1)
        assert srv.counters.native_transfers == 0 and srv.counters.cache_misses == 0
        assert len(srv.cache) == 0  # not read: answered from stat
        # Not cached: read on a thread at its ACK 0, which the pump then answers.
        r = await fetch("127.0.0.1", srv.port, "f1m", options={"blksize": 1468})
        assert r.sha256 == sha((root / "f1m").read_bytes()) and len(srv.cache) == 1
        await wait_for(lambda: srv.counters.native_transfers == 1)
        assert srv.pump.stats()["windows"] == 2**20 // 1468 + 1 and srv.store.thread_reads == 1
        raw.send(core.encode_request(core.RRQ, "f1m", "octet", probe), addr)
        oack, tid = await raw.recv()
        assert core.parse_packet(oack) == core.OAck(
            {"tsize": str(2**20), "blksize": "1468", "windowsize": "4"})
        await wait_for(lambda: srv.counters.native_transfers == 2)  # before any ACK 0
        again, _ = await raw.recv()  # ACK 0 lost: the pump sends the OACK again
        assert again == oack
        raw.send(core.encode_error(8, "probe done"), tid)
        await wait_for(lambda: srv.counters.probes_aborted == 2)
        r = await fetch("127.0.0.1", srv.port, "f1m", options={"blksize": 1468,
                                                                "windowsize": 4})
        assert r.sha256 == sha((root / "f1m").read_bytes())
        await wait_for(lambda: srv.counters.transfers_ok == 2)
        raw.close()
    assert srv.counters.native_transfers == 3 and srv.counters.transfers_failed == 0
    assert [d.probe for d in done] == [True, False, True, False]
    assert done[2].retries == 1 and done[2].blocks == 0


async def test_an_oack_too_long_for_the_pump_goes_native_after_its_first_window(root):
    long_timeout = {"timeout": "1." + "0" * 600, "blksize": "1468"}
    async with TFTPServer("127.0.0.1", 0, str(root)) as srv:
        for _ in range(2):  # the second finds the file cached, ready at its OACK
            r = await fetch("127.0.0.1", srv.port, "f1m", options=long_timeout)
            assert r.sha256 == sha((root / "f1m").read_bytes())
        await wait_for(lambda: srv.counters.transfers_ok == 2)
        assert srv.counters.native_transfers == 2
        assert srv.pump.stats()["windows"] == 2 * (2**20 // 1468)  # DATA 1 each from Python


async def _native_transfer(srv, raw, name="f1m", opts=None):
    """RRQ from raw; returns the TID once the transfer is in the native data path."""
    raw.send(core.encode_request(core.RRQ, name, "octet", opts), ("127.0.0.1", srv.port))
    pkt, tid = await raw.recv()
    assert core.parse_packet(pkt) == core.Data(1, pkt[4:])
    await wait_for(lambda: srv.counters.native_transfers >= 1)
    return tid


async def test_superseded_transfer_is_taken_back(root):
    done = []
    async with TFTPServer("127.0.0.1", 0, str(root), on_transfer_done=done.append) as srv:
        raw = Raw()
        old = await _native_transfer(srv, raw)
        raw.send(core.encode_ack(1), old)
        assert core.parse_packet((await raw.recv())[0]).block == 2
        raw.send(core.encode_request(core.RRQ, "small.txt"), ("127.0.0.1", srv.port))
        pkt, new = await raw.recv()
        assert new != old and core.parse_packet(pkt).payload == (root / "small.txt").read_bytes()
        raw.send(core.encode_ack(1), new)
        await wait_for(lambda: len(done) == 2)
        raw.send(core.encode_ack(2), old)  # the old TID is gone: nothing answers
        with pytest.raises(TimeoutError):
            await raw.recv(timeout=0.3)
        raw.close()
    first, second = done
    assert first.error == "superseded by a new request" and first.blocks == 2
    assert first.bytes == 512 and not first.ok  # block 1 (512 bytes) was acknowledged
    assert second.ok and srv.counters.superseded == 1 and srv.active_transfers == 0


async def test_stop_takes_back_native_transfers(root):
    done = []
    srv = TFTPServer("127.0.0.1", 0, str(root), on_transfer_done=done.append)
    await srv.start()
    raws = [Raw() for _ in range(3)]
    for r in raws:
        await _native_transfer(srv, r)
    await wait_for(lambda: srv.counters.native_transfers == 3)
    await srv.stop()
    assert srv.active_transfers == 0 and srv.pump is None
    assert [d.error for d in done] == ["server stopping"] * 3
    for r in raws:
        r.close()


async def test_file_shrinking_under_a_streamed_transfer_ends_it(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(300_000))
    done = []
    # cache_bytes 64 KiB: a 300 KB file is read block by block from its descriptor
    async with TFTPServer("127.0.0.1", 0, str(tmp_path), cache_bytes=2**16,
                          on_transfer_done=done.append) as srv:  # fmt: skip
        raw = Raw()
        tid = await _native_transfer(srv, raw, "big")
        with open(big, "r+b") as f:
            f.truncate(1000)
        raw.send(core.encode_ack(1), tid)
        pkt, _ = await raw.recv()
        assert core.parse_packet(pkt) == core.Error(0, "file changed during transfer")
        await wait_for(lambda: len(done) == 1)
        raw.close()
    assert done[0].error == "file changed during transfer" and not done[0].ok
    assert srv.counters.transfers_failed == 1 and srv.counters.internal_errors == 0


@pytest.mark.parametrize(
    "packet, answer, error",
    [
        (core.encode_data(1, b"x"), core.Error(4, "unexpected opcode Data"),
         "unexpected opcode Data"),
        (core.encode_request(core.RRQ, "f1m"), core.Error(4, "unexpected opcode Request"),
         "unexpected opcode Request"),
        (core.encode_error(3, "disk full"), None, "peer error 3: disk full"),
    ],
)  # fmt: skip
async def test_packets_that_end_a_native_transfer(root, packet, answer, error):
    done = []
    async with TFTPServer("127.0.0.1", 0, str(root), on_transfer_done=done.append) as srv:
        raw = Raw()
        tid = await _native_transfer(srv, raw)
        raw.send(b"\x00\x04", tid)  # malformed: counted, dropped, the transfer goes on
        raw.send(packet, tid)
        if answer is not None:
            assert core.parse_packet((await raw.recv())[0]) == answer
        await wait_for(lambda: len(done) == 1)
        await wait_for(lambda: srv.counters.malformed == 1)
        raw.close()
    assert done[0].error == error and not done[0].ok and not done[0].probe


async def test_native_timeout_retransmits_with_backoff_then_fails(root):
    done = []
    async with TFTPServer("127.0.0.1", 0, str(root), default_timeout=0.1, retries=2,
                          on_transfer_done=done.append) as srv:  # fmt: skip
        raw = Raw()
        await _native_transfer(srv, raw)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        arrivals = []
        for _ in range(2):  # block 1 again after 0.1 s and after 0.2 s more (backoff)
            pkt, _ = await raw.recv()
            assert core.parse_packet(pkt).block == 1
            arrivals.append(loop.time() - t0)
        pkt, _ = await raw.recv()
        assert core.parse_packet(pkt) == core.Error(0, "timeout")
        await wait_for(lambda: len(done) == 1)
        raw.close()
    assert arrivals[1] - arrivals[0] >= 0.15  # the second wait doubled
    assert done[0].error == "timeout" and done[0].retries == 2


async def test_an_ack_resets_the_backoff(root):
    async with TFTPServer("127.0.0.1", 0, str(root), default_timeout=0.2, retries=3) as srv:
        raw = Raw()
        tid = await _native_transfer(srv, raw)
        loop = asyncio.get_running_loop()
        pkt, _ = await raw.recv()  # block 1 again after 0.2 s; the next wait would be 0.4 s
        assert core.parse_packet(pkt).block == 1
        raw.send(core.encode_ack(1), tid)
        pkt, _ = await raw.recv()
        sent = loop.time()
        assert core.parse_packet(pkt).block == 2
        pkt, _ = await raw.recv()  # not acknowledged: resent after 0.2 s, not 0.4 s
        gap = loop.time() - sent
        assert core.parse_packet(pkt).block == 2 and 0.15 <= gap < 0.35, gap
        raw.send(core.encode_error(0, "enough"), tid)
        raw.close()


async def test_ipv6_transfer(root):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    async with TFTPServer("::1", 0, str(root)) as srv:
        r = await fetch("::1", srv.port, "f1m", options={"blksize": 1400, "windowsize": 8})
        assert r.sha256 == sha((root / "f1m").read_bytes())
        await wait_for(lambda: srv.counters.transfers_ok == 1)
        assert srv.counters.native_transfers == 1

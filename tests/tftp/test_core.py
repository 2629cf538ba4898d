"""Sans-IO core: codec, negotiation and the transfer state machines (no sockets)."""

import pytest

from bootherd.tftp import core
from bootherd.tftp.core import (
    ACK,
    DATA,
    ERROR,
    OACK,
    MalformedPacket,
    WriteTransfer,
    encode_ack,
    encode_data,
    encode_error,
    parse_packet,
)


def blocks_of(pkts):
    out = []
    for p in pkts:
        assert p[1] == DATA
        out.append(((p[2] << 8) | p[3], bytes(p[4:])))
    return out


# ----------------------------------------------------------------- codec


def test_parse_rrq_options_case_insensitive_and_unknown_kept():
    raw = b"\x00\x01boot/file\x00OcTeT\x00BLKSIZE\x001468\x00TSize\x000\x00foo\x00bar\x00"
    req = parse_packet(raw)
    assert req == core.Request(
        core.RRQ, "boot/file", "octet", {"blksize": "1468", "tsize": "0", "foo": "bar"}
    )
    assert parse_packet(core.encode(req)) == req


def test_parse_tolerates_padding_nuls():
    req = parse_packet(b"\x00\x01f\x00octet\x00\x00")
    assert req.filename == "f" and req.options == {}


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x00", b"\x00\x01", b"\x00\x01f", b"\x00\x01f\x00", b"\x00\x01\x00octet\x00",
     b"\x00\x07abcd", b"\x00\x01f\x00octet\x00blksize\x00", b"\x00\x04\x00\x01xx",
     b"\x00\x01f\x00oct\xffet\x00", b"\xff\xff\x00\x00"],
)  # fmt: skip
def test_malformed(raw):
    with pytest.raises(MalformedPacket):
        parse_packet(raw)


def test_roundtrip_simple_packets():
    assert parse_packet(encode_ack(70000)) == core.Ack(70000 & 0xFFFF)
    assert parse_packet(encode_data(3, b"xyz")) == core.Data(3, b"xyz")
    assert parse_packet(encode_error(1, "nope")) == core.Error(1, "nope")
    assert parse_packet(core.encode_oack({"blksize": "512"})) == core.OAck({"blksize": "512"})


def test_netascii_roundtrip():
    text = b"a\nb\rc\r\nd"
    assert core.to_netascii(text) == b"a\r\nb\r\0c\r\0\r\nd"
    assert core.from_netascii(core.to_netascii(text)) == text


# ----------------------------------------------------------------- negotiation


def test_negotiate_clamps_and_ignores_unknown():
    neg = core.negotiate(
        {"blksize": "65464", "windowsize": "1000", "tsize": "0", "timeout": "3", "x": "y"},
        max_blksize=1468,
        max_windowsize=64,
        file_size=1234,
    )
    assert (neg.blksize, neg.windowsize, neg.timeout, neg.tsize) == (1468, 64, 3.0, 1234)
    assert neg.oack == {"blksize": "1468", "windowsize": "64", "tsize": "1234", "timeout": "3"}


def test_negotiate_nothing_known_means_no_oack():
    assert core.negotiate({"multicast": ""}).oack == {}


@pytest.mark.parametrize(
    "opts", [{"blksize": "7"}, {"blksize": "abc"}, {"timeout": "0"}, {"windowsize": "0"},
             {"timeout": "300"}, {"tsize": "-1"}],
)  # fmt: skip
def test_negotiate_refuses_bad_values(opts):
    with pytest.raises(core.OptionError):
        core.negotiate(opts, file_size=10)


def test_wrq_tsize_over_limit_refused():
    with pytest.raises(core.OptionError):
        core.negotiate({"tsize": "1000"}, opcode=core.WRQ, max_upload=999)


# ----------------------------------------------------------------- read transfers
#
# Every test that takes ``make`` runs twice: on core.ReadTransfer, and as the native data
# path runs the transfer past its first window (the C machine, conftest.NativeRead).


def test_plain_transfer_lockstep_and_final_ack(make):
    data = bytes(range(256)) * 5  # 1280 bytes: blocks of 512, 512, 256
    t = make(data)
    pkts, dl = t.start(0.0)
    assert blocks_of(pkts) == [(1, data[:512])] and dl == 1.0
    pkts, _ = t.on_packet(encode_ack(1), 0.1)
    assert blocks_of(pkts) == [(2, data[512:1024])]
    pkts, _ = t.on_packet(encode_ack(2), 0.2)
    assert blocks_of(pkts) == [(3, data[1024:])]
    pkts, dl = t.on_packet(encode_ack(3), 0.3)
    assert pkts == [] and dl is None and t.done and t.ok


def test_exact_multiple_sends_empty_last_block(make):
    t = make(b"x" * 1024)
    t.start(0)
    t.on_packet(encode_ack(1), 0)
    pkts, _ = t.on_packet(encode_ack(2), 0)
    assert blocks_of(pkts) == [(3, b"")]
    assert t.on_packet(encode_ack(3), 0) == ([], None) and t.ok


def test_empty_file(make):
    t = make(b"")
    pkts, _ = t.start(0)
    assert blocks_of(pkts) == [(1, b"")]
    t.on_packet(encode_ack(1), 0)
    assert t.ok


def test_duplicate_ack_ignored_no_sorcerers_apprentice(make):
    t = make(b"y" * 2000)
    t.start(0)
    first, _ = t.on_packet(encode_ack(1), 0.1)
    assert len(first) == 1
    again, dl = t.on_packet(encode_ack(1), 0.2)
    assert again == [] and dl == pytest.approx(1.1)  # timer not re-armed by a duplicate
    stale, _ = t.on_packet(encode_ack(0), 0.3)
    assert stale == []
    future, _ = t.on_packet(encode_ack(9), 0.3)
    assert future == []


def test_timeout_retransmits_with_backoff_then_fails(make):
    t = make(b"z" * 100, timeout=1.0, retries=3)
    pkts, dl = t.start(0.0)
    assert dl == 1.0
    assert t.on_timer(0.5) == ([], 1.0)  # early/spurious timer: nothing
    deadlines = []
    now = dl
    for _ in range(3):
        pkts, dl = t.on_timer(now)
        assert blocks_of(pkts) == [(1, b"z" * 100)]
        deadlines.append(dl - now)
        now = dl
    assert deadlines == [2.0, 4.0, 8.0]
    pkts, dl = t.on_timer(now)
    assert dl is None and t.done and not t.ok and t.error == "timeout"
    assert parse_packet(pkts[0]) == core.Error(0, "timeout")
    assert t.retransmissions == 3


def test_oack_then_ack0_then_data(make):
    t = make(b"a" * 3000, blksize=1024, oack={"blksize": "1024", "tsize": "3000"})
    pkts, _ = t.start(0)
    assert parse_packet(pkts[0]) == core.OAck({"blksize": "1024", "tsize": "3000"})
    pkts, _ = t.on_timer(1.0)  # OACK lost: resent
    assert pkts[0][1] == OACK
    pkts, _ = t.on_packet(encode_ack(0), 1.5)
    assert blocks_of(pkts) == [(1, b"a" * 1024)]
    dup, _ = t.on_packet(encode_ack(0), 1.6)  # duplicate ACK 0 now ignored
    assert dup == []


def test_probe_abort_with_error_8_after_oack(make):
    t = make(b"a" * 10, oack={"tsize": "10"})
    t.start(0)
    pkts, dl = t.on_packet(encode_error(8, "tsize probe"), 0.1)
    assert pkts == [] and dl is None and t.done and not t.ok and t.peer_error == 8
    assert t.blocks_sent == 0  # nothing read from the source


def test_windowsize_burst_partial_ack_and_timeout(make):
    data = bytes(range(100)) * 100  # 10,000 bytes, blksize 1000: 11 blocks (last empty)
    t = make(data, blksize=1000, windowsize=4, oack={"blksize": "1000", "windowsize": "4"})
    t.start(0)
    pkts, _ = t.on_packet(encode_ack(0), 0)
    assert [b for b, _ in blocks_of(pkts)] == [1, 2, 3, 4]
    pkts, _ = t.on_packet(encode_ack(4), 0)
    assert [b for b, _ in blocks_of(pkts)] == [5, 6, 7, 8]
    # block 6 lost: receiver acks 5, sender restarts the window at 6
    pkts, _ = t.on_packet(encode_ack(5), 0)
    assert [b for b, _ in blocks_of(pkts)] == [6, 7, 8, 9]
    assert t.retransmissions == 3
    # nothing acknowledged: whole window again on timeout
    pkts, _ = t.on_timer(10)
    assert [b for b, _ in blocks_of(pkts)] == [6, 7, 8, 9]
    pkts, _ = t.on_packet(encode_ack(9), 11)
    assert [b for b, _ in blocks_of(pkts)] == [10, 11]
    assert blocks_of(pkts)[-1][1] == b""
    assert t.on_packet(encode_ack(11), 11) == ([], None) and t.ok


def test_block_numbers_roll_over(make):
    n = 70000  # blocks of 8 bytes -> 70,001 blocks
    data = bytes(i % 251 for i in range(n * 8))
    t = make(data, blksize=8)
    pkts, _ = t.start(0)
    got = bytearray()
    wire_numbers = []
    for _ in range(n + 1):  # bounded: a transfer that never ends fails, not hangs
        (blk, payload), = blocks_of(pkts)
        wire_numbers.append(blk)
        got += payload
        pkts, dl = t.on_packet(encode_ack(blk), 0)
        if not pkts:
            break
    assert t.ok and bytes(got) == data
    assert wire_numbers[65534:65537] == [65535, 0, 1]
    assert len(wire_numbers) == n + 1


def test_rollover_ack_for_block_0_is_not_the_oack(make):
    t = make(b"q" * (8 * 65537), blksize=8, oack={"blksize": "8"})
    t.start(0)
    t.on_packet(encode_ack(0), 0)
    for b in range(1, 65535):
        t.on_packet(encode_ack(b), 0)
    pkts, _ = t.on_packet(encode_ack(65535), 0)
    assert blocks_of(pkts)[0][0] == 0  # block 65,536 on the wire
    assert t.on_packet(encode_ack(65535), 0) == ([], t.deadline)  # duplicate
    pkts, _ = t.on_packet(encode_ack(0), 0)
    assert blocks_of(pkts)[0][0] == 1


def test_unexpected_opcode_is_illegal_operation(make):
    t = make(b"abc")
    t.start(0)
    pkts, dl = t.on_packet(encode_data(1, b"x"), 0)
    assert dl is None and parse_packet(pkts[0]).code == core.ERR_ILLEGAL_OP


def test_malformed_packet_from_peer_raises_for_counting(make):
    t = make(b"abc")
    t.start(0)
    with pytest.raises(MalformedPacket):
        t.on_packet(b"\x00\x09zz", 0)
    assert not t.done


def test_packets_after_done_are_ignored(make):
    t = make(b"")
    t.start(0)
    t.on_packet(encode_ack(1), 0)
    assert t.on_packet(encode_ack(1), 1) == ([], None)
    assert t.on_timer(5) == ([], None)


# ----------------------------------------------------------------- write transfers


def test_write_transfer_lockstep_duplicate_and_end():
    w = WriteTransfer(blksize=4)
    pkts, _ = w.start(0)
    assert pkts == [encode_ack(0)]
    assert w.on_packet(encode_data(1, b"abcd"), 0)[0] == [encode_ack(1)]
    assert w.on_packet(encode_data(1, b"abcd"), 0)[0] == [encode_ack(1)]  # dup re-acked
    pkts, dl = w.on_packet(encode_data(2, b"ef"), 0)
    assert pkts == [encode_ack(2)] and dl is None and w.ok
    assert bytes(w.received) == b"abcdef"


def test_write_transfer_window_gap_acks_last_in_order_once():
    w = WriteTransfer(blksize=2, windowsize=4, oack={"blksize": "2", "windowsize": "4"})
    pkts, _ = w.start(0)
    assert pkts[0][1] == OACK
    assert w.on_packet(encode_data(1, b"aa"), 0)[0] == []
    pkts, _ = w.on_packet(encode_data(3, b"cc"), 0)  # gap: block 2 lost
    assert pkts == [encode_ack(1)]
    assert w.on_packet(encode_data(4, b"dd"), 0)[0] == []  # no ACK storm
    # the sender restarts its window after block 1: 2..5 is a full window
    for b, p in [(2, b"bb"), (3, b"cc"), (4, b"dd")]:
        assert w.on_packet(encode_data(b, p), 0)[0] == []
    assert w.on_packet(encode_data(5, b"ee"), 0)[0] == [encode_ack(5)]
    pkts, dl = w.on_packet(encode_data(6, b""), 0)
    assert pkts == [encode_ack(6)] and w.ok and bytes(w.received) == b"aabbccddee"


def test_write_transfer_timeout_and_limit():
    w = WriteTransfer(blksize=4, retries=1, max_bytes=6)
    w.start(0)
    pkts, dl = w.on_timer(1.0)
    assert pkts == [encode_ack(0)] and dl == 3.0
    w.on_packet(encode_data(1, b"abcd"), 1.5)
    pkts, dl = w.on_packet(encode_data(2, b"efgh"), 1.6)
    assert dl is None and parse_packet(pkts[0]).code == core.ERR_DISK_FULL


def test_error_packet_type_constant():
    assert encode_error(5, "x")[1] == ERROR and encode_ack(1)[1] == ACK


def test_peer_error_ends_the_transfer_with_its_words(make):
    t = make(b"p" * 3000, blksize=512)
    t.start(0)
    t.on_packet(encode_ack(1), 0.1)
    pkts, dl = t.on_packet(encode_error(3, "disk full"), 0.2)
    assert pkts == [] and dl is None and t.done and not t.ok
    assert t.end is core.End.PEER_ERROR and t.peer_error == 3
    assert t.error == "peer error 3: disk full" and t.finished == 0.2


def test_an_ack_resets_the_backoff(make):
    t = make(b"r" * 3000, blksize=512, timeout=1.0, retries=5)
    t.start(0)
    pkts, dl = t.on_timer(1.0)  # block 1 again; the next wait doubles
    assert blocks_of(pkts)[0][0] == 1 and dl == 3.0
    pkts, dl = t.on_packet(encode_ack(1), 1.5)
    assert blocks_of(pkts)[0][0] == 2 and dl == 2.5  # back to one timeout
    assert (t.attempt, t.retransmissions, t.blocks_sent) == (0, 1, 3)


def test_counters_after_a_windowed_transfer_with_loss(make):
    data = bytes(range(256)) * 20  # 5,120 bytes, blksize 512: blocks 1-10 and an empty 11
    t = make(data, blksize=512, windowsize=4)
    t.start(0)
    t.on_packet(encode_ack(2), 0.1)  # blocks 3, 4 lost: window 3-6
    t.on_packet(encode_ack(6), 0.2)  # 7-10
    t.on_timer(5.0)  # nothing acknowledged: 7-10 again
    t.on_packet(encode_ack(10), 5.5)  # 11
    assert t.on_packet(encode_ack(11), 5.6) == ([], None)
    assert (t.ok, t.end, t.acked, t.sent) == (True, core.End.COMPLETED, 11, 11)
    assert (t.blocks_sent, t.bytes_sent, t.retransmissions) == (4 + 4 + 4 + 4 + 1, 4 * 2048, 6)

"""bootinfo codec against the packet layout in protocols/bootinfo.md."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootherd.bootinfo import codec
from bootherd.bootinfo.codec import BootWhat, CodecError, Opcode, Packet
from bootherd.boottype import BootType


def test_sizes_and_offsets():
    assert codec.PACKET_SIZE == 520 and codec.DATA_SIZE == 512
    assert codec.HEADER.size == 8 and codec.WHAT_HEADER.size == 4
    assert codec.WHAT_OFFSET + codec.WHAT_SIZE == codec.CMDLINE_OFFSET == 264
    assert codec.CMDLINE_OFFSET + codec.CMDLINE_SIZE <= codec.DATA_SIZE
    assert [o.value for o in Opcode] == [1, 2, 3, 4, 5, 6]
    assert [t.value for t in BootType] == list(range(1, 10))


def test_request_bytes():
    raw = codec.request()
    assert len(raw) == 520
    assert raw[:8] == b"\x01\x00\x01\x00\x00\x00\x00\x00"  # version 1, REQUEST, status 0
    assert raw[8:] == bytes(512)


def test_header_little_endian():
    raw = codec.encode(Packet(opcode=0x0102, version=0x0304, status=0x05060708))
    assert raw[:8] == bytes([0x04, 0x03, 0x02, 0x01, 0x08, 0x07, 0x06, 0x05])


def _layout(raw: bytes) -> tuple[int, int, int, int, int, bytes, bytes]:
    version, opcode, status = struct.unpack_from("<hhi", raw, 0)
    flags, typ = struct.unpack_from("<hh", raw, 8)
    what = raw[12:12 + 260]
    cmd = raw[8 + 264:8 + 264 + 224]
    return version, opcode, status, flags, typ, what, cmd


def test_part_layout():
    raw = codec.reply(BootWhat(BootType.PART, partition=2))
    assert len(raw) == 520
    version, opcode, status, flags, typ, what, cmd = _layout(raw)
    assert (version, opcode, status, flags, typ) == (1, 2, 0, 0, 1)
    assert what[:4] == struct.pack("<i", 2) and what[4:] == bytes(256)
    assert cmd == bytes(224)


def test_sysid_layout():
    raw = codec.reply(BootWhat(BootType.SYSID, sysid=165))
    _, _, _, _, typ, what, _ = _layout(raw)
    assert typ == 2 and struct.unpack_from("<i", what)[0] == 165


def test_mb_layout_with_cmdline():
    raw = codec.reply(BootWhat(BootType.MB, server="10.1.2.3", filename="/k/vmlinuz",
                               cmdline="console=ttyS0"))
    _, _, _, flags, typ, what, cmd = _layout(raw)
    assert (flags, typ) == (codec.FLAG_CMDLINE, 3)
    assert what[:4] == bytes([10, 1, 2, 3])
    assert what[4:4 + 11] == b"/k/vmlinuz\0"
    assert cmd.startswith(b"console=ttyS0\0")


def test_mfs_layout():
    raw = codec.reply(BootWhat(BootType.MFS, mfs="10.0.0.1:/tftpboot/frisbee"))
    _, _, _, _, typ, what, _ = _layout(raw)
    assert typ == 7 and what.startswith(b"10.0.0.1:/tftpboot/frisbee\0")


def test_diskpart_layout():
    raw = codec.reply(BootWhat(BootType.DISKPART, disk=0x80, partition=3))
    _, _, _, _, typ, what, _ = _layout(raw)
    assert typ == 9 and struct.unpack_from("<ii", what) == (0x80, 3)


@pytest.mark.parametrize("bw", [
    BootWhat(BootType.PART, partition=1),
    BootWhat(BootType.SYSID, sysid=131),
    BootWhat(BootType.MB, server="192.168.1.1", filename="kernel", cmdline="a b"),
    BootWhat(BootType.WAIT),
    BootWhat(BootType.REBOOT),
    BootWhat(BootType.AUTO),
    BootWhat(BootType.MFS, mfs="1.1.1.1:/m", cmdline="x" * 223),
    BootWhat(BootType.RESTART),
    BootWhat(BootType.DISKPART, disk=0x81, partition=4),
    BootWhat(BootType.PART, partition=1, flags=codec.FLAG_SECURE),
], ids=lambda b: b.type.name)
def test_round_trip_every_type(bw):
    raw = codec.reply(bw)
    pkt = codec.decode(raw)
    assert (pkt.version, pkt.opcode, pkt.status) == (1, Opcode.REPLY, 0)
    back = pkt.boot_what()
    expect_flags = bw.flags | (codec.FLAG_CMDLINE if bw.cmdline else 0)
    assert back == BootWhat(**{**{f: getattr(bw, f) for f in bw.__slots__},
                               "flags": expect_flags})
    assert codec.encode(pkt) == raw


def test_order_packet():
    raw = codec.reply(BootWhat(BootType.AUTO), opcode=Opcode.ORDER)
    pkt = codec.decode(raw)
    assert pkt.opcode == Opcode.ORDER and pkt.boot_what().type is BootType.AUTO


def test_keyed_request():
    pkt = codec.decode(codec.keyed_request("secret-key-1"))
    assert pkt.opcode == Opcode.KEYED_REQUEST and pkt.key() == "secret-key-1"


@pytest.mark.parametrize("raw", [b"", b"\x01\x00", bytes(519), bytes(521), bytes(1500)])
def test_wrong_sizes_rejected(raw):
    with pytest.raises(CodecError):
        codec.decode(raw)


def test_bad_boot_what_rejected():
    data = bytearray(512)
    struct.pack_into("<hh", data, 0, 0, 42)
    with pytest.raises(CodecError):
        codec.decode_boot_what(bytes(data))
    struct.pack_into("<hh", data, 0, 0, 7)
    data[4:4 + 256] = b"x" * 256  # mfs with no NUL
    with pytest.raises(CodecError):
        codec.decode_boot_what(bytes(data))
    with pytest.raises(CodecError):
        codec.decode_boot_what(bytes(100))


def test_encode_refuses_what_does_not_fit():
    with pytest.raises(CodecError):
        codec.reply(BootWhat(BootType.MFS, mfs="x" * 256))
    with pytest.raises(CodecError):
        codec.reply(BootWhat(BootType.PART, cmdline="y" * 224))
    with pytest.raises(CodecError):
        codec.reply(BootWhat(BootType.MB, server="fs.example", filename="k"))
    with pytest.raises(CodecError):
        codec.reply(BootWhat(BootType.PART, partition=2**40))


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_fuzz_decoder_only_raises_codec_error(raw):
    try:
        pkt = codec.decode(raw)
    except CodecError:
        return
    assert len(raw) == 520
    try:
        pkt.boot_what()
    except CodecError:
        pass
    try:
        pkt.key()
    except CodecError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(-32768, 32767), st.integers(-32768, 32767), st.integers(-2**31, 2**31 - 1),
       st.binary(min_size=512, max_size=512))
def test_fuzz_520_byte_packets(version, opcode, status, data):
    raw = struct.pack("<hhi", version, opcode, status) + data
    pkt = codec.decode(raw)
    assert (pkt.version, pkt.opcode, pkt.status) == (version, opcode, status)
    assert codec.encode(pkt) == raw
    try:
        pkt.boot_what()
    except CodecError:
        pass


_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                max_size=50)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(BootType)), st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1),
       st.ip_addresses(v=4).map(str), _text, _text)
def test_fuzz_round_trip(btype, a, b, ip, name, cmd):
    bw = BootWhat(btype, partition=a, sysid=a, disk=b, server=ip, filename=name, mfs=name,
                  cmdline=cmd)
    back = codec.decode(codec.reply(bw)).boot_what()
    assert back.type is btype and back.cmdline == cmd
    if btype is BootType.MB:
        assert (back.server, back.filename) == (ip, name)
    if btype is BootType.MFS:
        assert back.mfs == name
    if btype is BootType.DISKPART:
        assert (back.disk, back.partition) == (b, a)

"""Emulab's IPOD message and the node's hash (bootherd.ipod): the format, fuzzed."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootherd.ipod import HASH_LEN, checksum, ipod_hash, ipod_packet, parse_ipod


def with_ip_header(icmp: bytes, src: str = "10.0.0.1", dst: str = "10.0.0.2") -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, socket.IPPROTO_ICMP,
                       0, socket.inet_aton(src), socket.inet_aton(dst))
    return head + icmp


def test_the_hash_is_stable_per_secret_and_differs_per_node():
    h = ipod_hash(b"s3cret", "pc1")
    assert len(h) == HASH_LEN and h == ipod_hash(b"s3cret", "pc1")
    assert h != ipod_hash(b"s3cret", "pc2") and h != ipod_hash(b"other", "pc1")
    assert all(c in "0123456789abcdef" for c in h)


def test_the_packet_is_type_6_code_6_carrying_the_hash_with_a_valid_checksum():
    h = ipod_hash(b"s3cret", "pc1")
    pkt = ipod_packet(h)
    assert pkt[0] == 6 and pkt[1] == 6 and pkt[8:] == h.encode()
    assert checksum(pkt) == 0
    assert parse_ipod(pkt, with_ip_header=False) == h
    assert parse_ipod(with_ip_header(pkt)) == h


def test_anything_else_is_not_an_ipod():
    pkt = bytearray(ipod_packet(ipod_hash(b"s", "pc1")))
    assert parse_ipod(bytes(pkt[:-1]), with_ip_header=False) is None  # short
    pkt[9] ^= 1
    assert parse_ipod(bytes(pkt), with_ip_header=False) is None       # checksum
    echo = bytes([8, 0, 0, 0]) + bytes(4) + b"x" * 32
    assert parse_ipod(echo, with_ip_header=False) is None
    with pytest.raises(ValueError, match="32 characters"):
        ipod_packet("abc")


@given(st.binary(max_size=200), st.booleans())
def test_parse_never_raises(data: bytes, header: bool):
    assert parse_ipod(data, with_ip_header=header) in (None,) or len(
        parse_ipod(data, with_ip_header=header)) == HASH_LEN


@given(st.binary(max_size=64))
def test_checksum_of_data_with_its_checksum_is_zero(data: bytes):
    if len(data) % 2:
        data += b"\0"
    c = checksum(data)
    assert checksum(data + struct.pack("!H", c)) == 0

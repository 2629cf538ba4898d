"""Hypothesis fuzz and property tests for bootherd.dhcp.codec."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import ALL_FIXTURES

from bootherd.dhcp.codec import (
    DEFAULT_MANDATORY,
    DhcpMessage,
    EncodeError,
    MalformedPacket,
    classify_client,
    decode,
    encode,
)

ACCESSORS = [
    "message_type", "requested_ip", "lease_time", "server_id", "parameter_request_list",
    "message", "max_message_size", "renewal_time", "rebinding_time", "vendor_class",
    "client_id", "user_class", "relay_agent_info", "client_arch", "client_ndi", "client_guid",
    "hostname", "subnet_mask", "routers", "dns_servers", "domain_name", "broadcast_address",
    "tftp_server_name", "bootfile_name", "pxe_vendor", "ipxe_options", "mac", "broadcast",
    "server_name", "boot_file", "is_pxe_client", "is_ipxe",
]  # fmt: skip

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exercise(data: bytes) -> None:
    """Decode and touch everything; only MalformedPacket may escape."""
    try:
        m = decode(data)
    except MalformedPacket:
        return
    classify_client(m)  # never raises
    repr(m)
    for name in ACCESSORS:
        try:
            getattr(m, name)
        except MalformedPacket:
            pass
    # Whatever decodes re-encodes, and decodes back to the same message.
    again = decode(encode(m, max_message_size=65535))
    assert again == m


@FUZZ
@given(st.binary(max_size=1500))
def test_arbitrary_bytes(data):
    exercise(data)


@FUZZ
@given(st.binary(min_size=236, max_size=400))
def test_arbitrary_bytes_with_cookie(data):
    exercise(data[:236] + b"\x63\x82\x53\x63" + data[236:])


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(ALL_FIXTURES))())
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.sampled_from([0, 1, 52, 53, 255, draw(st.integers(0, 255))]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_valid_packets(data):
    exercise(data)


# --------------------------------------------------------------------------- properties

codes = st.integers(1, 254).filter(lambda c: c != 52)
option_sets = st.dictionaries(codes, st.binary(max_size=600), max_size=12)
addr = st.binary(min_size=4, max_size=4)


@st.composite
def messages(draw, *, empty_fields=False):
    return DhcpMessage(
        op=draw(st.sampled_from([1, 2])),
        htype=draw(st.integers(0, 255)),
        hlen=draw(st.integers(0, 16)),
        hops=draw(st.integers(0, 255)),
        xid=draw(st.integers(0, 2**32 - 1)),
        secs=draw(st.integers(0, 65535)),
        flags=draw(st.integers(0, 65535)),
        ciaddr=draw(addr),
        yiaddr=draw(addr),
        siaddr=draw(addr),
        giaddr=draw(addr),
        chaddr=draw(st.binary(min_size=16, max_size=16)),
        sname=b"" if empty_fields else draw(st.binary(max_size=64)).replace(b"\0", b"x"),
        file=b"" if empty_fields else draw(st.binary(max_size=128)).replace(b"\0", b"x"),
        options=draw(option_sets),
    )


@settings(max_examples=300, deadline=None)
@given(messages(), st.binary(max_size=30))
def test_encode_decode_round_trip(msg, prl):
    out = encode(msg, prl=prl, max_message_size=65535)
    assert decode(out) == msg


@settings(max_examples=300, deadline=None)
@given(
    messages(empty_fields=True),
    st.binary(max_size=30),
    st.one_of(st.none(), st.integers(0, 1600)),
)
def test_size_limit_respected(msg, prl, mms):
    try:
        out = encode(msg, prl=prl, max_message_size=mms)
    except EncodeError:
        kept = {c: v for c, v in msg.options.items() if c in DEFAULT_MANDATORY}
        big = DhcpMessage(options=kept)
        # only legitimate when the mandatory options alone cannot fit 576/mms
        assert sum(len(v) + 2 * (1 + len(v) // 255) for v in kept.values()) > 200 or not big
        return
    limit = max(mms or 576, 576) - 28
    assert len(out) <= limit
    got = decode(out)
    for code, val in got.options.items():
        assert msg.options[code] == val
    for code in DEFAULT_MANDATORY & msg.options.keys():
        assert code in got.options

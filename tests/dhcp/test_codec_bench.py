"""Micro-benchmark: decode a PXE DISCOVER (as iPXE sends it) + build and encode an OFFER.

Run:  .venv/bin/python tests/dhcp/test_codec_bench.py
Under pytest only a smoke run is done (timings are not asserted).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_codec import ipxe_discover_packet, ovmf_discover_packet

from bootherd.dhcp.codec import (
    MessageType,
    classify_client,
    decode,
    encode_ipxe_encap,
    encode_pxe_vendor,
    encode_reply,
    make_reply,
)

SERVER = bytes([10, 0, 0, 1])
# Per-subnet options prepared once by the server, as raw bytes.
OFFER_OPTS = {
    51: (3600).to_bytes(4, "big"),
    58: (1800).to_bytes(4, "big"),
    59: (3150).to_bytes(4, "big"),
    1: bytes([255, 255, 255, 0]),
    3: SERVER,
    6: SERVER,
    15: b"testbed.example",
    28: bytes([10, 0, 0, 255]),
    60: b"PXEClient",
    43: encode_pxe_vendor(discovery_control=8, bootinfo_server=SERVER),
    175: encode_ipxe_encap(),
}


def one(pkt: bytes) -> bytes:
    req = decode(pkt)
    classify_client(req)
    reply = make_reply(
        req,
        MessageType.OFFER,
        yiaddr=bytes([10, 0, 0, 50]),
        siaddr=SERVER,
        server_id=SERVER,
        file=b"http://10.0.0.1/boot.ipxe",
        options=OFFER_OPTS,
    )
    return encode_reply(reply, req)


def bench(n: int = 200_000) -> dict[str, float]:
    pkt = ipxe_discover_packet()
    req = decode(pkt)
    reply = make_reply(req, 2, yiaddr=bytes([10, 0, 0, 50]), siaddr=SERVER, server_id=SERVER,
                       file=b"http://10.0.0.1/boot.ipxe", options=OFFER_OPTS)  # fmt: skip
    ovmf = ovmf_discover_packet()

    def offer() -> object:
        return make_reply(
            req, 2, yiaddr=bytes([10, 0, 0, 50]), siaddr=SERVER, server_id=SERVER,
            options=OFFER_OPTS,
        )  # fmt: skip

    res = {}
    for name, fn in [
        ("decode iPXE DISCOVER", lambda: decode(pkt)),
        ("decode OVMF DISCOVER", lambda: decode(ovmf)),
        ("classify_client", lambda: classify_client(req)),
        ("make_reply OFFER", offer),
        ("encode_reply OFFER", lambda: encode_reply(reply, req)),
        ("full: decode+classify+make_reply+encode", lambda: one(pkt)),
    ]:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n // 5):
                fn()
            best = min(best, (time.perf_counter() - t0) / (n // 5))
        res[name] = best * 1e6
    return res


def test_bench_smoke():
    out = one(ipxe_discover_packet())
    assert decode(out).message_type is MessageType.OFFER
    assert bench(50)


if __name__ == "__main__":
    for name, us in bench().items():
        print(f"{name:42s} {us:6.2f} µs  ({1e6 / us:,.0f}/s)")

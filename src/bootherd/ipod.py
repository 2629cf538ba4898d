"""Emulab's IPOD ("ICMP ping of death"): a soft reboot a node's kernel obeys.

A node whose OS runs Emulab's IPOD module (enabled by its rc scripts with the
values of TMCD's `ipodinfo`: HOST, MASK, HASH) reboots at once when it receives
an ICMP message of type 6, code 6, from an address within HOST/MASK, whose data
starts with its 32-character HASH.  It is the ladder's soft step for a node whose
OS is up: cheaper and faster than a power cycle, and it works when the node's
userland is wedged but its kernel still answers the network.

The packet format and the hash (tied to the server's IPOD secret and the node
id, so one node's hash reboots no other node) are plain functions, fuzzed in
tests/core/test_ipod.py; the sender is a thin asyncio wrapper around a raw socket
(root, or CAP_NET_RAW).  `ping` is the "is it answering?" check that comes first.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import Callable

IPOD_TYPE = 6
IPOD_CODE = 6
HASH_LEN = 32
ECHO_REQUEST, ECHO_REPLY = 8, 0


def ipod_hash(secret: bytes, node_id: str) -> str:
    """The node's IPOD hash: 32 hex characters, stable for one secret (TMCD `ipodinfo`)."""
    return hmac.new(secret, node_id.encode(), hashlib.sha256).hexdigest()[:HASH_LEN]


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmp(kind: int, code: int, rest: bytes, payload: bytes) -> bytes:
    head = struct.pack("!BBH", kind, code, 0) + rest
    csum = checksum(head + payload)
    return struct.pack("!BBH", kind, code, csum) + rest + payload


def ipod_packet(hash_: str) -> bytes:
    """The ICMP message (no IP header) that reboots the node holding `hash_`."""
    key = hash_.encode("ascii")
    if len(key) != HASH_LEN:
        raise ValueError(f"an IPOD hash has {HASH_LEN} characters, not {len(key)}")
    return _icmp(IPOD_TYPE, IPOD_CODE, b"\0\0\0\0", key)


def parse_ipod(datagram: bytes, with_ip_header: bool = True) -> str | None:
    """The hash an IPOD message carries, or None for anything else (another ICMP
    type, a bad checksum, a short or malformed packet).  Never raises."""
    data = datagram
    if with_ip_header:
        if len(data) < 20 or data[0] >> 4 != 4 or data[9] != socket.IPPROTO_ICMP:
            return None
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20 or len(data) < ihl:
            return None
        data = data[ihl:]
    if len(data) < 8 + HASH_LEN or data[0] != IPOD_TYPE or data[1] != IPOD_CODE \
            or checksum(data) != 0:
        return None
    key = data[8:8 + HASH_LEN]
    try:
        return key.decode("ascii")
    except UnicodeDecodeError:
        return None


def echo_request(ident: int, seq: int) -> bytes:
    return _icmp(ECHO_REQUEST, 0, struct.pack("!HH", ident & 0xFFFF, seq & 0xFFFF),
                 b"bootherd-ladder")


def _is_reply(datagram: bytes, ip: str, ident: int) -> bool:
    """An echo reply from `ip` to our `ident` (a raw socket sees every ICMP message)."""
    if len(datagram) < 28 or datagram[9] != socket.IPPROTO_ICMP:
        return False
    ihl = (datagram[0] & 0x0F) * 4
    icmp = datagram[ihl:]
    return (len(icmp) >= 8 and icmp[0] == ECHO_REPLY and socket.inet_ntoa(datagram[12:16]) == ip
            and struct.unpack("!H", icmp[4:6])[0] == ident & 0xFFFF)


class Ipod:
    """Sends IPODs and pings from `source` (the address nodes know as IPOD HOST).

    One raw socket per call: IPODs are rare (a soft reboot), and a socket per
    call cannot be confused by another call's replies.  `secret` may be a
    function: the secret file is then read at the first IPOD, not at start."""

    def __init__(self, secret: bytes | Callable[[], bytes], source: str = ""):
        self._secret = secret
        self.source = source

    @property
    def secret(self) -> bytes:
        if callable(self._secret):
            self._secret = self._secret()
        return self._secret

    def _socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            if self.source:
                s.bind((self.source, 0))
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    def send(self, node_id: str, ip: str, copies: int = 2) -> str:
        """Send the node's IPOD (twice: one datagram may be lost).  Raises OSError
        (no CAP_NET_RAW, no route).  Returns a one-line report."""
        pkt = ipod_packet(ipod_hash(self.secret, node_id))
        with self._socket() as s:
            for _ in range(copies):
                s.sendto(pkt, (ip, 0))
        return f"IPOD sent to {node_id} at {ip}"

    async def ping(self, ip: str, timeout: float = 1.0, tries: int = 2) -> bool:
        """Does `ip` answer an ICMP echo within `timeout` (per try)?  Raises OSError
        when the raw socket cannot be opened."""
        loop = asyncio.get_running_loop()
        ident = (os.getpid() ^ id(self) ^ int(time.monotonic() * 1000)) & 0xFFFF
        with self._socket() as s:
            for seq in range(tries):
                # A plain sendto (non-blocking; a full buffer is an OSError): uvloop,
                # the server's loop, has no sock_sendto.
                s.sendto(echo_request(ident, seq), (ip, 0))
                deadline = loop.time() + timeout
                while (left := deadline - loop.time()) > 0:
                    try:
                        data = await asyncio.wait_for(loop.sock_recv(s, 2048), left)
                    except TimeoutError:
                        break
                    if _is_reply(data, ip, ident):
                        return True
        return False

"""Client sides of the boot protocols, with firmware timers, for virtual nodes.

Each function plays one exchange the way the real client does (timeouts,
retransmissions, what it accepts) using the project's codecs, and counts
requests (per protocol) and retries (per phase) in the node's `Tally`.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..bootinfo import codec as bcodec
from ..boottype import BootType
from ..dhcp.codec import DhcpMessage, MalformedPacket, decode, encode
from ..dhcp.options import MessageType
from ..policy import url_host
from ..tftp import core as tftp
from .net import Endpoint, Loss, open_udp, socket_for

# Firmware timers (the original note and the PXE spec).
PXE_DISCOVER_TIMEOUTS = (4.0, 8.0, 16.0, 32.0)
PXE_REQUEST_TIMEOUTS = (4.0, 8.0)
PROXY_TIMEOUTS = (1.0, 2.0, 3.0, 4.0)
OS_DHCP_TIMEOUTS = (3.0, 6.0, 12.0, 24.0)  # dhclient-like backoff
TFTP_TIMEOUTS = (1.0, 2.0, 2.0, 2.0, 2.0, 2.0)  # first try + 5 retransmissions
BOOTINFO_TIMEOUTS = (1.0, 2.0, 4.0, 8.0)
TMCD_TIMEOUT = 10.0
TMCD_TRIES = 3
SYN_RTO = 1.0  # Linux initial TCP retransmission timeout
# A relay socket takes every answer to its worker's nodes: a power-on burst's 5,000
# OFFERs (1,280 bytes each in the queue on loopback) while the worker's loop is busy,
# and again at each later DHCP.
RELAY_RCVBUF = 64 * 2**20

PXE_VENDOR_CLASS = b"PXEClient:Arch:00000:UNDI:002001"
PXE_PRL = bytes([1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54,
                 58, 59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135])
OS_PRL = bytes([1, 3, 6, 12, 15, 28, 42, 51, 54, 58, 59, 119])


@dataclass
class Tally:
    """What one node sent: requests per protocol, retries per phase."""

    requests: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    by_protocol: Counter = field(default_factory=Counter)  # retries by "phase/protocol"
    latency: dict[str, list[float]] = field(default_factory=dict)  # exchange times
    phase: str = ""

    def took(self, what: str, seconds: float) -> None:
        self.latency.setdefault(what, []).append(seconds)

    def retry(self, protocol: str) -> None:
        self.retries[self.phase] += 1
        self.by_protocol[f"{self.phase}/{protocol}"] += 1


class ProtocolFailure(Exception):
    """An exchange that failed after all the client's retries; the text says why."""


class WaitTimeout(ProtocolFailure):
    """Told WAIT by bootinfo and no ORDER came (the node is not allocated)."""


# --------------------------------------------------------------------------- DHCP


class DhcpRelay:
    """One relay-agent socket shared by all nodes of a process.

    Requests go out with giaddr = the relay's address; servers send replies to
    giaddr:relay_port, and they are handed to the waiting node by xid."""

    def __init__(self, ep: Endpoint, address: str):
        self.ep = ep
        self.address = address
        self.waiting: dict[int, Endpoint] = {}
        self.stray = 0
        ep.datagram_received = self._received  # type: ignore[method-assign]

    @classmethod
    async def open(cls, loss: Loss, address: str, port: int) -> DhcpRelay:
        # SO_REUSEADDR: a peer such as dnsmasq holds the wildcard address on this port.
        ep = await open_udp(loss, address, port, reuse=True, rcvbuf=RELAY_RCVBUF)
        return cls(ep, address)

    def _received(self, data: bytes, addr: tuple) -> None:
        if len(data) < 240 or self.ep.loss.drop_in():
            return
        (xid,) = struct.unpack_from("!I", data, 4)
        box = self.waiting.get(xid)
        if box is None:
            self.stray += 1  # a late answer to a node that gave up or moved on
            return
        box.datagram_received(data, addr)

    def close(self) -> None:
        self.ep.close()


def _opt_ip(raw: bytes | None) -> bytes | None:
    return raw if raw is not None and len(raw) == 4 else None


class DhcpClient:
    """DISCOVER/OFFER/REQUEST/ACK through the relay for one node.

    ``server`` may be a list: the relay then forwards every request to each of them (a
    relay with several helper addresses); the client takes the first offer, and its
    REQUEST, naming that server, reaches the others too (they stay silent)."""

    def __init__(self, relay: DhcpRelay, loss: Loss,
                 server: tuple[str, int] | list[tuple[str, int]], mac: bytes,
                 uuid: bytes, tally: Tally):
        self.relay = relay
        self.servers = list(server) if isinstance(server, list) else [server]
        self.server = self.servers[0]
        self.mac = mac
        self.uuid = uuid
        self.tally = tally
        self.box = Endpoint(Loss(0.0))  # loss is applied once, by the relay socket
        self.loss = loss

    def _message(self, mtype: int, xid: int, kind: str, secs: int,
                 extra: dict[int, bytes] | None = None) -> bytes:
        opts: dict[int, bytes] = {53: bytes([mtype])}
        if kind == "os":
            opts[12] = b"node-" + self.mac.hex().encode()
            opts[55] = OS_PRL
        else:
            opts[57] = (1472).to_bytes(2, "big")
            opts[55] = PXE_PRL
            opts[60] = PXE_VENDOR_CLASS
            opts[93] = b"\x00\x00"
            opts[94] = b"\x01\x02\x01"
            opts[97] = b"\x00" + self.uuid
        if extra:
            opts.update(extra)
        msg = DhcpMessage(xid=xid, secs=secs, hops=1, giaddr=self.relay.address,
                          chaddr=self.mac, options=opts)
        return encode(msg)

    def _send(self, data: bytes) -> None:
        self.tally.requests["dhcp"] += 1
        for server in self.servers:
            if not self.loss.drop_out():
                self.relay.ep.transport.sendto(data, server)  # type: ignore[union-attr]

    async def _await(self, xid: int, want: set[int], timeout: float) -> DhcpMessage | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            got = await self.box.recv(left)
            if got is None:
                return None
            try:
                msg = decode(got[0])
            except MalformedPacket:
                continue
            t = msg.options.get(53)
            if msg.xid != xid or msg.mac != self.mac or not t or t[0] not in want:
                continue
            return msg

    async def dora(self, kind: str, discover_timeouts: tuple[float, ...],
                   request_timeouts: tuple[float, ...]) -> DhcpMessage:
        """A full exchange; returns the ACK.  Raises ProtocolFailure when every try timed out."""
        xid = random.getrandbits(32)
        self.relay.waiting[xid] = self.box
        t0 = asyncio.get_running_loop().time()
        try:
            ack = await self._dora(xid, t0, kind, discover_timeouts, request_timeouts)
            self.tally.took("dhcp", asyncio.get_running_loop().time() - t0)
            return ack
        finally:
            self.relay.waiting.pop(xid, None)

    async def _dora(self, xid: int, t0: float, kind: str, discover_timeouts: tuple[float, ...],
                    request_timeouts: tuple[float, ...]) -> DhcpMessage:
        for i, timeout in enumerate(discover_timeouts):
            if i:
                self.tally.retry("dhcp")
            secs = int(asyncio.get_running_loop().time() - t0)
            self._send(self._message(MessageType.DISCOVER, xid, kind, secs))
            offer = await self._await(xid, {MessageType.OFFER, MessageType.ACK}, timeout)
            if offer is None:
                continue
            if offer.options[53][0] == MessageType.ACK:  # BOOTP-like: no REQUEST needed
                return offer
            sid = _opt_ip(offer.options.get(54)) or offer.siaddr
            extra = {50: offer.yiaddr, 54: sid}
            for j, rt in enumerate(request_timeouts):
                if j:
                    self.tally.retry("dhcp")
                secs = int(asyncio.get_running_loop().time() - t0)
                self._send(self._message(MessageType.REQUEST, xid, kind, secs, extra))
                ack = await self._await(xid, {MessageType.ACK, MessageType.NAK}, rt)
                if ack is None:
                    continue
                if ack.options[53][0] == MessageType.NAK:
                    break  # start over with a DISCOVER
                return ack
        raise ProtocolFailure(f"dhcp {kind}: no answer after {len(discover_timeouts)} "
                              "DISCOVERs")

    async def proxy_request(self, loss: Loss, ip: str, client_port: int,
                            server: tuple[str, int]) -> DhcpMessage:
        """The legacy PXE step 3: REQUEST to the proxyDHCP port for the boot file."""
        xid = random.getrandbits(32)
        try:
            ep = await open_udp(loss, ip, client_port, reuse=True)
        except OSError:
            ep = await open_udp(loss, ip, 0)  # not root: any port; the server answers the source
        try:
            opts: dict[int, bytes] = {53: bytes([MessageType.REQUEST]), 57: (1472).to_bytes(2, "big"),
                                      55: PXE_PRL, 60: PXE_VENDOR_CLASS, 93: b"\x00\x00",
                                      94: b"\x01\x02\x01", 97: b"\x00" + self.uuid}
            data = encode(DhcpMessage(xid=xid, ciaddr=ip, chaddr=self.mac, options=opts))
            for i, timeout in enumerate(PROXY_TIMEOUTS):
                if i:
                    self.tally.retry("proxydhcp")
                self.tally.requests["proxydhcp"] += 1
                ep.send(data, server)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                while (left := deadline - loop.time()) > 0:
                    got = await ep.recv(left)
                    if got is None:
                        break
                    try:
                        msg = decode(got[0])
                    except MalformedPacket:
                        continue
                    if msg.xid == xid and msg.options.get(53, b"\x00")[0] == MessageType.ACK:
                        return msg
            raise ProtocolFailure("proxydhcp: no answer after 4 REQUESTs")
        finally:
            ep.close()


# --------------------------------------------------------------------------- TFTP


async def tftp_get(loss: Loss, ip: str, server: tuple[str, int], filename: str,
                   options: dict[str, str], tally: Tally, probe: bool = False) -> int:
    """Read `filename`; returns its size.  With `probe`, stop after the OACK with
    ERROR 8 (what PXE firmware does with tsize=0) and return the announced tsize
    (or 0).  Raises ProtocolFailure (timeouts, ERROR from the server)."""
    ep = await open_udp(loss, ip, 0)
    t0 = time.monotonic()
    try:
        size = await _tftp_get(ep, server, filename, options, tally, probe)
        tally.took("tftp_probe" if probe else "tftp", time.monotonic() - t0)
        return size
    finally:
        ep.close()


async def _tftp_get(ep: Endpoint, server: tuple[str, int], filename: str,
                    options: dict[str, str], tally: Tally, probe: bool) -> int:
    rrq = tftp.encode_request(tftp.RRQ, filename, "octet", options)
    peer: tuple | None = None
    blksize, window = 512, 1
    last = 0  # last block received in order (absolute count, no wrap)
    since_ack = 0
    size = 0
    out = rrq
    dest = server
    tries = 0
    tally.requests["tftp"] += 1
    ep.send(out, dest)
    while True:
        got = await ep.recv(TFTP_TIMEOUTS[min(tries, len(TFTP_TIMEOUTS) - 1)])
        if got is None:
            tries += 1
            if tries >= len(TFTP_TIMEOUTS):
                raise ProtocolFailure(f"tftp {filename}: timed out after {tries} tries "
                                      f"(block {last})")
            tally.retry("tftp")
            if peer is None:
                tally.requests["tftp"] += 1
            ep.send(out, dest)
            continue
        data, addr = got
        if peer is not None and addr != peer:
            ep.send(tftp.encode_error(tftp.ERR_UNKNOWN_TID, "unknown transfer id"), addr)
            continue
        try:
            pkt = tftp.parse_packet(data)
        except tftp.MalformedPacket:
            continue
        if peer is None:
            if addr[0] != server[0]:
                continue
            peer = dest = addr
        if isinstance(pkt, tftp.Error):
            raise ProtocolFailure(f"tftp {filename}: ERROR {pkt.code} {pkt.message}")
        if isinstance(pkt, tftp.OAck):
            if last:
                continue
            if probe:
                ep.send(tftp.encode_error(tftp.ERR_OPTIONS, "tsize probe done"), peer)
                return int(pkt.options.get("tsize", "0") or 0)
            blksize = int(pkt.options.get("blksize", "512"))
            window = int(pkt.options.get("windowsize", "1"))
            out = tftp.encode_ack(0)
            tries = 0
            ep.send(out, peer)
            continue
        if isinstance(pkt, tftp.Data):
            if probe:  # server ignored the options: abort the transfer
                ep.send(tftp.encode_error(tftp.ERR_UNDEFINED, "probe done"), peer)
                return 0
            if pkt.block == (last + 1) & 0xFFFF:
                last += 1
                size += len(pkt.payload)
                since_ack += 1
                tries = 0
                if len(pkt.payload) < blksize:
                    ep.send(tftp.encode_ack(last), peer)
                    return size
                if since_ack >= window:
                    out = tftp.encode_ack(last)
                    since_ack = 0
                    ep.send(out, peer)
            elif since_ack or pkt.block == last & 0xFFFF:
                # A gap in the window (or a repeated block): ack what we have so
                # the server resends from there; once per window.
                out = tftp.encode_ack(last)
                since_ack = 0
                ep.send(out, peer)


# --------------------------------------------------------------------------- bootinfo


async def bootinfo_ask(ep: Endpoint, server: tuple[str, int], order_port: int, tally: Tally,
                       wait_timeout: float, on_wait: Callable[[], None] | None = None,
                       poll: float = 0.0) -> bcodec.BootWhat:
    """Ask until answered; a WAIT answer waits for an ORDER (AUTO: ask again).

    `poll` > 0: a waiting loader asks again after that many seconds without an ORDER (with
    several servers, the one that said WAIT may be gone).  Returns the final BootWhat
    (REBOOT/RESTART orders come back as such)."""
    req = bcodec.request()
    loop = asyncio.get_running_loop()
    wait_until: float | None = None
    while True:
        answer: bcodec.BootWhat | None = None
        for i, timeout in enumerate(BOOTINFO_TIMEOUTS):
            if i:
                tally.retry("bootinfo")
            tally.requests["bootinfo"] += 1
            ep.send(req, server)
            got = await _bootinfo_recv(ep, server[0], {server[1]: bcodec.Opcode.REPLY}, timeout)
            if got is not None:
                answer = got[1]
                break
        if answer is None:
            raise ProtocolFailure(f"bootinfo: no answer after {len(BOOTINFO_TIMEOUTS)} requests")
        if answer.type != BootType.WAIT:
            return answer
        if on_wait is not None:
            on_wait()
        if wait_until is None:
            wait_until = loop.time() + wait_timeout
        # Waiting, a loader takes an ORDER from the order port, and also a REPLY from the
        # server's port: the late answer to a retransmitted question, which the server
        # may have decided after the node was allocated (it then counts the node as
        # booting and sends no ORDER).
        accept = {order_port: bcodec.Opcode.ORDER, server[1]: bcodec.Opcode.REPLY}
        poll_until = loop.time() + poll if poll > 0 else wait_until
        while True:
            got = await _bootinfo_recv(ep, server[0], accept,
                                       min(wait_until, poll_until) - loop.time())
            # A REPLY of WAIT again (a later copy of the first answer): keep waiting.
            if got is None or got[0] != bcodec.Opcode.REPLY or got[1].type != BootType.WAIT:
                break
        if got is None:
            if poll > 0 and loop.time() < wait_until:
                continue  # ask again: it may have changed its mind, or be another server
            raise WaitTimeout(f"bootinfo: told WAIT, no ORDER within {wait_timeout:.0f}s")
        opcode, order = got
        if opcode == bcodec.Opcode.REPLY or order.type != BootType.AUTO:
            return order


async def _bootinfo_recv(ep: Endpoint, host: str, accept: dict[int, int],
                         timeout: float) -> tuple[int, bcodec.BootWhat] | None:
    """The next packet a loader accepts, as (opcode, BootWhat): from its server, from a
    port in `accept` with that port's opcode, of the exact size, status 0."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        got = await ep.recv(left)
        if got is None:
            return None
        data, addr = got
        if addr[0] != host or addr[1] not in accept or len(data) != bcodec.PACKET_SIZE:
            continue
        try:
            pkt = bcodec.decode(data)
            if pkt.opcode != accept[addr[1]] or pkt.status != bcodec.STATUS_OK:
                continue
            return pkt.opcode, pkt.boot_what()
        except bcodec.CodecError:
            continue
    return None


# --------------------------------------------------------------------------- TCP (TMCD, HTTP)


async def tcp_connect(loss: Loss, ip: str, server: tuple[str, int], tally: Tally,
                      timeout: float = 10.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect from `ip`; injected loss is a lost SYN: wait the TCP retransmission
    timeout (1 s, doubling), counted as a retry."""
    rto = SYN_RTO
    while loss.drop_out():
        tally.retry("tcp_syn")
        await asyncio.sleep(rto)
        rto *= 2
    t0 = time.monotonic()
    conn = await asyncio.wait_for(
        asyncio.open_connection(server[0], server[1], local_addr=(ip, 0)), timeout)
    tally.took("tcp_connect", time.monotonic() - t0)
    return conn


async def tmcd_request(loss: Loss, ip: str, servers: list[tuple[str, int]], line: bytes,
                       tally: Tally, failover: bool = False) -> bytes:
    """One TMCD request over TCP (tmcc: try the ports in order, retry on timeout).

    `failover`: the addresses are several servers; a timeout moves on to the next too."""
    last_error = ""
    for attempt in range(TMCD_TRIES):
        if attempt:
            tally.retry("tmcd")
        for server in servers:
            tally.requests["tmcd"] += 1
            try:
                reader, writer = await tcp_connect(loss, ip, server, tally, TMCD_TIMEOUT)
            except ConnectionRefusedError:
                last_error = f"{server[0]}:{server[1]} refused"
                continue  # tmcc moves to the fallback port only when refused
            except (TimeoutError, OSError) as e:
                last_error = f"connect {server[0]}:{server[1]}: {e or 'timeout'}"
                if failover:
                    continue
                break
            try:
                t0 = time.monotonic()
                writer.write(line)
                reply = await asyncio.wait_for(reader.read(-1), TMCD_TIMEOUT)
                tally.took("tmcd", time.monotonic() - t0)
                return reply
            except (TimeoutError, OSError, RuntimeError) as e:
                # RuntimeError: uvloop's write on a connection the server reset (it died).
                last_error = f"{line.decode(errors='replace').split()[1:2]}: {e or 'timeout'}"
                if failover:
                    continue
                break
            finally:
                writer.close()
    raise ProtocolFailure(f"tmcd: {last_error}")


async def _raw_connect(loss: Loss, ip: str, server: tuple[str, int], tally: Tally,
                       timeout: float = 10.0) -> socket.socket:
    """A plain non-blocking socket (bulk bodies: recv_into one buffer, no stream copies)."""
    rto = SYN_RTO
    while loss.drop_out():
        tally.retry("tcp_syn")
        await asyncio.sleep(rto)
        rto *= 2
    sock = socket_for(ip, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind((ip, 0))
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, server), timeout)
        tally.took("tcp_connect", time.monotonic() - t0)
    except BaseException:
        sock.close()
        raise
    return sock


_BUF = bytearray(1 << 20)  # one body sink per process: the bytes are counted, never kept


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def _discard(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float) -> int:
    """Up to len(_BUF) body bytes, counted and dropped by the kernel (MSG_TRUNC: no copy
    into user space), 0 at the end of the stream.  A real node copies its download on its
    own CPU; the simulator shares the server's, and copying 10,000 nodes' 50 GB took more
    of it than the server spent sending them."""
    while True:
        try:
            return sock.recv_into(_BUF, len(_BUF), socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            pass
        ready = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, _wake, ready)
        try:
            await asyncio.wait_for(ready, timeout)
        finally:
            loop.remove_reader(fd)


async def http_get(loss: Loss, ip: str, server: tuple[str, int], path: str, tally: Tally,
                   max_tries: int = 30, alternates: list[tuple[str, int]] | None = None) -> int:
    """GET a file; follows 503 + Retry-After and resumes broken bodies with Range.

    `alternates`: other servers with the same files, tried in turn when a connection
    fails (the rest of a broken body is fetched from the next one with Range)."""
    order = [server] + [a for a in (alternates or []) if a != server]
    turn = 0
    loop = asyncio.get_running_loop()
    got = 0
    tries = 0
    t_start = time.monotonic()
    while True:
        tries += 1
        if tries > max_tries:
            raise ProtocolFailure(f"http {path}: gave up after {max_tries} tries")
        if tries > 1:
            tally.retry("http")
        tally.requests["http"] += 1
        try:
            sock = await _raw_connect(loss, ip, server, tally)
        except (TimeoutError, OSError):
            if len(order) > 1:
                turn += 1
                server = order[turn % len(order)]
                await asyncio.sleep(0.2)
                continue
            await asyncio.sleep(1.0)
            continue
        try:
            req = (f"GET {path} HTTP/1.1\r\nHost: {url_host(server[0])}:{server[1]}\r\n"
                   "User-Agent: bootherd-storm\r\nConnection: close\r\n")
            if got:
                req += f"Range: bytes={got}-\r\n"
            await loop.sock_sendall(sock, (req + "\r\n").encode())
            head = b""
            while b"\r\n\r\n" not in head:
                # Its own buffer: other nodes write into the shared sink meanwhile.
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 30.0)
                if not chunk:
                    raise ConnectionResetError("closed before the headers ended")
                head += chunk
            head, _, body = head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (h.partition(":") for h in lines[1:] if h)}
            if status == 503:
                await asyncio.sleep(float(headers.get("retry-after", "1") or 1))
                continue
            if status == 200:
                got = 0
                total = int(headers.get("content-length", "-1"))
            elif status == 206:
                total = int(headers.get("content-range", "*/-1").rsplit("/", 1)[1])
            else:
                raise ProtocolFailure(f"http {path}: {status}")
            got += len(body)
            while total < 0 or got < total:
                n = await _discard(loop, sock, 30.0)
                if not n:
                    break
                got += n
            if total < 0 or got >= total:
                tally.took("http", time.monotonic() - t_start)
                return got
        except (TimeoutError, OSError, ValueError, IndexError):
            if len(order) > 1:
                turn += 1
                server = order[turn % len(order)]
            await asyncio.sleep(0.5)  # broken connection: resume with Range
        finally:
            sock.close()


def node_uuid(mac: bytes) -> bytes:
    """A stable SMBIOS-like UUID per node (option 97)."""
    return (mac * 3)[:16] if mac else os.urandom(16)

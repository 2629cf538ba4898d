"""A small asyncio TFTP read client (tests, benchmarks, diagnostics).

Behaves like boot firmware: fixed source port for the whole exchange, per-packet
timeout with a bounded number of retries, RFC 2347/2348/2349/7440 options.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from . import core


class TFTPError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"TFTP error {code}: {message}")
        self.code = code
        self.message = message


class TFTPTimeout(TFTPError):
    def __init__(self, message: str = "timeout"):
        super().__init__(-1, message)


@dataclass
class FetchResult:
    size: int = 0
    blocks: int = 0
    options: dict[str, str] = field(default_factory=dict)  # from the OACK
    sha256: str = ""
    data: bytes | None = None
    retries: int = 0  # retransmissions by the client
    busy_retries: int = 0  # "server busy" answers that were retried


class _ReadProtocol(asyncio.DatagramProtocol):
    def __init__(
        self,
        server: tuple[str, int],
        rrq: bytes,
        *,
        want_options: bool,
        timeout: float,
        retries: int,
        keep: bool,
        digest: bool,
        drop: Callable[[int], bool] | None,
        ack_oack: bool,
    ):
        self.loop = asyncio.get_running_loop()
        self.server = server
        self.rrq = rrq
        self.want_options = want_options
        self.timeout = timeout
        self.retries = retries
        self.keep = keep
        self.hash = hashlib.sha256() if digest else None
        self.chunks: list[bytes] = []
        self.drop = drop
        self.ack_oack = ack_oack
        self.tid: tuple[str, int] | None = None
        self.blksize = core.DEFAULT_BLKSIZE
        self.windowsize = 1
        self.expected = 1
        self.since_ack = 0
        self.reacked = False
        self.size = 0
        self.result = FetchResult()
        self.last_packet = rrq
        self.last_dest = server
        self.last_activity = 0.0
        self.attempts = 0
        self.future: asyncio.Future = self.loop.create_future()
        self.transport = None
        self.timer = None

    def connection_made(self, transport):
        self.transport = transport
        self.last_activity = self.loop.time()
        transport.sendto(self.rrq, self.server)
        self.timer = self.loop.call_at(self.last_activity + self.timeout, self._on_timer)

    def _done(self, exc: Exception | None = None):
        if self.future.done():
            return
        if self.timer is not None:
            self.timer.cancel()
        if exc is not None:
            self.future.set_exception(exc)
        else:
            r = self.result
            r.size = self.size
            r.blocks = self.expected - 1
            if self.hash is not None:
                r.sha256 = self.hash.hexdigest()
            if self.keep:
                r.data = b"".join(self.chunks)
            self.future.set_result(r)

    def _send(self, pkt: bytes):
        self.last_packet = pkt
        self.last_dest = self.tid
        self.transport.sendto(pkt, self.tid)

    def datagram_received(self, data: bytes, addr):
        if self.future.done():
            return
        if self.tid is None:
            if addr[0] != self.server[0]:
                return
            self.tid = addr
        elif addr != self.tid:
            self.transport.sendto(core.encode_error(core.ERR_UNKNOWN_TID, "unknown TID"), addr)
            return
        if len(data) < 4 or data[0] != 0:
            return
        op = data[1]
        if op == core.DATA:
            self.last_activity = self.loop.time()
            wire = (data[2] << 8) | data[3]
            expected = self.expected
            if wire == expected & 0xFFFF:
                if self.drop is not None and self.drop(expected):
                    return
                payload = data[4:]
                n = len(payload)
                if n > self.blksize:
                    self._send(core.encode_error(core.ERR_ILLEGAL_OP, "block too large"))
                    self._done(TFTPError(core.ERR_ILLEGAL_OP, "block too large"))
                    return
                self.size += n
                if self.hash is not None:
                    self.hash.update(payload)
                if self.keep:
                    self.chunks.append(payload)
                self.expected = expected + 1
                self.attempts = 0
                self.reacked = False
                self.since_ack += 1
                if n < self.blksize:
                    self._send(core.encode_ack(expected))
                    self._done()
                elif self.since_ack >= self.windowsize:
                    self.since_ack = 0
                    self._send(core.encode_ack(expected))
            elif self.windowsize == 1 or not self.reacked:
                # duplicate or gap: acknowledge the last block received in order
                self.reacked = True
                self.since_ack = 0
                if expected > 1 or not self.want_options or self.result.options:
                    self._send(core.encode_ack(expected - 1))
        elif op == core.OACK:
            self.last_activity = self.loop.time()
            if self.expected > 1:
                return
            try:
                pkt = core.parse_packet(data)
            except core.MalformedPacket:
                return
            if not self.want_options:
                self._send(core.encode_error(core.ERR_OPTIONS, "no options requested"))
                self._done(TFTPError(core.ERR_OPTIONS, "unexpected OACK"))
                return
            self.result.options = pkt.options
            self.blksize = int(pkt.options.get("blksize", core.DEFAULT_BLKSIZE))
            self.windowsize = int(pkt.options.get("windowsize", 1))
            if not self.ack_oack:
                return  # simulate a client that does not understand OACK
            self._send(core.encode_ack(0))
        elif op == core.ERROR:
            try:
                pkt = core.parse_packet(data)
            except core.MalformedPacket:
                pkt = core.Error(0, "malformed error")
            self._done(TFTPError(pkt.code, pkt.message))

    def _on_timer(self):
        self.timer = None
        if self.future.done():
            return
        now = self.loop.time()
        due = self.last_activity + self.timeout
        if now < due:
            self.timer = self.loop.call_at(due, self._on_timer)
            return
        if self.attempts >= self.retries:
            self._done(TFTPTimeout())
            return
        self.attempts += 1
        self.result.retries += 1
        self.last_activity = now
        self.since_ack = 0
        self.transport.sendto(self.last_packet, self.last_dest)
        self.timer = self.loop.call_at(now + self.timeout, self._on_timer)

    def error_received(self, exc):
        pass


async def fetch(
    host: str,
    port: int,
    filename: str,
    *,
    mode: str = "octet",
    options: dict[str, str | int] | None = None,
    timeout: float = 2.0,
    retries: int = 5,
    keep: bool = True,
    digest: bool = True,
    local_addr: tuple[str, int] | None = None,
    drop: Callable[[int], bool] | None = None,
    ack_oack: bool = True,
    busy_retries: int = 20,
    busy_delay: float = 0.2,
) -> FetchResult:
    """Download ``filename``; retries "server busy" answers like firmware would."""
    loop = asyncio.get_running_loop()
    opts = {k: str(v) for k, v in (options or {}).items()}
    rrq = core.encode_request(core.RRQ, filename, mode, opts)
    busy = 0
    while True:
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _ReadProtocol(
                (host, port),
                rrq,
                want_options=bool(opts),
                timeout=timeout,
                retries=retries,
                keep=keep,
                digest=digest,
                drop=drop,
                ack_oack=ack_oack,
            ),
            local_addr=local_addr or (("::" if ":" in host else "0.0.0.0"), 0),
        )
        try:
            result = await proto.future
            result.busy_retries = busy
            return result
        except TFTPError as exc:
            if exc.code == 0 and "busy" in exc.message and busy < busy_retries:
                busy += 1
                await asyncio.sleep(busy_delay)
                continue
            raise
        finally:
            transport.close()
            if local_addr and local_addr[1]:
                await asyncio.sleep(0)  # let the loop release the fixed port

"""An in-memory imaging network for the core tests: one Server, N Receivers, a fake
clock, datagrams delivered (or dropped) at once.  No sockets, no files."""

from __future__ import annotations

import os
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from bootherd.imaging import format as fmt
from bootherd.imaging import receiver as rc
from bootherd.imaging import sessions as sv


def make_image(tmp: Path, size: int = 6 << 20, seed: int = 1, chunk: int = 1 << 20) -> Path:
    """A disk with compressible text, random data and zero chunks."""
    rng = random.Random(seed)
    disk = bytearray(size)
    words = [bytes(rng.choice(b"abcdefghij ") for _ in range(rng.randint(2, 9))) for _ in range(300)]
    pos = 0
    while pos < size // 3:
        w = rng.choice(words) + b" "
        disk[pos:pos + len(w)] = w
        pos += len(w)
    rnd = rng.randbytes(size // 4)
    disk[size // 2:size // 2 + len(rnd)] = rnd
    src = tmp / f"disk{seed}.raw"
    src.write_bytes(bytes(disk[:size]))
    out = tmp / f"img{seed}.bhimg"
    fd = os.open(src, os.O_RDONLY)
    try:
        fmt.create(lambda o, n: os.pread(fd, n, o), size, out, chunk_size=chunk)
    finally:
        os.close(fd)
    return out


class FileSource:
    def __init__(self, path: Path):
        self.path = path
        self.header = fmt.read_header(path)
        self.blob = path.read_bytes()

    def read(self, c: int) -> bytes:
        ch = self.header.chunks[c]
        return self.blob[ch.offset:ch.offset + ch.stored_len]


@dataclass
class Node:
    rx: rc.Receiver
    disk: bytearray
    loss: float = 0.0
    alive: bool = True
    listening: bool = False
    finished: rc.Finished | None = None
    deadline: float | None = 0.0
    tamper: int = 0  # corrupt every 50th datagram this many times (a rogue sender)
    seen: int = 0
    writes: list[int] = field(default_factory=list)
    # A receiver that takes in only `drain` bytes/s (0: all at once) through a socket
    # buffer of `buffer` bytes: what does not fit is dropped, as a kernel does.
    drain: float = 0.0
    buffer: int = 1 << 20
    queue: deque = field(default_factory=deque)
    queued: int = 0
    drained_at: float = 0.0
    overflowed: int = 0


class Net:
    def __init__(self, image: Path, *, rate: float = 50e6, fec: float = 0.03, seed: int = 7,
                 **server_kw):
        self.source = FileSource(image)
        self.server = sv.Server(group="239.1.1.1", ports=range(5000, 5004), rate=rate,
                                fec_proactive=fec, rng=random.Random(seed), **server_kw)
        self.rng = random.Random(seed)
        self.nodes: list[Node] = []
        self.now = 0.0
        self.server_deadline: float | None = 0.0
        self.ended: list[sv.Ended] = []
        self.opens = 0
        self.block_multicast = False

    def add(self, loss: float = 0.0, **kw) -> Node:
        rx = rc.Receiver("img", receiver_id=len(self.nodes) + 1,
                         rng=random.Random(self.rng.random()), **kw)
        n = Node(rx, bytearray(self.source.header.disk_size), loss)
        self.nodes.append(n)
        self._node_effects(n, rx.start(self.now))
        return n

    def _server_effects(self, effects, addr_of=None) -> None:
        for e in effects:
            if isinstance(e, sv.OpenImage):
                self.opens += 1
                self._server_effects(self.server.opened(self.now, e.image, self.source))
            elif isinstance(e, sv.Ended):
                self.ended.append(e)
            elif isinstance(e, sv.Send):
                if e.addr[0] == "239.1.1.1":
                    for n in self.nodes:
                        if n.alive and n.listening and n.finished is None:
                            for p in e.packets:
                                if self.rng.random() < n.loss:
                                    continue
                                if not n.drain:
                                    self._deliver(n, p)
                                elif n.queued + len(p) > n.buffer:
                                    n.overflowed += 1
                                else:
                                    n.queue.append(p)
                                    n.queued += len(p)
                else:
                    n = self.nodes[e.addr[1]]
                    if n.alive:
                        for p in e.packets:
                            self._node_effects(n, n.rx.control(self.now, p))
        self.server_deadline = self.now

    def _drain(self, n: Node) -> None:
        """A slow receiver takes in what its rate allowed since it last did."""
        budget = (self.now - n.drained_at) * n.drain
        n.drained_at = self.now
        self._node_effects(n, n.rx.note_backlog(self.now, 100 * n.queued // n.buffer,
                                                      n.overflowed))
        while n.queue and budget >= len(n.queue[0]) and n.finished is None:
            p = n.queue.popleft()
            n.queued -= len(p)
            budget -= len(p)
            self._deliver(n, p)
        if not n.queue:
            n.queued = 0

    def _deliver(self, n: Node, p: bytes) -> None:
        n.seen += 1
        if n.tamper and n.seen % 50 == 0:
            n.tamper -= 1
            p = p[:30] + bytes([p[30] ^ 0xFF]) + p[31:]
        self._node_effects(n, n.rx.data(self.now, p))

    def _node_effects(self, n: Node, effects) -> None:
        i = self.nodes.index(n)
        for e in effects:
            if isinstance(e, rc.Control):
                self._server_effects(self.server.datagram(self.now, ("10.0.0.1", i), e.data))
            elif isinstance(e, rc.Listen):
                n.listening = not self.block_multicast
            elif isinstance(e, rc.FetchIndex):
                blob = self.source.blob
                self._node_effects(n, n.rx.index(self.now, blob[:self.source.header.header_len]))
            elif isinstance(e, rc.FetchChunks):
                for c in e.chunks:
                    self._node_effects(n, n.rx.http_chunk(self.now, c, self.source.read(c)))
            elif isinstance(e, rc.Write):
                n.disk[e.offset:e.offset + len(e.data)] = e.data
                n.writes.append(e.offset)
            elif isinstance(e, rc.Finished):
                n.finished = e
        n.deadline = n.rx.wakeup()

    def run(self, until: float = 120.0, all_of_it: bool = False) -> float:
        """Advance the clock until every live receiver finished (or, with ``all_of_it``,
        until ``until``); returns the time."""
        while self.now < until:
            if not all_of_it and all(n.finished or not n.alive for n in self.nodes):
                return self.now
            if self.server_deadline is not None and self.now >= self.server_deadline:
                eff, self.server_deadline = self.server.poll(self.now)
                self._server_effects(eff)
                eff, self.server_deadline = self.server.poll(self.now)
                self._server_effects(eff) if eff else None
            for n in self.nodes:
                if n.drain and n.alive and n.finished is None:
                    self._drain(n)
                if n.alive and n.finished is None and n.deadline is not None \
                        and self.now >= n.deadline:
                    eff, _ = n.rx.poll(self.now)
                    self._node_effects(n, eff)
            nxt = [d for d in [self.server_deadline] + [n.deadline for n in self.nodes
                                                        if n.alive and n.finished is None]
                   if d is not None]
            nxt += [self.now + 0.002 for n in self.nodes if n.queue and n.finished is None]
            if not nxt:
                if all(n.finished or not n.alive for n in self.nodes):
                    if not all_of_it:
                        return self.now
                    self.now = until
                    eff, self.server_deadline = self.server.poll(self.now)
                    self._server_effects(eff)
                    return self.now
                raise AssertionError("nothing scheduled and receivers not finished")
            self.now = min(until, max(self.now + 1e-6, min(nxt)))
        return self.now

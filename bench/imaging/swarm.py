"""Many imaging receivers behind one socket, for bench/imaging.

Receiver 0 is a real one (imaging.receiver.Receiver: decodes, decompresses, writes the
disk, checks its SHA-256).  The others are *counting* receivers: each has its own
receiver id, its own independent loss, its own REQUESTs and LEAVE on the wire, and
counts, per stripe, the distinct symbols it got.  For an MDS code that count decides
decoding exactly (any k distinct symbols of a stripe give the stripe back), so the
server sees the same requests as from full receivers, at a fraction of the CPU.

    swarm.py SERVER PORT HTTP_PORT IMAGE N LOSS OUT  -> one JSON line on stdout
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys
import time
import urllib.request

import numpy as np

from bootherd.imaging import fec, wire
from bootherd.imaging import receiver as rc
from bootherd.imaging.format import SKIPPED
from bootherd.imaging.transport import DiskWriter, join_group, socket_fill
from bootherd.procs import cpu_seconds


class Counting:
    """Receivers 1..n-1: per-stripe distinct-symbol counts with independent loss."""

    def __init__(self, header, n: int, loss: float, rng: random.Random):  # noqa: ANN001
        self.h = header
        self.n = n
        self.loss = loss
        self.rng = rng
        self.stripe_base = []  # chunk -> index of its first stripe
        ks = []
        for c in header.chunks:
            self.stripe_base.append(len(ks))
            if c.kind != SKIPPED:
                lay = fec.layout(c.stored_len)
                ks += [lay.k(s) for s in range(lay.stripes)]
        self.k = np.array(ks, dtype=np.int32)
        stored = [c.index for c in header.chunks if c.kind != SKIPPED]
        self.stored_chunks = np.array(stored, dtype=np.int64)
        self.starts = np.array([self.stripe_base[c] for c in stored], dtype=np.int64)
        self.stripe_chunk = np.repeat(self.stored_chunks, np.diff(np.append(self.starts, len(ks))))
        self.seen = np.zeros(len(ks), dtype=np.int32)  # distinct symbols at the socket
        self.lack = np.zeros((n, len(ks)), dtype=np.int16)  # ... that each receiver lost
        self.lacking: dict[tuple[int, int], set[int]] = {}
        self.layouts: dict[int, fec.Layout] = {}
        self.settled = np.zeros(len(ks), dtype=bool)
        self.current = -1
        self.done = np.zeros(n, dtype=bool)
        self.done[0] = True  # receiver 0 is the real one
        self.max_seq = 0

    def datagram(self, m: wire.Data) -> None:
        c = m.chunk
        ch = self.h.chunks[c] if c < len(self.h.chunks) else None
        if ch is None or ch.kind == SKIPPED:
            return
        lay = self.layouts.get(c) or self.layouts.setdefault(c, fec.layout(ch.stored_len))
        if m.repair:
            s, _ = wire.split_symbol(m.symbol)
        else:
            s = m.symbol % lay.stripes
        idx = self.stripe_base[c] + s
        if c != self.current:
            if self.current >= 0:
                self._settle(self.current)
            self.current = c
        self.settled[idx] = False
        self.max_seq = max(self.max_seq, m.seq)
        drops = set()
        if self.loss:
            k = int(np.random.binomial(self.n - 1, self.loss))
            if k:
                drops = set(self.rng.sample(range(1, self.n), k))
        key = (c, m.symbol)
        prev = self.lacking.get(key)
        if prev is None:
            self.seen[idx] += 1
            if drops:
                self.lacking[key] = drops
                self.lack[list(drops), idx] += 1
        else:
            got = prev - drops
            if got:
                self.lack[list(got), idx] -= 1
            self.lacking[key] = prev & drops

    def _settle(self, c: int) -> None:
        lay = self.layouts.get(c)
        if lay:
            b = self.stripe_base[c]
            self.settled[b:b + lay.stripes] = True

    def quiet(self) -> None:
        if self.current >= 0:
            self._settle(self.current)
        self.current = -1

    def deficits(self) -> np.ndarray:
        return self.k[None, :] - self.seen[None, :] + self.lack  # > 0: still needed

    def requests(self, session: int, ids: list[int], who: np.ndarray) -> tuple[list[bytes], list[int]]:
        """REQUESTs of the receivers in ``who`` (indices), and those that are done."""
        d = self.deficits()
        out, finished = [], []
        for r in who:
            if self.done[r]:
                continue
            row = d[r]
            if not (row > 0).any():
                self.done[r] = True
                finished.append(r)
                continue
            have = self.seen - self.lack[r]
            per_chunk = np.maximum.reduceat(have, self.starts) if len(self.starts) else have
            untouched = self.stored_chunks[per_chunk <= 0].tolist()
            want = np.flatnonzero((row > 0) & self.settled)[:wire.MAX_NEEDS]
            needs = [(int(self.stripe_chunk[x]), int(x - self.stripe_base[self.stripe_chunk[x]]),
                      int(min(255, row[x]))) for x in want]
            ranges = []
            for c in untouched:
                if ranges and ranges[-1][0] + ranges[-1][1] == c:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
                elif len(ranges) < wire.MAX_RANGES:
                    ranges.append((c, 1))
            if ranges or needs:
                done = int(self.h.chunk_count - len(untouched))
                out.append(wire.encode(wire.Request(session, ids[r], done, self.max_seq,
                                                    tuple(ranges), tuple(needs))))
        return out, finished


async def main(server: str, port: int, http_port: int, image: str, n: int, loss: float, out: str) -> dict:
    loop = asyncio.get_running_loop()
    rng = random.Random(os.getpid())
    np.random.seed(os.getpid() % 2**32)
    ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ctl.connect((server, port))
    ctl.setblocking(False)
    local = ctl.getsockname()[0]
    real = rc.Receiver(image, receiver_id=rng.getrandbits(32))
    ids = [real.id] + [rng.getrandbits(32) for _ in range(n - 1)]
    t0 = time.monotonic()
    cpu0 = cpu_seconds(os.getpid())
    disk: DiskWriter | None = None
    counting: Counting | None = None
    finished = asyncio.Event()
    state = {"sent": 0, "real_done": None, "counting_done_at": None, "last_data": time.monotonic()}

    def effects(effs: list) -> None:
        nonlocal disk
        for e in effs:
            if isinstance(e, rc.Control):
                ctl.send(e.data)
            elif isinstance(e, rc.FetchIndex):
                url = f"http://{server}:{http_port}/images/{image}"
                req = urllib.request.Request(url, headers={"Range": f"bytes=0-{e.header_len - 1}"})
                meta = urllib.request.urlopen(req, timeout=30).read()
                effects(real.index(time.monotonic(), meta))
            elif isinstance(e, rc.Listen):
                sock = join_group(e.group, e.port, local)
                loop.add_reader(sock.fileno(), on_data, sock)
            elif isinstance(e, rc.Write):
                if disk is None:
                    disk = DiskWriter(out, real.header.disk_size)
                disk.write(e.offset, e.data)
            elif isinstance(e, rc.FetchChunks):
                state["real_done"] = rc.Finished(False, "fell back to HTTP", b"")
                finished.set()
            elif isinstance(e, rc.Finished):
                state["real_done"] = e
                check()

    def check() -> None:
        if state["real_done"] is not None and (counting is None or counting.done.all()):
            finished.set()

    def on_data(sock: socket.socket) -> None:
        nonlocal counting
        effects(real.note_backlog(time.monotonic(), *socket_fill(sock)))  # the server's rate
        for _ in range(64):
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            state["last_data"] = time.monotonic()
            try:
                m = wire.decode(data)
            except wire.Malformed:
                continue
            if not isinstance(m, wire.Data):
                continue
            if counting is None and real.header is not None and n > 1:
                counting = Counting(real.header, n, loss, rng)
            if counting is not None:
                counting.datagram(m)
            if not (loss and rng.random() < loss):
                effects(real.data(time.monotonic(), data))

    def on_ctl() -> None:
        while True:
            try:
                data = ctl.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                return
            effects(real.control(time.monotonic(), data))

    def join_counting() -> None:
        for rid in ids[1:]:
            try:
                ctl.send(wire.encode(wire.Join(rng.getrandbits(32), rid, image)))
            except BlockingIOError:
                return  # the rest go with the next round

    loop.add_reader(ctl.fileno(), on_ctl)
    effects(real.start(time.monotonic()))
    join_counting()

    async def ticker() -> None:
        turn = 0
        joined_at = time.monotonic()
        while not finished.is_set():
            await asyncio.sleep(0.05)
            now = time.monotonic()
            effs, _ = real.poll(now)
            effects(effs)
            # While the session gathers its receivers, the counting ones JOIN again at the
            # real receiver's own join interval, as it does after a HOLD: a JOIN lost to a
            # full queue would otherwise keep the session waiting for its gather_timeout.
            if real.joined is None and now - joined_at >= real.join_interval:
                joined_at = now
                join_counting()
            if counting is not None and real.joined is not None:
                quiet = now - state["last_data"] > 0.05
                if quiet:
                    counting.quiet()
                # each receiver asks about every 0.5 s: a tenth of them per 50 ms tick
                who = np.arange(turn % 10, n, 10) if not quiet else np.arange(n)
                turn += 1
                reqs, done = counting.requests(real.joined.session, ids, who)
                for q in reqs:
                    ctl.send(q)
                    state["sent"] += 1
                for r in done:
                    ctl.send(wire.encode(wire.Leave(real.joined.session, ids[r], wire.LEFT_DONE,
                                                    real.header.chunk_count)))
                check()

    tick = asyncio.ensure_future(ticker())
    await asyncio.wait_for(finished.wait(), 1800)
    tick.cancel()
    wall = time.monotonic() - t0
    if disk is not None:
        disk.close()
    res = state["real_done"]
    sha = rc.sha256_of(out, real.header.disk_size).hex() if res and res.ok else ""
    return {"ok": bool(res and res.ok and sha == real.header.image_sha256.hex()),
            "message": res.message if res else "", "seconds": wall, "receivers": n,
            "cpu": cpu_seconds(os.getpid()) - cpu0, "sha256": sha,
            "bad_chunks": real.stats.bad_chunks, "requests_sent": state["sent"]}


if __name__ == "__main__":
    a = sys.argv[1:]
    import uvloop
    print(json.dumps(uvloop.run(main(a[0], int(a[1]), int(a[2]), a[3], int(a[4]), float(a[5]), a[6]))))

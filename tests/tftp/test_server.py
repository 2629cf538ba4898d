"""Live server on 127.0.0.1 (ephemeral high port) driven by the Python client."""

import asyncio
import os
import socket

import pytest

from bootherd.tftp import TFTPServer, core
from bootherd.tftp.client import TFTPError, TFTPTimeout, fetch

from .conftest import sha

pytestmark = pytest.mark.usefixtures("datapath")  # native data path and Python


async def wait_for(cond, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


class Raw:
    """A bare UDP socket for hand-written exchanges (fixed source port)."""

    def __init__(self, ip="127.0.0.1", port=0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, port))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def send(self, data, addr):
        self.sock.sendto(data, addr)

    async def recv(self, timeout=2.0):
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recvfrom(self.sock, 70000), timeout)

    def close(self):
        self.sock.close()


async def test_fetch_octet_and_options(server, root):
    want = (root / "f1m").read_bytes()
    for opts in (None, {"blksize": 1468}, {"blksize": 1468, "windowsize": 8, "tsize": 0}):
        r = await fetch("127.0.0.1", server.port, "f1m", options=opts, timeout=0.5)
        assert r.sha256 == sha(want)
    assert r.options == {"blksize": "1468", "windowsize": "8", "tsize": str(len(want))}
    await wait_for(lambda: server.counters.transfers_ok == 3)
    c = server.counters
    assert c.transfers_failed == 0 and c.active_transfers == 0 and c.bytes_sent >= 3 * len(want)


async def test_blksize_clamped_to_path_mtu_limit(root, datapath):
    async with TFTPServer("127.0.0.1", 0, str(root), **datapath, max_blksize=1000) as srv:
        r = await fetch("127.0.0.1", srv.port, "f1m", options={"blksize": 8192})
    assert r.options["blksize"] == "1000" and r.size == 2**20


async def test_netascii_and_empty_and_subdirs(server, root):
    r = await fetch("127.0.0.1", server.port, "small.txt", mode="netascii")
    assert r.data == core.to_netascii((root / "small.txt").read_bytes())
    r = await fetch("127.0.0.1", server.port, "empty")
    assert r.data == b""
    for name in ("sub/inner.bin", "/sub/inner.bin", "sub\\inner.bin", "inside-link",
                 f"{root}/sub/inner.bin", "//sub/./inner.bin"):  # fmt: skip
        r = await fetch("127.0.0.1", server.port, name)
        assert r.data == (root / "sub" / "inner.bin").read_bytes(), name


@pytest.mark.parametrize(
    "name,code",
    [("../secret", 2), ("sub/../../secret", 2), ("sub/../small.txt", 2), ("escape", 2),
     ("sub/up", 2), ("/etc/passwd", 1), ("nope", 1), ("sub", 1), ("", 1)],
)  # fmt: skip
async def test_path_escapes_refused(server, name, code):
    if not name:
        raw = Raw()
        raw.send(b"\x00\x01/\x00octet\x00", ("127.0.0.1", server.port))
        data, _ = await raw.recv()
        raw.close()
        assert core.parse_packet(data).code == code
        return
    with pytest.raises(TFTPError) as ei:
        await fetch("127.0.0.1", server.port, name, timeout=0.5)
    assert ei.value.code == code


async def test_bad_mode_and_bad_option_value(server):
    with pytest.raises(TFTPError) as ei:
        await fetch("127.0.0.1", server.port, "small.txt", mode="mail")
    assert ei.value.code == 4
    with pytest.raises(TFTPError) as ei:
        await fetch("127.0.0.1", server.port, "small.txt", options={"blksize": 2})
    assert ei.value.code == 8


async def test_unknown_options_only_gives_plain_transfer(server, root):
    r = await fetch("127.0.0.1", server.port, "small.txt", options={"multicast": "", "x": 1})
    assert r.options == {} and r.data == (root / "small.txt").read_bytes()


async def test_uefi_probe_abort_then_rerequest_from_same_port(server, root):
    """OVMF: RRQ tsize=0 blksize=1468 windowsize=4, ERROR 8 after the OACK, new RRQ."""
    done = []
    server.on_transfer_done = done.append
    raw = Raw()
    addr = ("127.0.0.1", server.port)
    rrq1 = core.encode_request(core.RRQ, "f1m", "octet",
                               {"tsize": "0", "blksize": "1468", "windowsize": "4"})  # fmt: skip
    raw.send(rrq1, addr)
    oack, tid = await raw.recv()
    assert core.parse_packet(oack) == core.OAck(
        {"tsize": str(2**20), "blksize": "1468", "windowsize": "4"}
    )
    raw.send(core.encode_error(8, "probe done"), tid)
    await wait_for(lambda: server.counters.probes_aborted == 1)
    assert server.counters.cache_misses == 0  # answered from stat, file not read
    port = raw.port
    raw.close()
    r = await fetch("127.0.0.1", server.port, "f1m", local_addr=("127.0.0.1", port),
                    options={"blksize": 1468, "windowsize": 4}, timeout=0.5)  # fmt: skip
    assert r.sha256 == sha((root / "f1m").read_bytes())
    await wait_for(lambda: len(done) == 2)
    assert done[0].probe and not done[0].ok and not done[1].probe and done[1].ok
    assert server.counters.transfers_failed == 0


async def test_probe_rerequest_overtakes_the_error(server, root):
    """The new RRQ may be handled before the ERROR 8 that reached the old TID."""
    raw = Raw()
    addr = ("127.0.0.1", server.port)
    opts = {"tsize": "0", "blksize": "1468", "windowsize": "4"}
    raw.send(core.encode_request(core.RRQ, "f1m", "octet", opts), addr)
    _, tid1 = await raw.recv()
    raw.send(core.encode_request(core.RRQ, "f1m", "octet", {"blksize": "1468",
                                                             "windowsize": "4"}), addr)
    raw.send(core.encode_error(8, "probe done"), tid1)
    pkt, tid2 = await raw.recv()
    assert tid2 != tid1 and core.parse_packet(pkt) == core.OAck(
        {"blksize": "1468", "windowsize": "4"}
    )
    raw.send(core.encode_error(0, "enough"), tid2)
    raw.close()
    await wait_for(lambda: server.counters.active_transfers == 0)
    assert server.counters.superseded == 1 and server.counters.probes_aborted == 1


async def test_client_ignoring_oack_gets_plain_transfer_on_retry(server, root):
    raw = Raw()
    port = raw.port
    raw.close()
    with pytest.raises(TFTPTimeout):
        await fetch("127.0.0.1", server.port, "small.txt", options={"blksize": 1024},
                    ack_oack=False, timeout=0.15, retries=2, local_addr=("127.0.0.1", port))  # fmt: skip
    assert server.counters.duplicate_requests >= 1  # retransmitted RRQ, same transfer
    r = await fetch("127.0.0.1", server.port, "small.txt", local_addr=("127.0.0.1", port))
    assert r.data == (root / "small.txt").read_bytes() and r.options == {}


async def test_repeated_rrq_is_one_transfer(server):
    raw = Raw()
    rrq = core.encode_request(core.RRQ, "f1m", "octet")
    for _ in range(3):
        raw.send(rrq, ("127.0.0.1", server.port))
    tids = set()
    for _ in range(1):
        _, tid = await raw.recv()
        tids.add(tid)
    await asyncio.sleep(0.05)
    assert server.counters.requests == 3 and server.counters.duplicate_requests == 2
    assert server.active_transfers == 1
    raw.send(core.encode_error(0, "bye"), tid)
    raw.close()
    await wait_for(lambda: server.active_transfers == 0)


@pytest.mark.parametrize("windowsize", [1, 8])
async def test_lost_data_packets_still_complete(root, windowsize, datapath):
    seen = set()

    def drop(block):  # lose every 13th block once
        if block % 13 == 0 and block not in seen:
            seen.add(block)
            return True
        return False

    opts = {"blksize": 1024, "windowsize": windowsize}
    async with TFTPServer("127.0.0.1", 0, str(root), **datapath, default_timeout=0.05) as server:
        r = await fetch("127.0.0.1", server.port, "f1m", options=opts, drop=drop, timeout=0.5)
        assert r.sha256 == sha((root / "f1m").read_bytes())
        assert len(seen) >= 70
        await wait_for(lambda: server.counters.transfers_ok == 1)
        assert server.counters.retransmissions > 0 and server.counters.transfers_failed == 0


@pytest.mark.slow
async def test_rollover_past_65535_blocks(tmp_path, datapath):
    big = tmp_path / "big"
    size = 65540 * 512 + 100  # 65,541 blocks at 512 bytes (~34 MB)
    chunk = os.urandom(2**20)
    with open(big, "wb") as f:
        for i in range(size // len(chunk) + 1):
            f.write(chunk[: min(len(chunk), size - i * len(chunk))])
    async with TFTPServer("127.0.0.1", 0, str(tmp_path), **datapath) as srv:
        r = await fetch("127.0.0.1", srv.port, "big", keep=False, timeout=1.0)
        assert r.size == size and r.blocks == 65541
        assert r.sha256 == sha(big.read_bytes())
        r = await fetch("127.0.0.1", srv.port, "big", keep=False, options={"windowsize": 16})
        assert r.sha256 == sha(big.read_bytes())


async def test_wrq_refused_by_default(server, root):
    raw = Raw()
    raw.send(core.encode_request(core.WRQ, "new.bin"), ("127.0.0.1", server.port))
    pkt, _ = await raw.recv()
    raw.close()
    assert core.parse_packet(pkt).code == core.ERR_ACCESS
    assert not (root / "new.bin").exists()


async def put(port, name, data, blksize=512, options=None):
    raw = Raw()
    raw.send(core.encode_request(core.WRQ, name, "octet", options), ("127.0.0.1", port))
    pkt, tid = await raw.recv()
    p = core.parse_packet(pkt)
    if isinstance(p, core.Error):
        raw.close()
        raise TFTPError(p.code, p.message)
    blk = 1
    while True:
        chunk = data[(blk - 1) * blksize : blk * blksize]
        raw.send(core.encode_data(blk, chunk), tid)
        ack, _ = await raw.recv()
        assert core.parse_packet(ack) == core.Ack(blk & 0xFFFF)
        if len(chunk) < blksize:
            break
        blk += 1
    raw.close()


async def test_wrq_into_upload_dir_only(root, tmp_path, datapath):
    up = tmp_path / "up"
    up.mkdir()
    async with TFTPServer("127.0.0.1", 0, str(root), **datapath, upload_dir=str(up)) as srv:
        payload = os.urandom(3000)
        await put(srv.port, "/logs.bin", payload, blksize=1000, options={"blksize": "1000"})
        await wait_for(lambda: srv.counters.transfers_ok == 1)
        assert (up / "logs.bin").read_bytes() == payload
        for name, code in (("logs.bin", 6), ("../x", 2), ("nodir/x", 2)):
            with pytest.raises(TFTPError) as ei:
                await put(srv.port, name, b"x")
            assert ei.value.code == code
    assert sorted(os.listdir(up)) == ["logs.bin"]


async def test_malformed_packets_counted_while_serving(server, root):
    want = sha((root / "f1m").read_bytes())
    junk = Raw()
    task = asyncio.create_task(
        fetch("127.0.0.1", server.port, "f1m", options={"blksize": 512}, timeout=0.5)
    )
    for i in range(200):
        junk.send(bytes([0, i % 9, 0xFF]) + b"\xff" * (i % 5), ("127.0.0.1", server.port))
        if i % 50 == 0:
            await asyncio.sleep(0.001)
    r = await task
    junk.close()
    assert r.sha256 == want
    assert server.counters.malformed >= 100
    assert server.counters.internal_errors == 0


async def test_unknown_tid_gets_error_5_and_transfer_survives(server, root):
    raw = Raw()
    raw.send(core.encode_request(core.RRQ, "f1m", "octet"), ("127.0.0.1", server.port))
    _, tid = await raw.recv()
    other = Raw()
    other.send(core.encode_ack(1), tid)
    pkt, src = await other.recv()
    assert src == tid and core.parse_packet(pkt).code == core.ERR_UNKNOWN_TID
    raw.send(core.encode_ack(1), tid)
    pkt, _ = await raw.recv()
    assert core.parse_packet(pkt).block == 2
    raw.send(core.encode_error(0, "bye"), tid)
    raw.close()
    other.close()
    # The native data path's counts join the server's within a housekeeping pass.
    await wait_for(lambda: server.counters.unknown_tid == 1)
    await asyncio.sleep(0.3)
    assert server.counters.unknown_tid == 1


@pytest.mark.parametrize("is_async", [False, True])
async def test_resolver_per_node_content(root, is_async, datapath):
    calls = []

    def sync_resolve(ip, path):
        calls.append((ip, path))
        if path == "pxelinux.cfg/default":
            return f"node {ip}\n".encode()
        return None

    async def async_resolve(ip, path):
        await asyncio.sleep(0.01)
        return sync_resolve(ip, path)

    resolver = async_resolve if is_async else sync_resolve
    async with TFTPServer("127.0.0.1", 0, str(root), **datapath, resolver=resolver) as srv:
        for ip in ("127.0.0.2", "127.0.0.3"):
            r = await fetch("127.0.0.1", srv.port, "/pxelinux.cfg/default",
                            local_addr=(ip, 0), options={"tsize": 0})  # fmt: skip
            assert r.data == f"node {ip}\n".encode() and r.options["tsize"] == str(len(r.data))
        r = await fetch("127.0.0.1", srv.port, "small.txt")  # falls through to disk
        assert r.data == (root / "small.txt").read_bytes()
        with pytest.raises(TFTPError):
            await fetch("127.0.0.1", srv.port, "../pxelinux.cfg/default")
    assert ("127.0.0.2", "pxelinux.cfg/default") in calls
    assert all(".." not in p for _, p in calls)


async def test_admission_queue_and_busy_error(root, datapath):
    async with TFTPServer("127.0.0.1", 0, str(root), **datapath, max_transfers=1, queue_wait=0.2,
                          default_timeout=0.5) as srv:  # fmt: skip
        staller = Raw()  # holds the only slot: never acknowledges the OACK
        staller.send(core.encode_request(core.RRQ, "f1m", "octet", {"blksize": "512"}),
                     ("127.0.0.1", srv.port))  # fmt: skip
        _, tid = await staller.recv()
        waiter = Raw()
        waiter.send(core.encode_request(core.RRQ, "small.txt"), ("127.0.0.1", srv.port))
        pkt, _ = await waiter.recv()
        err = core.parse_packet(pkt)
        assert err == core.Error(0, "server busy, retry")
        assert srv.counters.busy_rejections == 1 and srv.counters.queued == 1
        # a firmware-like client retries and gets through once the slot frees up
        task = asyncio.create_task(fetch("127.0.0.1", srv.port, "small.txt", busy_delay=0.05))
        await asyncio.sleep(0.1)
        staller.send(core.encode_error(0, "bye"), tid)
        r = await task
        assert r.data == (root / "small.txt").read_bytes()
        staller.close()
        waiter.close()


async def test_a_long_queue_of_refused_requests_drains(root):
    """Each queued request the store refuses frees its slot for the next: 400 of them in a
    row are answered one after the other, not within each other (no RecursionError)."""
    async with TFTPServer("127.0.0.1", 0, str(root), max_per_client=1, queue_wait=5.0) as srv:
        addr = ("127.0.0.1", srv.port)
        staller = Raw()  # holds 127.0.0.1's one slot; the others queue behind it
        staller.send(core.encode_request(core.RRQ, "f1m", "octet", {"blksize": "512"}), addr)
        _, tid = await staller.recv()
        waiters = [Raw() for _ in range(400)]
        for w in waiters:
            w.send(core.encode_request(core.RRQ, "missing"), addr)
        await wait_for(lambda: srv.counters.queued == 400)
        staller.send(core.encode_error(0, "bye"), tid)
        for w in waiters:
            assert core.parse_packet((await w.recv())[0]) == core.Error(1, "file not found")
            w.close()
        staller.close()
    assert srv.counters.request_errors == 400 and srv.counters.internal_errors == 0


async def test_per_client_cap_queues(root, datapath):
    async with TFTPServer("127.0.0.1", 0, str(root), **datapath, max_per_client=2) as srv:
        rs = await asyncio.gather(*[fetch("127.0.0.1", srv.port, "f1m", keep=False,
                                          options={"blksize": 1468}) for _ in range(6)])  # fmt: skip
        assert all(r.size == 2**20 for r in rs)
        # A client is done on the last DATA; the server counts the transfer on its ACK.
        for _ in range(100):
            if srv.counters.active_transfers == 0:
                break
            await asyncio.sleep(0.05)
        assert srv.counters.queued >= 4 and srv.counters.transfers_ok == 6


async def test_cache_notices_changes(server, root):
    p = root / "sub" / "inner.bin"
    r1 = await fetch("127.0.0.1", server.port, "sub/inner.bin")
    r2 = await fetch("127.0.0.1", server.port, "sub/inner.bin")
    assert r1.data == r2.data and server.counters.cache_hits == 1
    new = os.urandom(5000)  # same size
    p.write_bytes(new)
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert (await fetch("127.0.0.1", server.port, "sub/inner.bin")).data == new
    tmp = root / "sub" / "tmp"
    tmp.write_bytes(b"replaced")  # atomic replace: new inode
    os.replace(tmp, p)
    assert (await fetch("127.0.0.1", server.port, "sub/inner.bin")).data == b"replaced"
    assert server.cache.used <= server.cache.max_bytes


async def test_large_file_beyond_cache_is_streamed(root, datapath):
    async with TFTPServer("127.0.0.1", 0, str(root), **datapath, cache_bytes=2**20) as srv:
        r = await fetch("127.0.0.1", srv.port, "f1m", options={"blksize": 1468})
        assert r.sha256 == sha((root / "f1m").read_bytes()) and len(srv.cache) == 0


@pytest.mark.parametrize("opts", [None, {"blksize": 1468, "tsize": 0}])
async def test_first_read_of_a_large_file_leaves_the_event_loop(tmp_path, datapath, opts):
    data = os.urandom(3 * 2**20)  # read whole into the cache, on a thread, once for all
    (tmp_path / "kernel").write_bytes(data)
    async with TFTPServer("127.0.0.1", 0, str(tmp_path), **datapath) as srv:
        rs = await asyncio.gather(*[fetch("127.0.0.1", srv.port, "kernel", keep=False,
                                          options=opts) for _ in range(5)])  # fmt: skip
        assert all(r.sha256 == sha(data) for r in rs)
        await wait_for(lambda: srv.counters.transfers_ok == 5)
    assert srv.store.thread_reads == 1 and srv.counters.cache_misses == 1


async def test_stats_callback_and_counters(root, datapath):
    got = []

    async def on_done(stats):
        got.append(stats)

    async with TFTPServer("127.0.0.1", 0, str(root), **datapath, on_transfer_done=on_done,
                          default_timeout=0.1, retries=1) as srv:  # fmt: skip
        await fetch("127.0.0.1", srv.port, "small.txt", local_addr=("127.0.0.5", 0))
        raw = Raw()  # a client that vanishes: transfer fails after retries
        raw.send(core.encode_request(core.RRQ, "f1m"), ("127.0.0.1", srv.port))
        await raw.recv()
        raw.close()
        await wait_for(lambda: len(got) == 2)
    ok, failed = got
    assert ok.ok and ok.client_ip == "127.0.0.5" and ok.path == "small.txt"
    assert ok.bytes == len((root / "small.txt").read_bytes()) and ok.duration >= 0
    assert not failed.ok and failed.error == "timeout" and failed.retries >= 1
    c = srv.counters.as_dict()
    assert c["transfers_ok"] == 1 and c["transfers_failed"] == 1 and c["active_transfers"] == 0


async def test_stop_closes_transfer_sockets(root, datapath):
    srv = TFTPServer("127.0.0.1", 0, str(root), **datapath)
    await srv.start()
    raw = Raw()
    raw.send(core.encode_request(core.RRQ, "f1m"), ("127.0.0.1", srv.port))
    _, tid = await raw.recv()
    socks = [s.io.sock for s in srv.requests.sessions.values()]
    assert len(socks) == 1
    await srv.stop()
    assert all(s.fileno() == -1 for s in socks) and srv.active_transfers == 0
    raw.close()


async def test_start_reports_address_when_port_taken(root, datapath):
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    srv = TFTPServer("127.0.0.1", port, str(root), **datapath)
    with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
        await srv.start()
    blocker.close()


async def test_listen_socket_receive_buffer_enlarged(server):
    assert server.rcvbuf >= 4 * 2**20


def test_works_under_uvloop(root, datapath):
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with TFTPServer("127.0.0.1", 0, str(root), **datapath) as srv:
            r = await fetch("127.0.0.1", srv.port, "f1m", options={"windowsize": 8})
            return r.sha256

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == sha((root / "f1m").read_bytes())

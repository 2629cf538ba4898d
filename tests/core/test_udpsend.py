"""The native sending thread (bootherd._udpsend): order, addresses, errors, forget, close."""

from __future__ import annotations

import os
import socket
import time

import pytest

from bootherd import udpsend

pytestmark = pytest.mark.skipif(not udpsend.available and not os.environ.get("CI"),
                                reason="extension not built")


def test_built_under_ci():
    # CI installs gcc and the headers: a silently missing extension would hide a slow path.
    assert udpsend.available


@pytest.fixture
def pair():
    """(receiver, sender socket) on loopback; the receiver times out after 3 s."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(3)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    yield rx, tx
    rx.close()
    tx.close()


@pytest.fixture
def sender():
    s = udpsend.make_sender()
    yield s
    s.close()


@pytest.fixture
def gso_sender():
    s = udpsend.make_sender(gso=True)
    yield s
    s.close()


@pytest.fixture
def dead_fd() -> int:
    """A closed socket's number: sends to it fail with EBADF."""
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = dead.fileno()
    dead.close()
    return fd


def _wait(sender, key: str, want: int) -> dict:
    end = time.time() + 3
    while time.time() < end:
        st = sender.stats()
        if st[key] >= want and st["pending"] == 0:
            return st
        time.sleep(0.01)
    return sender.stats()


def test_datagrams_arrive_in_order_from_the_callers_socket(pair, sender):
    rx, tx = pair
    s = sender
    for i in range(150):
        s.send(tx.fileno(), b"p%d" % i, rx.getsockname())
    s.send_many(tx.fileno(), [b"a", memoryview(b"bb"), bytearray(b"ccc")], rx.getsockname())
    s.flush()
    got = []
    for _ in range(153):
        data, addr = rx.recvfrom(100)
        got.append(data)
        assert addr == tx.getsockname()  # the reply comes from the transfer's own port
    assert got == [b"p%d" % i for i in range(150)] + [b"a", b"bb", b"ccc"]
    st = _wait(s, "sent", 153)
    assert st["sent"] == 153 and st["errors"] == 0
    assert st["calls"] < 153  # batched: sendmmsg carries many datagrams per call


def test_ipv6_destination(sender):
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as tx:
        rx.bind(("::1", 0))
        rx.settimeout(3)
        tx.bind(("::1", 0))
        sender.send(tx.fileno(), b"six", rx.getsockname())
        sender.flush()
        assert rx.recv(10) == b"six"


@pytest.mark.parametrize("addr, exc", [
    (("not-an-ip", 68), ValueError),
    ("127.0.0.1", TypeError),
    (("127.0.0.1",), TypeError),
    (("127.0.0.1", 70000), OverflowError),
])
def test_bad_addresses_are_refused_at_the_call(sender, addr, exc):
    with pytest.raises(exc):
        sender.send(0, b"x", addr)
    assert sender.stats()["pending"] == 0


def test_unsendable_datagram_is_counted_and_the_rest_still_go(pair, sender, dead_fd):
    rx, tx = pair
    s = sender
    s.send(dead_fd, b"lost", rx.getsockname())
    s.send(tx.fileno(), b"kept", rx.getsockname())
    s.flush()
    assert rx.recv(10) == b"kept"
    st = _wait(s, "errors", 1)
    assert st["errors"] == 1 and s.errors == 1 and st["sent"] == 1


def test_forget_drops_a_sockets_queued_datagrams(pair, sender):
    rx, tx = pair
    s = sender
    # Nothing is sent before flush() (fewer than the eager threshold are queued).
    for i in range(10):
        s.send(tx.fileno(), b"stale%d" % i, rx.getsockname())
    s.forget(tx.fileno())
    s.send(tx.fileno(), b"fresh", rx.getsockname())
    s.flush()
    assert rx.recv(10) == b"fresh"
    rx.settimeout(0.2)
    with pytest.raises(TimeoutError):
        rx.recv(10)


def test_close_sends_what_is_queued_then_refuses(pair):
    rx, tx = pair
    s = udpsend.make_sender()
    s.send(tx.fileno(), b"last", rx.getsockname())
    s.close()
    assert rx.recv(10) == b"last"
    with pytest.raises(RuntimeError):
        s.send(tx.fileno(), b"x", rx.getsockname())
    s.close()  # twice is fine


async def test_a_server_sends_from_the_loop_when_told(tmp_path):
    from bootherd.tftp import TFTPServer

    for native in (True, False):
        async with TFTPServer("127.0.0.1", 0, str(tmp_path), native_send=native,
                              native_data_path=native) as srv:  # fmt: skip
            assert (srv.sender is not None, srv.pump is not None) == (native, native)


def test_gso_window_arrives_as_separate_datagrams(pair, gso_sender):
    rx, tx = pair
    s = gso_sender
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    # 100 blocks of 1472 bytes, the last one short: 44 fit one GSO buffer (65,000 bytes),
    # so three buffers.
    window = [bytes([0, 3, i >> 8, i & 255]) + bytes([i & 255]) * 1468 for i in range(99)]
    window.append(b"\x00\x03\x00\x63" + b"end")
    s.send_many(tx.fileno(), window, rx.getsockname())
    s.send_many(tx.fileno(), [b"x" * 10, b"y" * 20], rx.getsockname())  # last longer: no GSO
    s.flush()
    got = [rx.recv(2000) for _ in range(102)]
    assert got == window + [b"x" * 10, b"y" * 20]
    st = _wait(s, "sent", 102)
    assert st["sent"] == 102 and st["errors"] == 0
    assert st["gso"] == 1 and st["gso_buffers"] == 3


def test_gso_buffer_on_a_closed_socket_counts_its_datagrams_and_keeps_gso(pair, gso_sender,
                                                                           dead_fd):
    rx, tx = pair
    s = gso_sender
    s.send_many(dead_fd, [b"a" * 100, b"b" * 100, b"c" * 50], rx.getsockname())
    s.send_many(tx.fileno(), [b"d" * 100, b"e" * 100], rx.getsockname())
    s.flush()
    assert [rx.recv(200), rx.recv(200)] == [b"d" * 100, b"e" * 100]
    st = _wait(s, "sent", 2)
    # EBADF is not the kernel refusing GSO: it stays on for the other sockets.
    assert st["errors"] == 3 and st["gso"] == 1 and st["gso_buffers"] == 1


GSO_REFUSED = r"""
import json, socket, time
from bootherd import udpsend
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: fragment
tx.bind(("10.213.0.1", 0))
s = udpsend.make_sender(gso=True)
s.send_many(tx.fileno(), [b"a" * 1400, b"b" * 1400, b"c" * 100], ("10.213.0.250", 9))
s.flush()
time.sleep(0.3)
print(json.dumps(s.stats()))
"""


# The TFTP data path (bootherd._tftpdata.Pump) makes its own GSO buffers: the same
# refusal, for a window of three blocks (1,400 + 1,400 + 100 bytes) it retransmits.
GSO_REFUSED_PUMP = r"""
import json, socket, time
from bootherd._tftpdata import Pump
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: fragment
tx.bind(("10.213.0.1", 0))
tx.setblocking(False)
p = Pump(capacity=4, gso=True)
# block 1 "sent" already, its deadline now: the timer resends blocks 1-3 at once
h = p.add(tx.fileno(), ("10.213.0.250", 9), source=bytes(2900), file_fd=-1, size=2900,
          blksize=1400, windowsize=4, timeout=5.0, retries=1, acked=0, sent=1, attempt=0,
          blocks_sent=0, bytes_sent=0, retransmissions=0, remaining=0.0)
time.sleep(0.3)
st = p.stats()
o = p.cancel(h)
st["outcome"] = [o.acked, o.sent, o.blocks_sent, o.bytes_sent, o.retransmissions]
p.close()
print(json.dumps(st))
"""


@pytest.mark.netns
@pytest.mark.parametrize("who", ["sender", "pump"])
def test_gso_refused_by_the_kernel_falls_back_to_single_datagrams(who):
    import json
    import subprocess
    import sys

    from bootherd.dhcp.netns import TestNet, usable

    if usable():
        pytest.skip(usable())
    with TestNet() as net:
        # Segments larger than the interface MTU: the kernel refuses the GSO buffer.
        net.sh(net.server, "ip link set veth-s mtu 1280 && "
                           "ip neigh add 10.213.0.250 lladdr 02:00:00:00:00:01 dev veth-s")
        script = GSO_REFUSED if who == "sender" else GSO_REFUSED_PUMP
        out = subprocess.run(["ip", "netns", "exec", net.server, sys.executable, "-c",
                              script], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        st = json.loads(out.stdout)
    assert st["gso"] == 0 and st["gso_buffers"] == 0
    if who == "sender":
        assert st["sent"] == 3 and st["errors"] == 0
    else:
        assert st["send_errors"] == 0 and st["windows"] == 1
        assert st["outcome"] == [0, 3, 3, 2900, 1]

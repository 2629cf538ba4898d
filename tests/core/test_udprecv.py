"""Receive queues: batches (native and Python alike), kernel timestamps, drop counters."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from bootherd import udprecv
from bootherd.metrics import Metrics


def pair(rcvbuf: int = 1 << 20) -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udprecv.set_rcvbuf(rx, rcvbuf, "test")
    udprecv.timestamps(rx)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    tx.connect(rx.getsockname())
    return rx, tx


@pytest.fixture(params=["native", "python"])
def impl(request, monkeypatch):
    if request.param == "native":
        if not udprecv.available:
            pytest.skip("bootherd._udprecv not built")
    else:
        monkeypatch.setattr(udprecv, "_native_recv_batch", None)
    return request.param


def test_batches_in_order_with_source_and_kernel_time(impl):
    rx, tx = pair()
    try:
        assert udprecv.recv_batch(rx, 10) == []
        before = time.time()
        for i in range(150):
            tx.send(b"%d" % i)
        got = udprecv.recv_batch(rx, 100)
        assert [d for d, _, _ in got] == [b"%d" % i for i in range(100)]
        assert {a for _, a, _ in got} == {tx.getsockname()}
        assert all(before - 1 <= ts <= time.time() + 1 for _, _, ts in got)
        rest = udprecv.recv_batch(rx, 1000)
        assert [d for d, _, _ in rest] == [b"%d" % i for i in range(100, 150)]
    finally:
        rx.close()
        tx.close()


def test_pktinfo_names_the_address_a_wildcard_socket_was_reached_at(impl):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.IPPROTO_IP, udprecv.IP_PKTINFO, 1)
    rx.bind(("0.0.0.0", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        port = rx.getsockname()[1]
        for dst in ("127.0.0.1", "127.0.0.9"):
            tx.sendto(dst.encode(), (dst, port))
        time.sleep(0.05)
        got = udprecv.recv_batch(rx, 10, pktinfo=True)
        assert [(d, info[4:8]) for d, _, _, info in got] == \
            [(b"127.0.0.1", socket.inet_aton("127.0.0.1")),
             (b"127.0.0.9", socket.inet_aton("127.0.0.9"))]
        assert all(int.from_bytes(info[:4], sys.byteorder) > 0 for *_, info in got)  # ifindex
    finally:
        rx.close()
        tx.close()
    plain, tx = pair()  # a socket that does not ask: None, and 3-tuples without pktinfo
    try:
        tx.send(b"a")
        time.sleep(0.05)
        assert [(d, info) for d, _, _, info in udprecv.recv_batch(plain, 10, pktinfo=True)] \
            == [(b"a", None)]
        tx.send(b"b")
        time.sleep(0.05)
        assert [len(x) for x in udprecv.recv_batch(plain, 10)] == [3]
    finally:
        plain.close()
        tx.close()


def test_a_full_queue_drops_and_the_drops_are_counted():
    rx, tx = pair(rcvbuf=4096)
    try:
        assert udprecv.socket_drops(rx) == 0
        host_before = udprecv.kernel_udp_counters().get("RcvbufErrors", 0)
        for _ in range(2000):
            tx.send(b"x" * 200)
        drops = udprecv.socket_drops(rx)
        assert drops is not None and drops > 0
        assert udprecv.kernel_udp_counters()["RcvbufErrors"] >= host_before + drops
        (events,) = [m for m in Metrics().registry.collect() if m.name == "bootherd_events"]
        kernel = {s.labels["event"]: s.value for s in events.samples
                  if s.labels.get("protocol") == "kernel" and s.name.endswith("_total")}
        assert set(kernel) == {"udp_rcvbuf_errors", "udp_in_errors"}
        assert kernel["udp_rcvbuf_errors"] >= host_before + drops
    finally:
        rx.close()
        tx.close()


def test_receive_buffer_as_asked_when_root():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        got = udprecv.set_rcvbuf(s, 32 << 20, "test")
        import os

        if os.geteuid() == 0:
            assert got >= 32 << 20  # SO_RCVBUFFORCE passes net.core.rmem_max
        else:
            assert got > 0
    finally:
        s.close()


def test_kernel_counters_parse(tmp_path):
    f = tmp_path / "snmp"
    f.write_text("Ip: Forwarding\nIp: 1\nUdp: InDatagrams NoPorts InErrors OutDatagrams "
                 "RcvbufErrors\nUdp: 10 2 7 5 6\n")
    assert udprecv.kernel_udp_counters(str(f)) == {
        "InDatagrams": 10, "NoPorts": 2, "InErrors": 7, "OutDatagrams": 5, "RcvbufErrors": 6}
    assert udprecv.kernel_udp_counters(str(tmp_path / "none")) == {}

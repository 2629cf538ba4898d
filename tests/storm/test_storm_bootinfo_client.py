"""The storm's bootinfo loader on real loopback sockets, against a scripted server: what a
waiting loader accepts (the bootinfo protocol: a REPLY from the server's port, an ORDER
from the order port).  A storm once lost 41 nodes whose retransmitted question was answered
after their allocation reached the server: the first answer said WAIT, the late one
BOOTING, and a loader that took only ORDERs while waiting waited for one that never came.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from bootherd.bootinfo import codec
from bootherd.bootinfo.codec import BootWhat, Opcode
from bootherd.boottype import BootType
from bootherd.storm import clients as c
from bootherd.storm.net import Loss, open_udp

HOST = "127.0.0.1"
WAIT = BootWhat(BootType.WAIT)
PART = BootWhat(BootType.PART, partition=2)


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    return s


async def ask(server: socket.socket, order: socket.socket, wait: float = 3.0):  # noqa: ANN201
    ep = await open_udp(Loss(), HOST, 0)
    task = asyncio.ensure_future(c.bootinfo_ask(ep, server.getsockname(),
                                                order.getsockname()[1], c.Tally(), wait))
    return ep, task


async def question(server: socket.socket) -> tuple[str, int]:
    data, addr = await asyncio.get_running_loop().sock_recvfrom(server, 1024)
    assert codec.decode(data).opcode == Opcode.REQUEST
    return addr


async def test_a_waiting_loader_takes_a_late_reply_to_its_retransmitted_question() -> None:
    server, order = udp(), udp()
    server.setblocking(False)
    ep, task = await ask(server, order)
    try:
        addr = await question(server)
        server.sendto(codec.reply(WAIT), addr)
        await asyncio.sleep(0.2)
        server.sendto(codec.reply(WAIT), addr)  # another copy of the first answer
        await asyncio.sleep(0.2)
        assert not task.done()
        server.sendto(codec.reply(PART), addr)  # the retransmission's, decided later
        assert await asyncio.wait_for(task, 2) == PART
    finally:
        ep.close()
        server.close()
        order.close()


async def test_a_waiting_loader_ignores_replies_from_elsewhere_and_asks_again_on_auto() -> None:
    server, order, stranger = udp(), udp(), udp()
    server.setblocking(False)
    ep, task = await ask(server, order)
    try:
        addr = await question(server)
        server.sendto(codec.reply(WAIT), addr)
        await asyncio.sleep(0.2)
        stranger.sendto(codec.reply(PART), addr)  # not its server's port
        order.sendto(codec.reply(PART), addr)     # a REPLY opcode from the order port
        await asyncio.sleep(0.2)
        assert not task.done()
        order.sendto(codec.reply(BootWhat(BootType.AUTO), Opcode.ORDER), addr)
        addr = await asyncio.wait_for(question(server), 2)  # AUTO: it asks again
        server.sendto(codec.reply(PART), addr)
        assert await asyncio.wait_for(task, 2) == PART
    finally:
        ep.close()
        for s in (server, order, stranger):
            s.close()


async def test_a_loader_told_wait_and_never_ordered_times_out() -> None:
    server, order = udp(), udp()
    server.setblocking(False)
    ep, task = await ask(server, order, wait=0.5)
    try:
        server.sendto(codec.reply(WAIT), await question(server))
        with pytest.raises(c.WaitTimeout):
            await asyncio.wait_for(task, 3)
    finally:
        ep.close()
        server.close()
        order.close()

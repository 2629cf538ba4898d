"""The storm's bootinfo loader on real loopback sockets, against a scripted server: what a
waiting loader accepts (the bootinfo protocol: a REPLY from the server's port, an ORDER
from the order port).  A storm once lost 41 nodes whose retransmitted question was answered
after their allocation reached the server: the first answer said WAIT, the late one
BOOTING, and a loader that took only ORDERs while waiting waited for one that never came.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    s.setblocking(False)
    return s


class Lab:
    """The scripted server's two ports and a loader asking it, all on loopback."""

    def __init__(self) -> None:
        self.server, self.order, self.stranger = udp(), udp(), udp()
        self.ep = self.task = None

    async def ask(self, wait: float = 3.0) -> tuple[str, int]:
        """Start the loader; returns the address its first question came from."""
        self.ep = await open_udp(Loss(), HOST, 0)
        self.task = asyncio.ensure_future(c.bootinfo_ask(
            self.ep, self.server.getsockname(), self.order.getsockname()[1], c.Tally(), wait))
        return await self.question()

    async def question(self) -> tuple[str, int]:
        data, addr = await asyncio.wait_for(
            asyncio.get_running_loop().sock_recvfrom(self.server, 1024), 2)
        assert codec.decode(data).opcode == Opcode.REQUEST
        return addr

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.ep is not None:
            self.ep.close()
        for s in (self.server, self.order, self.stranger):
            s.close()


@pytest.fixture
async def lab():  # noqa: ANN201
    lab = Lab()
    yield lab
    await lab.close()


async def test_a_waiting_loader_takes_a_late_reply_to_its_retransmitted_question(lab) -> None:  # noqa: ANN001
    addr = await lab.ask()
    lab.server.sendto(codec.reply(WAIT), addr)
    await asyncio.sleep(0.2)
    lab.server.sendto(codec.reply(WAIT), addr)  # another copy of the first answer
    await asyncio.sleep(0.2)
    assert not lab.task.done()
    lab.server.sendto(codec.reply(PART), addr)  # the retransmission's, decided later
    assert await asyncio.wait_for(lab.task, 2) == PART


async def test_a_waiting_loader_ignores_replies_from_elsewhere_and_asks_again_on_auto(lab) -> None:  # noqa: ANN001
    addr = await lab.ask()
    lab.server.sendto(codec.reply(WAIT), addr)
    await asyncio.sleep(0.2)
    lab.stranger.sendto(codec.reply(PART), addr)  # not its server's port
    lab.order.sendto(codec.reply(PART), addr)     # a REPLY opcode from the order port
    await asyncio.sleep(0.2)
    assert not lab.task.done()
    lab.order.sendto(codec.reply(BootWhat(BootType.AUTO), Opcode.ORDER), addr)
    addr = await lab.question()  # AUTO: it asks again
    lab.server.sendto(codec.reply(PART), addr)
    assert await asyncio.wait_for(lab.task, 2) == PART


async def test_a_loader_told_wait_and_never_ordered_times_out(lab) -> None:  # noqa: ANN001
    lab.server.sendto(codec.reply(WAIT), await lab.ask(wait=0.5))
    with pytest.raises(c.WaitTimeout):
        await asyncio.wait_for(lab.task, 3)

"""The bootinfo core as a decision table: (datagram, source address, snapshot, the
coordinator's answer) -> reply bytes and counters.  No sockets, no clock, no database.
The transport around it has its smoke test in test_bootinfo_server.py."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
from memsnap import MFS, node, snapshot

from bootherd.bootinfo import codec
from bootherd.bootinfo.codec import BootWhat, Opcode, Packet
from bootherd.bootinfo.core import BootinfoCore, order_packet
from bootherd.boottype import BootType
from bootherd.config import build
from bootherd.lifecycle import Coordinator, Via
from bootherd.policy import BootDecision

PC1 = node(1, privkey="k-pc1")
SNAP = snapshot(PC1, node(2, allocated=False))
PART = BootDecision(BootType.PART, partition=2, cmdline="quiet", image="DISK")


def raw(opcode: int, version: int = 1, data: bytes = b"") -> bytes:
    return codec.encode(Packet(opcode=opcode, version=version, data=data))


@dataclass
class Row:
    why: str
    data: bytes
    ip: str = PC1.control_ip or ""
    answer: BootDecision = PART
    reply: BootWhat | None = None    # None: nothing is sent
    asked: tuple | None = None       # (node_id or None, version) the coordinator was asked
    counted: dict[str, int] = field(default_factory=dict)


ROWS = [
    Row("a node asks by its address", codec.request(), reply=BootWhat(
        BootType.PART, flags=1, partition=2, cmdline="quiet"), asked=("pc1", 1),
        counted={"requests": 1, "replies": 1, "reply_part": 1}),
    Row("a version 0 loader gets a version 0 reply", codec.request(version=0),
        reply=BootWhat(BootType.PART, flags=1, partition=2, cmdline="quiet"), asked=("pc1", 0)),
    Row("an unknown address is asked about as no node", codec.request(), ip="10.9.9.9",
        answer=BootDecision(BootType.WAIT), reply=BootWhat(BootType.WAIT), asked=(None, 1),
        counted={"unknown_nodes": 1, "reply_wait": 1}),
    Row("a wide-area node asks by its key, from anywhere", codec.keyed_request("k-pc1"),
        ip="192.0.2.7", reply=BootWhat(BootType.PART, flags=1, partition=2, cmdline="quiet"),
        asked=("pc1", 1)),
    Row("an unknown key gets no answer at all", codec.keyed_request("nope"),
        counted={"unknown_key": 1, "requests": 0}),
    Row("a key that is not NUL-terminated is malformed", raw(Opcode.KEYED_REQUEST, 1, b"k" * 512),
        counted={"malformed": 1}),
    *(Row(f"{len(b)} bytes is malformed", b, counted={"malformed": 1, "packets": 1})
      for b in (b"", b"x", bytes(519), bytes(521))),
    *(Row(f"a {op.name} is not a question", raw(op), counted={"ignored": 1})
      for op in (Opcode.REPLY, Opcode.ACK, Opcode.ORDER, Opcode.INFO)),
    Row("an unknown opcode is not a question", raw(77), counted={"ignored": 1}),
    Row("a kernel answer names its server and file", codec.request(),
        answer=BootDecision(BootType.MB, server="10.0.0.254", path="/k/vmlinuz", cmdline="ro"),
        reply=BootWhat(BootType.MB, flags=1, server="10.0.0.254", filename="/k/vmlinuz",
                       cmdline="ro")),
    Row("an MFS answer is ip:path", codec.request(),
        answer=BootDecision(BootType.MFS, server="10.0.0.254", path="/tftpboot/frisbee"),
        reply=BootWhat(BootType.MFS, mfs="10.0.0.254:/tftpboot/frisbee")),
    Row("a disk and partition", codec.request(),
        answer=BootDecision(BootType.DISKPART, disk=0x81, partition=3),
        reply=BootWhat(BootType.DISKPART, disk=0x81, partition=3)),
    Row("an answer that does not fit the wire is counted, not sent", codec.request(),
        answer=BootDecision(BootType.MFS, server="10.0.0.254", path="/" + "x" * 300),
        asked=("pc1", 1), counted={"encode_errors": 1, "replies": 0}),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.why for r in ROWS])
def test_decision_table(row: Row) -> None:
    asked: list[tuple] = []

    def ask(snap, n, version):  # noqa: ANN001, ANN202 - the coordinator's place
        asked.append((n.node_id if n else None, version))
        return row.answer

    core = BootinfoCore(ask, Counter())
    out = core.handle(row.data, row.ip, SNAP)
    if row.reply is None:
        assert out is None
    else:
        assert out is not None and out.ip == row.ip
        pkt = codec.decode(out.data)
        assert (pkt.opcode, pkt.status) == (Opcode.REPLY, 0)
        assert pkt.version == codec.decode(row.data).version
        assert pkt.boot_what() == row.reply
    if row.asked is not None:
        assert asked == [row.asked]
    elif row.reply is None:
        assert asked == []  # no question: the coordinator is not bothered
    for name, n in row.counted.items():
        assert core.c[name] == n, name


def test_orders_are_loader_orders_only() -> None:
    for kind in (BootType.AUTO, "reboot", "RESTART"):
        pkt = codec.decode(order_packet(kind))
        assert pkt.opcode == Opcode.ORDER and pkt.boot_what().type.name == str(
            getattr(kind, "name", kind)).upper()
    for bad in (BootType.PART, BootType.WAIT, "BOGUS"):
        with pytest.raises(ValueError):
            order_packet(bad)


def test_with_the_coordinator_a_one_shot_os_is_answered_once() -> None:
    """The core's `ask` is the coordinator's boot question (as the service wires it)."""
    lc = Coordinator(build({}), "A")
    n = node(1, next_os=MFS)
    snap = snapshot(n)
    effects: list = []

    def ask(s, nd, v):  # noqa: ANN001, ANN202
        ans = lc.boot_question(s, nd, Via.BOOTINFO, now=1.0, version=v)
        effects.extend(ans.effects)
        return ans.decision

    core = BootinfoCore(ask)
    first = codec.decode(core.handle(codec.request(), n.control_ip, snap).data).boot_what()
    second = codec.decode(core.handle(codec.request(), n.control_ip, snap).data).boot_what()
    assert first.type is BootType.MFS and first.cmdline == "console=ttyS0"
    assert second.type is BootType.PART
    assert [type(e).__name__ for e in effects].count("ClearNextOS") == 1

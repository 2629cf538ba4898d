"""Plain read-only requests answered on the native thread from its per-address table
(tmcd/front.py): the core's own bytes and counters, a node's own answers only, the
request forms the core would read the same way, and nothing kept past a new snapshot."""

from __future__ import annotations

from collections import Counter

from conftest import ask
from sqlalchemy import update

from bootherd.inventory import schema as s
from bootherd.tmcd import front
from bootherd.tmcd.server import PURE_COMMANDS, TmcdCore

SERVER = "127.0.0.1"  # the address the test's requests reach (replies name it)


def _scratch(env) -> TmcdCore:  # noqa: ANN001
    """A core of its own (its own counters) deciding with the server's views."""
    core = env.service.core
    return TmcdCore(core.views, Counter(), core.max_request,
                    env.ctx.config.tmcd.trusted_ranges)


def _askers(env) -> list:  # noqa: ANN001
    """An allocated node, a free one, a vnode host (and a vnode with an address of its
    own, if the testbed has one)."""
    snap = env.snap
    hosts = [n for n in env.allocated() if snap.vnodes.get(n.node_id)]
    vnodes = [n for n in env.allocated() if n.phys_node_id]
    plain = [n for n in env.allocated() if not n.phys_node_id and n not in hosts]
    free = [n for n in env.free() if n.control_ip]
    return [n for n in (plain[:1] + free[:1] + vnodes[:1] + hosts[:1])]


def _assert_native(env) -> None:  # noqa: ANN001
    assert front.available, "the native front is built by scripts/setup.sh"
    assert env.service.server.front is not None and env.service.server.front.answering


async def test_answers_are_the_cores_to_the_byte_and_counted_alike(env) -> None:  # noqa: ANN001
    _assert_native(env)
    scratch, askers = _scratch(env), _askers(env)
    assert len(askers) >= 3
    for node in askers:
        for _ in range(2):
            for cmd in PURE_COMMANDS:
                line = f"VERSION=40 {cmd} "
                want = scratch.handle(line.encode(), node.control_ip, env.snap,
                                      server=SERVER).reply
                assert await ask(env.port, line, node.control_ip) == want, (node.node_id, cmd)
    c = env.counters
    # All but each address's first two requests came from the table.
    assert c["answered_natively"] == len(askers) * (2 * len(PURE_COMMANDS) - 2)
    counted = {k: v for k, v in scratch.c.items() if k != "answered_natively"}
    assert counted and {k: c[k] for k in counted} == counted
    assert c["not_allocated"] > 0 and c["replies"] > 0


async def test_a_node_gets_its_own_answers_only(env) -> None:  # noqa: ANN001
    _assert_native(env)
    a, b = [n for n in env.allocated() if not n.phys_node_id][:2]
    for node in (a, b):  # both tables filled
        for cmd in ("status", "ifconfig", "accounts"):
            await ask(env.port, f"VERSION=40 {cmd} ", node.control_ip)
    before = env.counters["answered_natively"]
    mine = await ask(env.port, "VERSION=40 ifconfig ", a.control_ip)
    theirs = await ask(env.port, "VERSION=40 ifconfig ", b.control_ip)
    assert env.counters["answered_natively"] == before + 2
    assert mine and theirs and mine != theirs
    mac = next(i.mac for i in a.interfaces if i.role == "expt" and i.ip)
    assert mac.replace(":", "").lower().encode() in mine
    assert mac.replace(":", "").lower().encode() not in theirs
    scratch = _scratch(env)
    assert mine == scratch.handle(b"ifconfig", a.control_ip, env.snap, server=SERVER).reply


# Request forms: the thread answers only those the core reads as "the command, nothing
# else" and must answer everything else exactly as the core does (malformed included).
FORMS = [
    "VERSION=40 ifconfig ", "ifconfig", "ifconfig\n", "VERSION=40 ifconfig\r\n",
    "VERSION=40\tifconfig\t", "  VERSION=7 ifconfig  \n", "ifconfig \r\n", "ifconfig\r\r\n",
    "ifconfig\r \n", "VERSION=12345 ifconfig ", "VERSION=4a ifconfig ", "VERSION= ifconfig",
    "IFCONFIG ", "Ifconfig", "ifconfig extra", "VERSION=40 ifconfig junk\n", "IDKEY=x ifconfig ",
    "VERSION=40 VERSION=40 ifconfig", "ifconfig\nstatus", "status\nifconfig", "___ ", "_ ",
    "VERSION=40 ifcon\x01fig ", "ifconfig\x0b", "ifconfig\x7f", "VNODEID= ifconfig",
    "nosuchcommand ", "VERSION=40 status", "\nifconfig", "ifconfig" + " " * 5000,
    "VERSION=40 fullconfig ", "VERSION=40 isalive ", "VERSION=40 state ", "VERSION=40 reboot ",
]


async def test_request_forms_are_read_as_the_core_reads_them(env) -> None:  # noqa: ANN001
    _assert_native(env)
    node = next(n for n in env.allocated() if not n.phys_node_id)
    for cmd in ("status", "ifconfig"):  # the table is filled
        await ask(env.port, f"VERSION=40 {cmd} ", node.control_ip)
    scratch = _scratch(env)
    before = env.counters["answered_natively"]
    for line in [*FORMS, "ifconfig\xff".encode("latin-1")]:
        data = line.encode() if isinstance(line, str) else line
        want = scratch.handle(data, node.control_ip, env.snap, server=SERVER).reply
        assert await ask(env.port, data, node.control_ip) == want, repr(line)
    # The plain forms came from the table: the first eight, the two whose first line is
    # plain ("ifconfig\nstatus", "status\nifconfig") and "VERSION=40 status".
    assert env.counters["answered_natively"] - before == 11


async def test_a_new_snapshot_forgets_every_answer(env) -> None:  # noqa: ANN001
    _assert_native(env)
    node = next(n for n in env.allocated() if not n.phys_node_id)
    for cmd in ("status", "ifconfig", "accounts"):
        await ask(env.port, f"VERSION=40 {cmd} ", node.control_ip)
    assert b"Renamed Person" not in await ask(env.port, "accounts", node.control_ip)
    native = env.counters["answered_natively"]
    assert native >= 2
    login = env.snap.experiments[(node.allocation.pid, node.allocation.eid)].members[0][0]
    with env.live.engine.begin() as conn:
        conn.execute(update(s.users).where(s.users.c.login == login)
                     .values(name="Renamed Person", serial=2))
    assert await env.live.refresh()
    assert b"Renamed Person" in await ask(env.port, "accounts", node.control_ip)
    # Asked again through Python (the table was forgotten), then from the new table.
    for cmd in ("status", "ifconfig"):
        await ask(env.port, f"VERSION=40 {cmd} ", node.control_ip)
    assert b"Renamed Person" in await ask(env.port, "accounts", node.control_ip)
    assert env.counters["answered_natively"] > native

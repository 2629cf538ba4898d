"""Exact reply formats of every boot-time command, over TCP, for generated nodes."""

from __future__ import annotations

import re

import pytest
from conftest import ask

from bootherd.tmcd.protocol import FULLCONFIG_SECTIONS, split_fullconfig


def _host(env):  # noqa: ANN001, ANN202
    """node0 of experiment 0: has vnodes, a tunnel, a trafgen and a shaped link."""
    snap = env.snap
    return next(n for n in snap.nodes.values() if n.allocation and n.allocation.vname == "node0"
                and (n.allocation.pid, n.allocation.eid) == ("proj0", "exp0"))


async def q(env, node, cmd: str) -> str:  # noqa: ANN001
    return (await ask(env.port, f"VERSION=40 {cmd} ", node.control_ip)).decode()


async def test_status(env) -> None:  # noqa: ANN001
    n = _host(env)
    assert await q(env, n, "status") == "ALLOCATED=proj0/exp0 NICKNAME=node0\n"
    f = env.free()[0]
    assert await q(env, f, "status") == "FREE\n"


async def test_ntpinfo(env) -> None:  # noqa: ANN001
    n = _host(env)
    assert await q(env, n, "ntpinfo") == f"SERVER=ntp1\nPEER=ntp2\nDRIFT={n.ntp_drift:g}\n"


async def test_mounts(env) -> None:  # noqa: ANN001
    n = _host(env)
    login = env.snap.experiments[("proj0", "exp0")].creator
    assert await q(env, n, "mounts") == (
        "FSTYPE=NFS\nREMOTE=fs:/proj/proj0 LOCAL=/proj/proj0\n"
        f"REMOTE=fs:/users/{login} LOCAL=/users/{login}\n")


async def test_accounts(env) -> None:  # noqa: ANN001
    n = _host(env)
    snap = env.snap
    exp = snap.experiments[("proj0", "exp0")]
    lines = (await q(env, n, "accounts")).splitlines()
    assert lines[0] == "ADDGROUP NAME=proj0 GID=6000"
    users = [snap.users[login] for login, _ in exp.members]
    for (login, root), line in zip(exp.members, lines[1:1 + len(users)], strict=True):
        u = snap.users[login]
        assert line == (f"ADDUSER LOGIN={u.login} PSWD={u.password_hash} UID={u.uid} "
                        f"GID={u.gid} ROOT={int(root)} NAME=\"{u.name}\" "
                        f"HOMEDIR=/users/{u.login} GLIST=\"\" SERIAL={u.serial} "
                        f"EMAIL=\"{u.email}\" SHELL={u.shell}")
    keys = [f'PUBKEY LOGIN={u.login} KEY="{k}"' for u in users for k in u.keys]
    assert lines[1 + len(users):] == keys
    assert any("ROOT=1" in x for x in lines) and any("ROOT=0" in x for x in lines)


async def test_ifconfig(env) -> None:  # noqa: ANN001
    n = _host(env)
    i = next(i for i in n.interfaces if i.role == "expt" and i.ip)
    assert await q(env, n, "ifconfig") == (
        f"INTERFACE IFACETYPE=any INET={i.ip} MASK=255.255.255.0 "
        f"MAC={i.mac.replace(':', '')} SPEED=10000Mbps DUPLEX=full IFACE=eth1 RTABID= "
        "LAN=lan0\n")


async def test_tunnels(env) -> None:  # noqa: ANN001
    assert await q(env, _host(env), "tunnels") == \
        "TUNNEL=tun0 MEMBER=node1 KEY='proto' VALUE='gre'\n"


async def test_hostnames(env) -> None:  # noqa: ANN001
    n = _host(env)
    text = await q(env, n, "hostnames")
    snap = env.snap
    expected = set()
    for nid in snap.experiment_nodes[("proj0", "exp0")]:
        m = snap.nodes[nid]
        for i in m.interfaces:
            if i.role == "expt" and i.ip and i.lan:
                expected.add(f"NAME={m.allocation.vname}-{i.lan} IP={i.ip} ALIASES=''")
    assert set(text.splitlines()) == expected and len(text.splitlines()) == len(expected)
    assert text.splitlines()[0].startswith("NAME=node0-lan0 ")


def _static_node0(env):  # noqa: ANN001, ANN202
    return next(n for n in env.snap.nodes.values() if n.allocation
                and (n.allocation.eid, n.allocation.vname) == ("exp1", "node0"))


async def test_routing(env) -> None:  # noqa: ANN001
    assert await q(env, _host(env), "routing") == "ROUTERTYPE=none\n"
    n = _static_node0(env)
    r = env.snap.routes[n.node_id][0]
    assert await q(env, n, "routing") == (
        "ROUTERTYPE=static\n"
        f"ROUTE DEST=10.250.0.0 DESTTYPE=net DESTMASK=255.255.0.0 NEXTHOP={r['nexthop']} "
        f"COST=1 SRC={r['src']}\n")


async def test_routelist(env) -> None:  # noqa: ANN001
    assert await q(env, _host(env), "routelist") == "ROUTERTYPE=none\n"
    n = _static_node0(env)
    lines = (await q(env, n, "routelist")).splitlines()
    assert lines[0] == "ROUTERTYPE=static"
    assert len(lines) > 1
    for line in lines[1:]:
        assert re.fullmatch(r"ROUTE NODE=node\d+ SRC=10\.\d+\.\d+\.\d+ DEST=10\.250\.0\.0 "
                            r"DESTTYPE=net DESTMASK=255\.255\.0\.0 NEXTHOP=[\d.]+ COST=1", line)


async def test_trafgens(env) -> None:  # noqa: ANN001
    assert await q(env, _host(env), "trafgens") == (
        "TRAFGEN=cbr0 MYNAME=node0 MYPORT=6000 PEERNAME=node1 PEERPORT=6001 PROTO=udp "
        "ROLE=source GENERATOR=TG\n")


async def test_nseconfigs(env) -> None:  # noqa: ANN001
    assert await q(env, _host(env), "nseconfigs") == "set ns [new Simulator]\n$ns run\n"


async def test_rpms(env) -> None:  # noqa: ANN001
    # The RPM row is for vname node0 only.
    assert await q(env, _host(env), "rpms") == \
        "SERVER=127.0.0.1:8080 RPM=rpms/proj0-agent-1.0-1.x86_64.rpm USEWEB=1\n"
    other = next(n for n in env.allocated() if n.allocation.vname == "node2"
                 and n.allocation.eid == "exp0")
    assert await q(env, other, "rpms") == ""


async def test_tarballs(env) -> None:  # noqa: ANN001
    line = "SERVER=127.0.0.1:8080 DIR=/usr/local TARBALL=tarballs/proj0-tools.tar.gz USEWEB=1\n"
    assert await q(env, _host(env), "tarballs") == line
    node1 = next(n for n in env.allocated() if (n.allocation.eid, n.allocation.vname)
                 == ("exp0", "node1"))
    assert await q(env, node1, "tarballs") == \
        line + "SERVER=127.0.0.1:8080 DIR=/opt TARBALL=tarballs/only-node1.tgz USEWEB=1\n"


async def test_tarballs_sha256_hook(env) -> None:  # noqa: ANN001
    env.ctx.shared["file_sha256"] = lambda path: "ab" * 32 if path.endswith("tools.tar.gz") \
        else None
    env.service.views.invalidate()
    assert await q(env, _host(env), "tarballs") == (
        "SERVER=127.0.0.1:8080 DIR=/usr/local TARBALL=tarballs/proj0-tools.tar.gz USEWEB=1 "
        f"SHA256={'ab' * 32}\n")


async def test_startupcmd(env) -> None:  # noqa: ANN001
    swapper = env.snap.experiments[("proj0", "exp0")].swapper
    assert await q(env, _host(env), "startupcmd") == \
        f"CMD='/proj/proj0/start.sh' UID={swapper}\n"


async def test_delay(env) -> None:  # noqa: ANN001
    n = _host(env)
    d = env.snap.link_delays[n.node_id][0]
    assert await q(env, n, "delay") == (
        f"DELAY INT0={d['int0'].replace(':', '')} INT1={d['int1'].replace(':', '')} "
        f"PIPE0={d['pipe0']} DELAY0=10 BW0=100000 PLR0=0 PIPE1={d['pipe1']} DELAY1=10 "
        "BW1=100000 PLR1=0 LINKNAME=link0\n")


async def test_ipodinfo(env) -> None:  # noqa: ANN001
    text = await q(env, _host(env), "ipodinfo")
    assert re.fullmatch(r"HOST=127\.0\.0\.1 MASK=255\.255\.255\.255 HASH=[0-9a-f]{32}\n", text)
    assert await q(env, _host(env), "ipodinfo") == text  # stable per node


async def test_vnodelist(env) -> None:  # noqa: ANN001
    n = _host(env)
    assert await q(env, n, "vnodelist") == \
        f"VNODEID={n.node_id}v0 JAILED=1\nVNODEID={n.node_id}v1 JAILED=0\n"


async def test_isalive(env) -> None:  # noqa: ANN001
    n = _host(env)
    assert await q(env, n, "isalive") == "UPDATE=0\n"
    assert env.service.server.alive[n.node_id][0] == 1


async def test_creator(env) -> None:  # noqa: ANN001
    e = env.snap.experiments[("proj0", "exp0")]
    assert await q(env, _host(env), "creator") == f"CREATOR={e.creator} SWAPPER={e.swapper}\n"


async def test_bootwhat(env) -> None:  # noqa: ANN001
    assert await q(env, _host(env), "bootwhat") == "STATUS=success TYPE=1 WHAT=1\n"
    assert await q(env, env.free()[0], "bootwhat") == "STATUS=success TYPE=4\n"


async def test_state_and_reboot(env) -> None:  # noqa: ANN001
    n = _host(env)
    assert await q(env, n, "state TBSETUP") == ""
    assert env.live.state_of(n.node_id)[0] == "TBSETUP"
    assert await q(env, n, "reboot") == ""
    assert n.node_id in env.service.server.reboots
    assert env.live.state_of(n.node_id)[0] == "TBSETUP"  # reboot is noted, not a state
    assert await q(env, n, "state bad;state") == ""
    assert env.live.state_of(n.node_id)[0] == "TBSETUP"


async def test_fullconfig_matches_single_commands(env) -> None:  # noqa: ANN001
    n = _host(env)
    text = await q(env, n, "fullconfig")
    assert text.startswith("*** ntpinfo\n") and text.endswith("*** creator\n")
    secs = split_fullconfig(text)
    assert list(secs) == list(FULLCONFIG_SECTIONS)
    for name in ("status", "state", "reboot", "isalive", "hostnames"):
        assert f"*** {name}\n" not in text
    for name in FULLCONFIG_SECTIONS:
        assert secs[name] == await q(env, n, name), name


@pytest.mark.parametrize("cmd", ["mounts", "accounts", "ifconfig", "tunnels", "hostnames",
                                 "routing", "routelist", "trafgens", "nseconfigs", "rpms",
                                 "tarballs", "startupcmd", "delay", "creator"])
async def test_free_node_gets_nothing(env, cmd: str) -> None:  # noqa: ANN001
    assert await q(env, env.free()[0], cmd) == ""


async def test_free_node_fullconfig(env) -> None:  # noqa: ANN001
    secs = split_fullconfig(await q(env, env.free()[0], "fullconfig"))
    assert secs["accounts"] == "" and secs["mounts"] == ""
    assert secs["ntpinfo"].startswith("SERVER=ntp1")


async def test_render_cache_one_render_per_node(env) -> None:  # noqa: ANN001
    views = env.service.views
    n = _host(env)
    before = views.renders
    for cmd in ("fullconfig", "accounts", "mounts", "ifconfig", "isalive", "fullconfig"):
        await q(env, n, cmd)
    assert views.renders - before <= 1


async def test_unknown_command_gets_nothing(env) -> None:  # noqa: ANN001
    assert await q(env, _host(env), "frobnicate") == ""
    assert env.counters["unknown_command"] == 1

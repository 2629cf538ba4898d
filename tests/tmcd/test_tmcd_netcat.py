"""The wire format as seen by a tool that is not ours: OpenBSD netcat."""

from __future__ import annotations

import asyncio
import shutil

import pytest

NC = shutil.which("nc")
pytestmark = pytest.mark.skipif(NC is None, reason="netcat (nc, netcat-openbsd) is not installed")


async def nc(args: list[str], data: bytes) -> bytes:
    p = await asyncio.create_subprocess_exec(
        NC, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(p.communicate(data), 15)
    return out


@pytest.fixture
def env(both_transports):  # noqa: ANN001, ANN201 - these run on both transports
    return both_transports


def _host(env):  # noqa: ANN001, ANN202
    return next(n for n in env.snap.nodes.values() if env.snap.vnodes.get(n.node_id))


async def test_nc_status_without_newline(env) -> None:  # noqa: ANN001
    # Exactly what an operator types: no newline, no half-close (-N not given).
    ip = _host(env).control_ip
    out = await nc(["-w", "3", "-s", ip, "127.0.0.1", str(env.port)], b"VERSION=40 status ")
    assert out == b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"


async def test_nc_fullconfig_halfclose(env) -> None:  # noqa: ANN001
    ip = _host(env).control_ip
    out = await nc(["-N", "-w", "3", "-s", ip, "127.0.0.1", str(env.port)],
                   b"VERSION=40 fullconfig \n")
    assert out.startswith(b"*** nodeid\n" + _host(env).node_id.encode() + b"\n*** nodeid\n")
    assert b"*** accounts\nADDGROUP NAME=proj0 GID=6000\n" in out
    assert out.endswith(b"*** disks\n*** disks\n")


async def test_nc_udp_status_and_no_secrets(env) -> None:  # noqa: ANN001
    ip = _host(env).control_ip
    out = await nc(["-u", "-w", "1", "-s", ip, "127.0.0.1", str(env.port)],
                   b"VERSION=40 status ")
    assert out == b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"
    out = await nc(["-u", "-w", "1", "-s", ip, "127.0.0.1", str(env.port)],
                   b"VERSION=40 accounts ")
    assert out == b""


async def test_nc_unknown_source_gets_nothing(env) -> None:  # noqa: ANN001
    out = await nc(["-w", "3", "-s", "127.0.0.5", "127.0.0.1", str(env.port)],
                   b"VERSION=40 accounts ")
    assert out == b""
    out = await nc(["-w", "3", "-s", "127.0.0.5", "127.0.0.1", str(env.port)],
                   f"VERSION=40 REDIRECT={_host(env).control_ip} accounts ".encode())
    assert out == b""

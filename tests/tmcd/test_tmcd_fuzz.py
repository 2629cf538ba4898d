"""Hypothesis: the request parser and a live server never crash on garbage."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from conftest import make_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootherd.tmcd.protocol import Malformed, parse_request, render_request, split_fullconfig

TOKENS = st.sampled_from(["VERSION=40", "VERSION=2", "VNODEID=pc1v0", "PROXYFOR=x",
                          "PRIVKEY=00", "REDIRECT=127.77.0.2", "IDKEY=k", "status", "state",
                          "ISUP", "fullconfig", "accounts", "isalive", "=", "A=", "*** x",
                          "\n", " ", "\t", "ISPEAKSSL_TMCDV10"])
GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.lists(TOKENS, max_size=12).map(lambda t: " ".join(t).encode()),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
)


@given(GARBAGE)
@settings(max_examples=500, deadline=None)
def test_parser_only_raises_malformed(data: bytes) -> None:
    try:
        req = parse_request(data)
    except Malformed:
        return
    assert req.command and req.command == req.command.lower()
    assert req.version >= 0


@given(st.sampled_from(["status", "state", "fullconfig"]),
       st.from_regex(r"[A-Z]{0,10}", fullmatch=True),
       st.sampled_from([None, "pc3v0"]))
def test_render_parse_roundtrip(cmd: str, args: str, vnode: str | None) -> None:
    req = parse_request(render_request(cmd, args, VNODEID=vnode))
    assert (req.command, req.args, req.version, req.vnodeid) == (cmd, args, 40, vnode)


@given(st.dictionaries(st.sampled_from(["ntpinfo", "mounts", "accounts", "creator"]),
                       st.lists(st.from_regex(r"[A-Z]+=[a-z0-9]*", fullmatch=True),
                                max_size=3).map(lambda ls: "".join(x + "\n" for x in ls))))
def test_fullconfig_split_roundtrip(sections: dict[str, str]) -> None:
    from bootherd.tmcd.protocol import render_fullconfig

    assert split_fullconfig(render_fullconfig(sections)) == sections


class ServerThread:
    """A TMCD server on its own event loop, so hypothesis can drive it synchronously."""

    def __init__(self, tmp_path) -> None:  # noqa: ANN001
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.tmp = tmp_path
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        assert self.ready.wait(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.env = self.loop.run_until_complete(
            make_env(self.tmp, extra=["tmcd.read_timeout=0.5"]))
        self.ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            await self.env.wiring.stop()
            await self.env.live.stop()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.t.join(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # noqa: ANN001, ANN201
    s = ServerThread(tmp_path_factory.mktemp("fuzz"))
    yield s
    s.close()


def _tcp(port: int, data: bytes, src: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(src, 0)) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            return b""  # the server may close first on oversized garbage
        out = b""
        while True:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return out
            if not b:
                return out
            out += b


@given(GARBAGE, st.booleans())
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_live_server_survives_garbage(server, data: bytes, udp: bool) -> None:  # noqa: ANN001
    env = server.env
    host = sorted((n for n in env.snap.nodes.values() if n.allocation and n.control_ip),
                  key=lambda n: n.node_id)[0]
    if udp:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host.control_ip, 0))
            s.sendto(data or b" ", ("127.0.0.1", env.port))
    else:
        _tcp(env.port, data, host.control_ip)
    # A valid client keeps getting its answer after every piece of garbage.
    assert _tcp(env.port, b"VERSION=40 status \n", host.control_ip).startswith(b"ALLOCATED=")
    assert env.counters["internal_errors"] == 0

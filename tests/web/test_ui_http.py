"""The console over HTTP against a real server (aiohttp client, real sockets): sign-in and
its cookie, forged and expired sessions, cross-site and token-less posts, unknown nodes
and pages, the actions, read-only mode, the update stream, and that open consoles read
nothing from the database.  Every refusal is a page or JSON with a sentence, never a
traceback; a fuzz test sends random input to every console route."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event as sa_event
from sqlalchemy import select
from web_helpers import Server, start_server, stop_server
from web_helpers import server_fixture as server  # noqa: F401
from yarl import URL

from bootherd import admintoken
from bootherd.inventory import ops, schema
from bootherd.procs import free_port
from bootherd.web.ui import UI_KEY
from bootherd.web.ui.session import COOKIE

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def ui_state(s: Server):  # noqa: ANN201
    return next(sub[UI_KEY] for sub in s.svc.app._subapps)  # type: ignore[union-attr]


def client() -> aiohttp.ClientSession:
    # unsafe: the cookie jar keeps cookies of IP-address hosts (127.0.0.1)
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(c: aiohttp.ClientSession, s: Server) -> str:
    """Sign in; returns the session's CSRF token (from a page, as a browser gets it)."""
    r = await c.post(s.url + "/ui/login", data={"token": s.token, "next": "/ui/nodes"},
                     allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/ui/nodes"
    page = await (await c.get(s.url + "/ui/nodes")).text()
    return CSRF.search(page).group(1)


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text


async def test_pages_lead_to_the_sign_in_form(server: Server) -> None:  # noqa: F811
    async with client() as c:
        for path in ("/ui/", "/ui/storm", "/ui/nodes?q=pc1", "/ui/nodes/pc1"):
            r = await c.get(server.url + path, allow_redirects=False)
            assert r.status == 303, path
            assert r.headers["Location"].startswith("/ui/login?next=")
        for path in ("/ui/nodes.json", "/ui/events"):
            r = await c.get(server.url + path)
            assert r.status == 401 and (await r.json())["signin"] == "/ui/login"
        r = await c.get(server.url + "/", allow_redirects=False)
        assert r.status == 302 and r.headers["Location"] == "/ui/"
        r = await c.get(server.url + "/ui/login?next=/ui/nodes/pc2")
        page = await r.text()
        assert r.status == 200 and 'type="password"' in page and 'value="/ui/nodes/pc2"' in page
        assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert r.headers["X-Frame-Options"] == "DENY"


async def test_sign_in_cookie_and_wrong_tokens(server: Server) -> None:  # noqa: F811
    async with client() as c:
        r = await c.post(server.url + "/ui/login", data={"token": "wrong"})
        assert r.status == 401 and "not the admin token" in await r.text()
        assert COOKIE not in r.cookies
        r = await c.post(server.url + "/ui/login",
                         data={"token": server.token, "next": "//evil.example/x"},
                         allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/ui/"  # never off-site
        assert server.token not in r.headers["Location"]
        cookie = r.headers["Set-Cookie"]
        for attr in ("HttpOnly", "SameSite=Strict", "Path=/ui/"):
            assert attr in cookie
        assert "Secure" not in cookie  # plain HTTP here; over TLS the cookie is Secure
        r = await c.get(server.url + "/ui/")
        page = await r.text()
        assert r.status == 200 and "Overview" in page and server.token not in page
    async with client() as c:
        for _ in range(5):
            r = await c.post(server.url + "/ui/login", data={"token": "guess"})
            assert r.status == 401
        r = await c.post(server.url + "/ui/login", data={"token": server.token})
        assert r.status == 429 and int(r.headers["Retry-After"]) > 0
        assert "Too many wrong tokens" in await r.text()


async def test_forged_expired_and_ended_sessions(server: Server) -> None:  # noqa: F811
    ui = ui_state(server)
    async with client() as c:
        c.cookie_jar.update_cookies({COOKIE: "forged-" + "x" * 40})
        r = await c.get(server.url + "/ui/nodes/pc1")
        page = await r.text()
        assert r.status == 401 and "not valid" in page and 'type="password"' in page
        no_traceback(page)
        assert f"{COOKIE}=" in r.headers["Set-Cookie"]  # cleared
        r = await c.get(server.url + "/ui/nodes.json", headers={"Accept": "application/json"})
        assert r.status in (303, 401)  # the cleared cookie: not signed in any more
    async with client() as c:
        await sign_in(c, server)
        sid = c.cookie_jar.filter_cookies(URL(server.url + "/ui/"))[COOKIE].value
        ui.sessions._live[sid].expires = time.time() - 1
        r = await c.get(server.url + "/ui/")
        assert r.status == 401 and "expired" in await r.text()
    async with client() as c:
        csrf = await sign_in(c, server)
        sid = c.cookie_jar.filter_cookies(URL(server.url + "/ui/"))[COOKIE].value
        r = await c.post(server.url + "/ui/logout", data={"csrf": csrf}, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/ui/login"
        c.cookie_jar.update_cookies({COOKIE: sid})
        r = await c.get(server.url + "/ui/storm")
        assert r.status == 401 and "session has ended" in await r.text()


async def test_a_rotated_token_ends_the_sessions_and_signs_in_alone(server: Server) -> None:  # noqa: F811
    """`bootherd token rotate` on the server: consoles signed in with the old token are
    signed out at their next request (their update streams end), the old token no longer
    signs in, the new one does."""
    async with client() as c:
        await sign_in(c, server)
        stream = await c.get(server.url + "/ui/events")
        await _read_events(stream, "hello")
        new = await asyncio.to_thread(admintoken.rotate, server.ctx.config)
        r = await c.get(server.url + "/ui/nodes")
        assert r.status == 401 and "session has ended" in await r.text()
        async with asyncio.timeout(10):
            while await stream.content.readany():  # ended by the server
                pass
        r = await c.post(server.url + "/ui/login", data={"token": server.token},
                         allow_redirects=False)
        text = await r.text()
        assert r.status == 401 and "not the admin token" in text and server.token not in text
        r = await c.post(server.url + "/ui/login", data={"token": new, "next": "/ui/nodes"},
                         allow_redirects=False)
        assert r.status == 303
        assert (await c.get(server.url + "/ui/nodes")).status == 200


async def test_cross_site_and_token_less_posts_are_refused(server: Server) -> None:  # noqa: F811
    url = server.url + "/ui/nodes/pc1/actions/next-os"
    async with client() as c:
        csrf = await sign_in(c, server)
        good = {"csrf": csrf, "value": "", "confirmed": "1"}
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Sec-Fetch-Site": "cross-site"}, {"Referer": "http://evil.example/a"}):
            r = await c.post(url, data=good, headers=headers)
            page = await r.text()
            assert r.status == 403 and "another site" in page or "cross-site" in page, headers
        r = await c.post(server.url + "/ui/login", data={"token": server.token},
                         headers={"Origin": "http://evil.example"})
        assert r.status == 403
        for form in ({"value": "", "confirmed": "1"}, {"csrf": "nope", "confirmed": "1"}):
            r = await c.post(url, data=form)
            assert r.status == 403 and "CSRF token" in await r.text()
        r = await c.post(url, data=good, headers={"Origin": server.url})
        assert r.status == 200
    async with client() as c:  # no session at all
        r = await c.post(url, data={"csrf": csrf, "confirmed": "1"},
                         headers={"Accept": "application/json"})
        assert r.status == 401 and "not signed in" in (await r.json())["error"]
        r = await c.post(url, data={"csrf": csrf, "confirmed": "1"})
        assert r.status == 401 and 'type="password"' in await r.text()


async def test_unknown_nodes_actions_and_pages(server: Server) -> None:  # noqa: F811
    async with client() as c:
        csrf = await sign_in(c, server)
        for path, status, words in (
                ("/ui/nodes/no-such", 404, "There is no node &#39;no-such&#39;"),
                ("/ui/nodes/no-such/decision", 404, "No such node"),
                ("/ui/nodes/no-such/logs/-1", 404, "No such node"),
                ("/ui/nodes/pc1/logs/-1", 404, "No such log"),
                ("/ui/nodes/pc1/logs/..%2f..%2fetc%2fpasswd", 404, "No such log"),
                ("/ui/elsewhere", 404, "no such page"),
                ("/ui/nodes?sort=nope", 400, "sort must be one of"),
                ("/ui/nodes/%3Cscript%3E", 404, "&lt;script&gt;")):
            r = await c.get(server.url + path)
            page = await r.text()
            assert r.status == status and words in page, (path, r.status, page[-600:])
            no_traceback(page)
        r = await c.get(server.url + "/ui/events?node=no-such")
        assert r.status == 404
        r = await c.post(server.url + "/ui/nodes/no-such/actions/wake",
                         data={"csrf": csrf, "confirmed": "1"}, headers={"Accept": "application/json"})
        assert r.status == 404 and "no node 'no-such'" in (await r.json())["error"]
        r = await c.post(server.url + "/ui/nodes/pc1/actions/explode",
                         data={"csrf": csrf, "confirmed": "1"})
        assert r.status == 404 and "no action" in (await r.text())
        r = await c.put(server.url + "/ui/nodes/pc1")
        assert r.status in (404, 405)
        no_traceback(await r.text())


async def test_actions_next_os_and_wake(server: Server) -> None:  # noqa: F811
    engine = server.ctx.live.engine
    image = sorted(server.ctx.live.snapshot.os_images)[0]
    url = server.url + "/ui/nodes/pc2/actions/"
    async with client() as c:
        csrf = await sign_in(c, server)
        page = await (await c.get(server.url + "/ui/nodes/pc2")).text()
        for name in ("wake", "reboot", "next-os"):
            assert f'id="action-{name}"' in page
        j = {"Accept": "application/json", "X-CSRF-Token": csrf}
        r = await c.post(url + "next-os", data={"value": image, "confirmed": "1"}, headers=j)
        assert r.status == 200 and image in (await r.json())["result"]
        assert ops.show_node(engine, "pc2")["next_os"] == image
        with engine.connect() as conn:  # audited as the console's change
            audit = schema.inventory_audit
            last = conn.execute(select(audit).order_by(audit.c.id.desc())).first()
        assert (last.origin, last.kind, last.key) == ("ui", "node", "pc2")
        # Reboot goes through the recovery ladder: pc2 is not waiting in a loader, has
        # no OS up and no BMC, so there is nothing it can do and it says so.
        r = await c.post(url + "reboot", data={"confirmed": "1"}, headers=j)
        assert r.status == 409, await r.text()
        assert "no soft step possible" in (await r.json())["error"]
        assert "pc2" not in [r["node_id"] for r in ops.out_of_service(engine)]
        r = await c.post(url + "next-os", data={"value": "NO-SUCH-OS"}, headers=j)
        assert r.status == 400 and "no os 'NO-SUCH-OS'" in (await r.json())["error"]
        # Without a script: a confirmation page first, then the result page.
        r = await c.post(url + "next-os", data={"csrf": csrf, "value": ""})
        page = await r.text()
        assert r.status == 200 and 'name="confirmed" value="1"' in page
        assert ops.show_node(engine, "pc2")["next_os"] == image  # nothing done yet
        r = await c.post(url + "next-os", data={"csrf": csrf, "value": "", "confirmed": "1"})
        assert r.status == 200 and "next_os cleared" in await r.text()
        assert ops.show_node(engine, "pc2")["next_os"] is None
        # This server runs no bootinfo service: orders cannot be sent, and it says so.
        r = await c.post(url + "wake", data={"confirmed": "1"}, headers=j)
        assert r.status == 503 and "bootinfo server is not running" in (await r.json())["error"]


async def test_read_only_console(tmp_path: Path) -> None:
    s = await start_server(tmp_path, ui={"read_only": True})
    try:
        async with client() as c:
            csrf = await sign_in(c, s)
            page = await (await c.get(s.url + "/ui/nodes/pc1")).text()
            assert "read-only" in page and 'id="action-' not in page
            r = await c.post(s.url + "/ui/nodes/pc1/actions/next-os",
                             data={"csrf": csrf, "value": "", "confirmed": "1"})
            assert r.status == 403 and "read-only (ui.read_only)" in await r.text()
    finally:
        await stop_server(s)


async def _read_events(resp: aiohttp.ClientResponse, want: str, timeout: float = 10,
                       until=lambda data: True) -> dict:  # noqa: ANN001
    """The data of the next server-sent event named `want` (for which `until` holds)."""
    name = None
    async with asyncio.timeout(timeout):
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == want:
                data = json.loads(line[6:])
                if until(data):
                    return data
    raise AssertionError(f"stream ended before a {want!r} event")


async def test_update_stream_and_no_database_reads_per_console(server: Server) -> None:  # noqa: F811
    live = server.ctx.live
    statements: list[str] = []

    def seen(conn, cursor, statement, *a) -> None:  # noqa: ANN001
        statements.append(statement)

    async with client() as c:
        await sign_in(c, server)
        consoles = [await c.get(server.url + "/ui/events") for _ in range(10)]
        watch = await c.get(server.url + "/ui/events?node=pc3")
        try:
            for r in consoles + [watch]:
                assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
                hello = await _read_events(r, "hello")
                assert hello["nodes"] == 20 and hello["phase_names"][0] == "idle"
            await asyncio.sleep(0.3)  # the first servers read is done: now count
            sa_event.listen(live.engine, "before_cursor_execute", seen)
            try:
                t0 = time.time()
                for i in range(1, 21):
                    live.record_state(f"pc{i}", "PXEBOOTING", "dhcp", ts=t0)
                live.record_state("pc3", "BOOTING", "bootinfo", "UBUNTU", ts=t0 + 0.01)
                ticks = [await _read_events(r, "tick", until=lambda d: d["seq"] >= 21)
                         for r in consoles]
                node = await _read_events(watch, "node", until=lambda d: d[-1]["state"] == "BOOTING")
                await asyncio.sleep(1.0)
            finally:
                sa_event.remove(live.engine, "before_cursor_execute", seen)
        finally:
            for r in consoles + [watch]:
                r.close()
    for t in ticks:
        assert t["phases"][1] + t["phases"][5] == 20  # dhcp + os
        assert t["states"] == {"PXEBOOTING": 19, "BOOTING": 1}
        assert t["storm"]["number"] == 1
    assert [e["state"] for e in node][-1] == "BOOTING" and node[-1]["phase"] == "os"
    # What reached the database meanwhile: the writer's batch and the inventory's
    # generation poll; nothing for eleven open consoles.
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    servers_reads = [s for s in reads if "FROM servers" in s]
    assert len(servers_reads) <= 1  # one task reads it every few seconds for all consoles
    assert not [s for s in reads if s not in servers_reads and "generation" not in s], reads


async def test_sign_out_ends_the_stream_and_shutdown_ends_them_all(tmp_path: Path) -> None:
    s = await start_server(tmp_path)
    stopped = False
    try:
        async with client() as c:
            csrf = await sign_in(c, s)
            a = await c.get(s.url + "/ui/events")
            b = await c.get(s.url + "/ui/events")
            await _read_events(a, "hello")
            await _read_events(b, "hello")
            await c.post(s.url + "/ui/logout", data={"csrf": csrf})
            async with asyncio.timeout(10):
                await a.content.read()  # returns: the stream ended with the session
            assert a.content.at_eof()
            async with client() as c2:
                await sign_in(c2, s)
                d = await c2.get(s.url + "/ui/events")
                await _read_events(d, "hello")
                await asyncio.wait_for(stop_server(s), 20)  # an open console does not hold it
                stopped = True
                async with asyncio.timeout(10):
                    await d.content.read()
    finally:
        if not stopped:
            await stop_server(s)


async def test_an_internal_error_is_a_page(server: Server) -> None:  # noqa: F811
    ui = ui_state(server)

    def broken(snap, node):  # noqa: ANN001, ANN202
        raise RuntimeError("secret internal detail")

    ui.backend.decide = broken
    async with client() as c:
        await sign_in(c, server)
        r = await c.get(server.url + "/ui/nodes/pc1")
        page = await r.text()
        assert r.status == 500 and "Internal error" in page
        assert "secret internal detail" not in page
        no_traceback(page)


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory):  # noqa: ANN001, ANN201
    """A server on an event loop of its own thread, for synchronous (hypothesis) clients."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    s = asyncio.run_coroutine_threadsafe(start_server(tmp_path_factory.mktemp("fuzz")),
                                         loop).result(60)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.svc.port, timeout=10)
        conn.request("POST", "/ui/login", urlencode({"token": s.token}),
                     {"Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        r.read()
        cookie = r.getheader("Set-Cookie").split(";")[0]
        conn.close()
        yield s, cookie
    finally:
        asyncio.run_coroutine_threadsafe(stop_server(s), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _send(s: Server, method: str, path: str, cookie: str | None, body: str = "",
          headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", s.svc.port, timeout=10)
    h = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    if cookie:
        h["Cookie"] = cookie
    conn.request(method, path, body.encode("utf-8", "surrogateescape"), h)
    r = conn.getresponse()
    text = r.read().decode("utf-8", "replace")
    conn.close()
    return r.status, text


FIELDS = st.dictionaries(st.sampled_from(["q", "state", "phase", "experiment", "sort", "desc",
                                          "page", "per_page", "csrf", "value", "confirmed",
                                          "token", "next", "node"]),
                         st.text(max_size=40), max_size=6)
SEGMENT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@settings(max_examples=150, deadline=None)
@given(route=st.sampled_from(["/ui/nodes", "/ui/nodes.json", "/ui/nodes/{seg}",
                              "/ui/nodes/{seg}/decision", "/ui/nodes/pc1/logs/{seg}",
                              "/ui/nodes/{seg}/actions/{seg}", "/ui/nodes/pc1/actions/next-os",
                              "/ui/nodes/pc1/actions/power-off", "/ui/nodes/{seg}/console/events",
                              "/ui/nodes/pc1/logs/console",
                              "/ui/login", "/ui/logout", "/ui/{seg}", "/ui/static/{seg}"]),
       seg=SEGMENT, fields=FIELDS, method=st.sampled_from(["GET", "POST"]),
       signed_in=st.booleans(), accept_json=st.booleans())
def test_any_console_request_gets_an_answer_not_a_traceback(threaded_server, route, seg,  # noqa: ANN001
                                                            fields, method, signed_in,
                                                            accept_json) -> None:
    s, cookie = threaded_server
    path = route.replace("{seg}", quote(seg, safe=""))
    headers = {"Accept": "application/json"} if accept_json else {}
    query = urlencode(fields)
    if method == "GET":
        status, text = _send(s, "GET", f"{path}?{query}", cookie if signed_in else None,
                             headers=headers)
    else:
        status, text = _send(s, "POST", path, cookie if signed_in else None, query, headers)
    assert status < 500, (status, path, text[-500:])
    no_traceback(text)


async def test_with_https_the_console_is_not_used_in_the_clear(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tmcd"))
    from certs import issue, make_ca

    cert, key = issue(tmp_path, make_ca(tmp_path), "server", "127.0.0.1")
    s = await start_server(tmp_path, tls_port=free_port(), tls_cert=str(cert), tls_key=str(key))
    https = f"https://127.0.0.1:{s.svc.tls_port}"
    try:
        async with client() as c:
            r = await c.get(s.url + "/ui/nodes?q=pc1", allow_redirects=False)
            assert r.status == 308 and r.headers["Location"] == https + "/ui/nodes?q=pc1"
            r = await c.post(s.url + "/ui/login", data={"token": s.token}, allow_redirects=False)
            assert r.status == 403 and "over HTTPS" in await r.text()
            assert "Set-Cookie" not in r.headers
            r = await c.post(https + "/ui/login", data={"token": s.token}, allow_redirects=False,
                             ssl=False)
            assert r.status == 303
            cookie = r.headers["Set-Cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    finally:
        await stop_server(s)

"""The CLI's side of power and consoles: through the running server when there is
one (so the caps hold across every caller), else directly with the same controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from .core import PowerOp, PowerResult

DETACH = 0x1d  # Ctrl-]: leaves an attached console, as telnet does


class NoServer(Exception):
    """No bootherd server answers at the configured HTTP address."""


def server_url(config: Any) -> str:
    h = config.http
    host = "127.0.0.1" if h.address in ("0.0.0.0", "") else h.address
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{h.port}"


def find_server(config: Any, timeout: float = 2.0) -> tuple[str, str]:
    """(base URL, admin token) of the running server, or NoServer."""
    from ..web.service import read_admin_token

    if not config.http.enabled:
        raise NoServer("http is disabled in this configuration")
    url = server_url(config)
    try:
        token = read_admin_token(config)
    except OSError:
        raise NoServer(f"no admin token at {config.path(config.http.admin_token_file)}") from None
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise NoServer(f"nothing listens at {url}: {e.strerror or e}") from None
    return url, token


def running_server(config: Any, direct: bool = False) -> tuple[str, str] | None:
    """(URL, token) of the server to go through, or None to act from this process."""
    if direct:
        return None
    try:
        return find_server(config)
    except NoServer:
        return None


async def run_via_server(url: str, token: str, op: PowerOp, specs: list[str], everything: bool,
                         pxe: bool, on_start: Callable[[dict], None],
                         on_result: Callable[[PowerResult], None]) -> dict:
    """POST /api/power and follow its NDJSON stream; returns the closing summary."""
    import aiohttp

    body = {"op": str(op), "nodes": specs, "all": everything, "pxe": pxe, "source": "cli"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.post(
            f"{url}/api/power", json=body,
            headers={"Authorization": f"Bearer {token}"}) as r:
        if r.status != 200:
            try:
                msg = (await r.json())["error"]
            except (ValueError, KeyError, aiohttp.ContentTypeError):
                msg = (await r.text())[:300]
            raise ValueError(f"server at {url}: {msg}")
        done: dict = {}
        async for line in r.content:
            if not line.strip():
                continue
            item = json.loads(line)
            kind = item.pop("type", "")
            if kind == "start":
                on_start(item)
            elif kind == "result":
                on_result(PowerResult(item["node_id"], PowerOp(item["op"]), item["ok"],
                                      item["power"], item["message"], item["error"],
                                      item["driver"], item["started"], item["elapsed"]))
            elif kind == "done":
                done = item
        if not done:
            raise ConnectionError(f"server at {url} stopped before the batch ended")
        return done


async def run_direct(config: Any, op: PowerOp, specs: list[str], everything: bool, pxe: bool,
                     on_start: Callable[[dict], None],
                     on_result: Callable[[PowerResult], None]) -> dict:
    """No server: the same controller in this process, events through a batch writer."""
    from ..inventory.db import check_current, make_engine
    from ..inventory.live import StateEvent, Writer
    from ..inventory.snapshot import load
    from .service import build_controller
    from .targets import resolve

    engine = make_engine(config.database_url)
    check_current(engine)
    snapshot = await asyncio.to_thread(load, engine)
    nodes, unknown = resolve(snapshot, specs, everything)
    writer = Writer(engine, config.database.write_batch_interval)

    def record(node_id: str, what: str, source: str, ts: float, detail: str) -> None:
        writer.note(StateEvent(node_id, what, source, ts, detail))

    ctl, pool = build_controller(config, engine, record)
    on_start({"op": str(op), "nodes": len(nodes), "unknown": unknown,
              "max_concurrent": ctl.settings.max_concurrent,
              "power_on_rate": ctl.settings.power_on_rate})
    try:
        results = await ctl.run(op, nodes, pxe=pxe, source="cli", on_result=on_result)
    finally:
        await asyncio.to_thread(writer.close)  # every event committed before we return
        pool.shutdown(wait=False, cancel_futures=True)
        engine.dispose()
    ok = sum(r.ok for r in results)
    return {"ok": ok, "failed": len(results) - ok, "unknown": len(unknown)}


# --- consoles ----------------------------------------------------------------------------

async def attach_via_server(url: str, token: str, node_id: str, write: bool,
                            stdin_fd: int, out: Any, err: Any) -> int:
    import getpass

    import aiohttp

    who = f"{getpass.getuser()}@{socket.gethostname()}"
    params = {"write": "1" if write else "0", "who": who}
    async with aiohttp.ClientSession() as s:
        try:
            ws = await s.ws_connect(f"{url}/api/nodes/{node_id}/console", params=params,
                                    headers={"Authorization": f"Bearer {token}"})
        except aiohttp.WSServerHandshakeError as e:
            raise ValueError(f"server at {url}: console of {node_id}: HTTP {e.status} "
                             f"{e.message}") from None
        async with ws:
            async def send(data: bytes) -> None:
                await ws.send_bytes(data)

            async def receive() -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        out.write(msg.data)
                        out.flush()
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        _notice(err, json.loads(msg.data))

            return await _relay(stdin_fd, send, receive, err)


async def attach_direct(target: Any, stdin_fd: int, out: Any, err: Any) -> int:
    """No server: open the console link here, as its only (and writing) user."""
    from .console import open_link

    link = await open_link(target)
    err.write(f"[bootherd: {target.node_id} console attached directly (no server), "
              f"writing; Ctrl-] leaves]\r\n")
    err.flush()

    async def receive() -> None:
        while data := await link.read():
            out.write(data)
            out.flush()

    try:
        return await _relay(stdin_fd, link.write, receive, err)
    finally:
        await link.close()


def _notice(err: Any, n: dict) -> None:
    if n.get("type") == "attached":
        mode = "writing" if n.get("write") else (
            f"read-only, {n['writer']} writes" if n.get("writer") else "read-only")
        state = "" if n.get("connected") else f"; console down: {n.get('error') or 'connecting'}"
        err.write(f"[bootherd: {n.get('node_id')} console attached, {mode}{state}; "
                  f"Ctrl-] leaves]\r\n")
    elif n.get("type") == "read-only":
        err.write("[bootherd: read-only" + (f", {n['writer']} writes" if n.get("writer") else "")
                  + ("" if n.get("connected") else "; console down") + "]\r\n")
    err.flush()


async def _relay(stdin_fd: int, send: Callable[[bytes], Any], receive: Callable[[], Any],
                 err: Any) -> int:
    """Keys from stdin to the console until Ctrl-] or end of input; output meanwhile."""
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[bytes] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(stdin_fd, 1024)
        except OSError:
            data = b""
        keys.put_nowait(data)

    raw = _raw_terminal(stdin_fd)
    loop.add_reader(stdin_fd, readable)
    rx = asyncio.ensure_future(receive())
    try:
        while True:
            get = asyncio.ensure_future(keys.get())
            done, _ = await asyncio.wait({get, rx}, return_when=asyncio.FIRST_COMPLETED)
            if rx in done:
                get.cancel()
                err.write("\r\n[bootherd: console closed]\r\n")
                return 0
            data = get.result()
            if not data:  # end of input: keep showing output until the console closes
                loop.remove_reader(stdin_fd)
                await rx
                return 0
            if DETACH in data:
                before = data[:data.index(DETACH)]
                if before:
                    await send(before)
                err.write("\r\n[bootherd: detached]\r\n")
                return 0
            await send(data)
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(stdin_fd)
        rx.cancel()
        raw()


def _raw_terminal(fd: int) -> Callable[[], None]:
    """Raw mode for an interactive terminal; returns the undo.  No-op for pipes."""
    if not os.isatty(fd):
        return lambda: None
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def stdio() -> tuple[int, Any, Any]:
    return sys.stdin.fileno(), sys.stdout.buffer, sys.stderr

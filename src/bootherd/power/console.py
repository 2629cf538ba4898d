"""Serial console capture: every node's console in a per-node log, and live attach.

Each node whose power entry names a console (``sol``: IPMI serial-over-LAN
through its BMC; ``tcp:HOST:PORT``: a console server's port, raw or telnet)
gets one link, held by this service alone, as Emulab's capture holds a tty:

- everything the node prints is appended to ``<http.log_dir>/<node>/console/
  current.log``, rotated at ``console.log_bytes`` (``current.log.1`` is the
  previous one), read with ``bootherd node logs NODE console``;
- any number of operators may attach (``bootherd node console NODE``, or the
  admin API's websocket); the first to ask for it writes, the others read,
  until the writer detaches;
- a link that drops (node power-cycled, BMC rebooted, console server gone) is
  opened again with a growing pause up to ``console.reconnect_max``.

`TelnetFilter` is the sans-IO part: bytes in, console bytes and the telnet
answers out.  Only one server should run this service (``console.enabled``):
a BMC serves one serial-over-LAN session at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .core import BmcTarget

log = logging.getLogger("bootherd.console")

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
BACKLOG_BYTES = 8192  # what an operator sees of the past when attaching


class TelnetFilter:
    """Strips telnet commands from a console stream and refuses every option.

    feed(data) -> (console bytes, bytes to send back).  Console servers and
    QEMU's telnet serial speak telnet; a raw TCP port never sends IAC, so the
    filter passes it through unchanged (except a doubled 0xff, which telnet
    means as one)."""

    def __init__(self) -> None:
        self._state = 0       # 0 data, 1 after IAC, 2 after IAC+verb, 3 in SB, 4 IAC in SB
        self._verb = 0

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        out = bytearray()
        reply = bytearray()
        for b in data:
            st = self._state
            if st == 0:
                if b == IAC:
                    self._state = 1
                else:
                    out.append(b)
            elif st == 1:
                if b == IAC:
                    out.append(IAC)
                    self._state = 0
                elif b in (WILL, WONT, DO, DONT):
                    self._verb, self._state = b, 2
                elif b == SB:
                    self._state = 3
                else:
                    self._state = 0  # a two-byte command (NOP, GA, BRK ...): dropped
            elif st == 2:
                if self._verb == WILL:
                    reply += bytes((IAC, DONT, b))
                elif self._verb == DO:
                    reply += bytes((IAC, WONT, b))
                self._state = 0
            elif st == 3:
                if b == IAC:
                    self._state = 4
            else:  # IAC inside a subnegotiation
                self._state = 0 if b == SE else 3
        return bytes(out), bytes(reply)


class ConsoleLog:
    """Appends one node's console to current.log; rotates at `max_bytes`."""

    def __init__(self, directory: Path, max_bytes: int, keep: int):
        self.dir = directory
        self.max_bytes = max(4096, max_bytes)
        self.keep = max(1, keep)
        self.path = directory / "current.log"
        self._fd: int | None = None
        self._size = 0

    def write(self, data: bytes) -> None:
        while data:
            if self._fd is None:
                self._open()
            room = self.max_bytes - self._size
            os.write(self._fd, data[:room])
            self._size += min(room, len(data))
            data = data[room:]
            if self._size >= self.max_bytes:
                self.rotate()

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = os.fstat(self._fd).st_size

    def rotate(self) -> None:
        """current.log becomes current.log.1 (and so on, `keep` of them); a new one starts."""
        self.close()
        for k in range(self.keep, 0, -1):
            src = self.path if k == 1 else self.dir / f"current.log.{k - 1}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(src, self.dir / f"current.log.{k}")
        self._open()

    def tail(self, n: int = BACKLOG_BYTES) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - n))
                return f.read()
        except FileNotFoundError:
            return b""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- links: one open console connection -------------------------------------------------

class Link(Protocol):
    async def read(self) -> bytes: ...   # b"" once the link is closed

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class TcpLink:
    """A console server's TCP port (raw or telnet)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.telnet = TelnetFilter()

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = 10.0) -> TcpLink:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(r, w)

    async def read(self) -> bytes:
        while True:
            data = await self.reader.read(65536)
            if not data:
                return b""
            out, reply = self.telnet.feed(data)
            if reply:
                self.writer.write(reply)
            if out:
                return out

    async def write(self, data: bytes) -> None:
        self.writer.write(data.replace(bytes((IAC,)), bytes((IAC, IAC))))
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self.writer.wait_closed()


class _SolPump:
    """pyghmi delivers serial-over-LAN data only while some thread waits on its
    sessions: one daemon thread does that for every SOL link of the process."""

    _lock = threading.Lock()
    _thread: threading.Thread | None = None
    users = 0

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            cls.users += 1
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(target=cls._run, name="bootherd-sol", daemon=True)
                cls._thread.start()

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls.users = max(0, cls.users - 1)

    @classmethod
    def _run(cls) -> None:
        from pyghmi.ipmi.private import session

        while cls.users > 0:
            try:
                session.Session.wait_for_rsp(timeout=0.5)
            except Exception:  # noqa: BLE001 - one broken session must not stop the others
                log.debug("pyghmi wait failed", exc_info=True)
                time.sleep(0.5)
        with cls._lock:
            cls._thread = None


class SolLink:
    """IPMI serial-over-LAN through pyghmi; takes the payload over (force) since
    this service owns the node's console."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.q: asyncio.Queue[bytes] = asyncio.Queue()
        self.console: Any = None
        self.closed = False

    @classmethod
    async def open(cls, t: BmcTarget, timeout: float = 15.0) -> SolLink:
        from pyghmi.ipmi import console
        from pyghmi.ipmi.private import session

        link = cls(asyncio.get_running_loop())
        port = t.port or 623
        ready = threading.Event()
        failure: list[str] = []

        def handler(data: Any) -> None:  # on a pyghmi thread
            if isinstance(data, dict):
                if "error" in data:
                    failure.append(str(data["error"]))
                    ready.set()
                    link.loop.call_soon_threadsafe(link.q.put_nowait, b"")
                return
            if isinstance(data, str):
                data = data.encode("utf-8", "replace")
            ready.set()
            link.loop.call_soon_threadsafe(link.q.put_nowait, bytes(data))

        def connect() -> Any:
            try:
                return console.Console(bmc=t.address, userid=t.user, password=t.password,
                                       port=port, iohandler=handler, force=True)
            finally:
                session.Session.initting_sessions.pop((t.address, t.user, t.password, port,
                                                       None), None)

        _SolPump.acquire()
        try:
            link.console = await asyncio.wait_for(asyncio.to_thread(connect), timeout)
            # Console() returns before activation completes, and pyghmi calls back only
            # on failure: look at its flag until it goes one way.
            deadline = time.monotonic() + timeout
            while not link.console.connected and not failure \
                    and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            if failure or not link.console.connected:
                raise ConnectionError(failure[0] if failure else "serial-over-LAN did not start")
        except BaseException:
            _SolPump.release()
            raise
        return link

    async def read(self) -> bytes:
        if self.closed:
            return b""
        data = await self.q.get()
        if not data:
            self.closed = True
        return data

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self.console.send_data, data)

    async def close(self) -> None:
        if self.console is not None and not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.console.close)
        _SolPump.release()


async def open_link(t: BmcTarget) -> Link:
    if t.console == "sol":
        return await SolLink.open(t)
    if t.console.startswith("tcp:"):
        host, _, port = t.console[4:].rpartition(":")
        return await TcpLink.open(host.strip("[]"), int(port))
    raise ValueError(f"{t.node_id}: unknown console {t.console!r}")


# --- one node's console: the link, its log, the attached operators ------------------------

@dataclass(eq=False)
class Attachment:
    who: str
    can_write: bool
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=1024))


class NodeConsole:
    def __init__(self, target: BmcTarget, log_: ConsoleLog, reconnect_max: float,
                 opener: Callable[[BmcTarget], Any] = open_link):
        self.target = target
        self.log = log_
        self.reconnect_max = reconnect_max
        self.opener = opener
        self.attached: list[Attachment] = []
        self.writer: Attachment | None = None
        self.link: Link | None = None
        self.connected_since: float | None = None
        self.last_error = ""
        self.bytes_logged = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"console-{self.target.node_id}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for a in list(self.attached):
            self._notify(a, b"")
        self.log.close()

    async def _run(self) -> None:
        pause = 1.0
        while True:
            try:
                self.link = await self.opener(self.target)
            except (OSError, ConnectionError, TimeoutError, ValueError, ImportError) as e:
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                log.info("console of %s unavailable (%s); retrying in %.0f s",
                         self.target.node_id, self.last_error, pause)
            except Exception as e:  # noqa: BLE001 - pyghmi raises its own kinds
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                log.info("console of %s unavailable (%s); retrying in %.0f s",
                         self.target.node_id, self.last_error, pause)
            else:
                self.connected_since = time.time()
                self.last_error = ""
                pause = 1.0
                try:
                    while data := await self.link.read():
                        self._output(data)
                except (OSError, ConnectionError) as e:
                    self.last_error = f"{type(e).__name__}: {e}"[:300]
                finally:
                    link, self.link, self.connected_since = self.link, None, None
                    with contextlib.suppress(Exception):
                        await link.close()
                log.info("console of %s closed; reopening", self.target.node_id)
            await asyncio.sleep(pause)
            pause = min(self.reconnect_max, pause * 2)

    def _output(self, data: bytes) -> None:
        try:
            self.log.write(data)
            self.bytes_logged += len(data)
        except OSError as e:  # a full disk loses log lines, never the live view
            log.warning("console log of %s not written: %s", self.target.node_id, e)
        for a in self.attached:
            self._notify(a, data)

    @staticmethod
    def _notify(a: Attachment, data: bytes) -> None:
        try:
            a.queue.put_nowait(data)
        except asyncio.QueueFull:  # a stalled viewer loses output, not the others
            pass

    def attach(self, who: str, want_write: bool) -> Attachment:
        a = Attachment(who, want_write and self.writer is None)
        if a.can_write:
            self.writer = a
        self.attached.append(a)
        return a

    def detach(self, a: Attachment) -> None:
        if a in self.attached:
            self.attached.remove(a)
        if self.writer is a:
            self.writer = None

    async def send(self, a: Attachment, data: bytes) -> bool:
        """Keystrokes from an attached operator; False when they are not the writer
        or the console is down (nothing is sent)."""
        if a is not self.writer or self.link is None:
            return False
        await self.link.write(data)
        return True

    def status(self) -> dict[str, Any]:
        return {"node_id": self.target.node_id, "console": self.target.console,
                "connected": self.link is not None, "since": self.connected_since,
                "error": self.last_error, "bytes_logged": self.bytes_logged,
                "writer": self.writer.who if self.writer else "",
                "attached": len(self.attached)}


class ConsoleService:
    """Captures the console of every node the inventory names (`console.enabled`)."""

    name = "console"

    def __init__(self, config: Any, load: Callable[[], dict[str, BmcTarget]],
                 on_change: Callable[[Callable[..., None]], None] | None = None,
                 opener: Callable[[BmcTarget], Any] = open_link):
        c = config.console
        self.log_dir = config.path(config.http.log_dir)
        self.log_bytes = int(c.log_bytes)
        self.logs_kept = int(c.logs_kept)
        self.reconnect_max = float(c.reconnect_max)
        self.rescan_interval = float(c.rescan_interval)
        self.load = load
        self.opener = opener
        self.consoles: dict[str, NodeConsole] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        if on_change is not None:
            on_change(lambda *_: self._wake.set())

    async def start(self) -> None:
        await self.rescan()
        self._task = asyncio.create_task(self._rescan_loop(), name="console-rescan")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for c in list(self.consoles.values()):
            await c.stop()
        self.consoles.clear()

    async def _rescan_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.rescan_interval)
            self._wake.clear()
            try:
                await self.rescan()
            except Exception as e:  # noqa: BLE001 - keep capturing what we have
                log.warning("console rescan failed: %s", str(e).splitlines()[0][:200])

    async def rescan(self) -> None:
        """Start captures for new consoles, restart changed ones, stop removed ones."""
        from ..web.logs import console_dir

        wanted = await asyncio.to_thread(self.load)
        for nid in [n for n in self.consoles if n not in wanted]:
            await self.consoles.pop(nid).stop()
        for nid, t in wanted.items():
            cur = self.consoles.get(nid)
            if cur is not None and cur.target == t:
                continue
            if cur is not None:
                await cur.stop()
            nc = NodeConsole(t, ConsoleLog(console_dir(self.log_dir, nid), self.log_bytes,
                                           self.logs_kept), self.reconnect_max, self.opener)
            self.consoles[nid] = nc
            nc.start()

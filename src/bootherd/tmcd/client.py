"""tmcc: the TMCD client, its per-command cache, the isalive watchdog and the proxy.

    tmcc [options] COMMAND [ARGS...]   one request (cached commands without
                                       arguments are answered from the cache)
    tmcc [options] boot                clear the cache, ask status, fetch
                                       fullconfig once and split it into the cache
    tmcc [options] watchdog            isalive over UDP every --interval seconds;
                                       on UPDATE=1 refetch fullconfig into the cache
    tmcc [options] proxy --socket P    serve vnodes of this host from one cache
                                       over a local unix socket
    tmcc --tls [--ca F] [--cert F] ...  any of these over TLS, as Emulab's tmcc
                                       (ISPEAKSSL_TMCDV10, then the handshake)

Blocking sockets on purpose: a node runs one request at a time, and this
module must work from boot scripts without an event loop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .protocol import (
    CACHEABLE,
    CURRENT_VERSION,
    SECRET_SECTIONS,
    TLS_PREFIX,
    UDP_MAX_READ,
    parse_kv,
    render_request,
    split_fullconfig,
)
from .tls import client_context

DEFAULT_CACHEDIR = os.environ.get("TMCC_CACHEDIR", "/var/lib/bootherd/tmcc")
VALID_MARK = ".valid"  # written last: a cache without it is never used
MAX_REPLY = 64 * 2**20


class TmccError(OSError):
    """The server could not be reached or did not answer in time."""


@dataclass
class TmccClient:
    server: str = "127.0.0.1"
    port: int = 7777
    fallback_port: int = 14447
    udp: bool = False
    version: int = CURRENT_VERSION
    timeout: float = 10.0
    vnode: str | None = None  # -n: ask about this vnode (VNODEID=)
    proxyfor: str | None = None  # set by the caching proxy (PROXYFOR=)
    bind: str | None = None  # source address (tests give each node its own 127.x)
    cachedir: str | None = None
    proxy_socket: str | None = None  # talk to a local tmcc proxy instead of the server
    privkey: str | None = None
    tls: ssl.SSLContext | None = None  # ISPEAKSSL_TMCDV10, then TLS (tls.client_context)

    # -- the wire ------------------------------------------------------------------

    def line(self, command: str, args: str = "") -> bytes:
        return render_request(command, args, self.version, VNODEID=self.vnode,
                              PROXYFOR=self.proxyfor, PRIVKEY=self.privkey)

    def request(self, command: str, args: str = "", udp: bool | None = None) -> bytes:
        """One request; b'' is a valid (empty) answer.  Raises TmccError."""
        data = self.line(command, args)
        if self.proxy_socket:
            return self._unix(data)
        use_udp = self.udp if udp is None else udp
        ports = [self.port] + ([self.fallback_port] if self.fallback_port
                               and self.fallback_port != self.port else [])
        last: Exception | None = None
        for port in ports:
            try:
                return self._udp(data, port) if use_udp else self._tcp(data, port)
            except ConnectionRefusedError as e:
                last = e  # only a refused connection moves on to the fallback port
                continue
            except (TimeoutError, OSError) as e:
                raise TmccError(f"{self.server}:{port}: {e}") from None
        raise TmccError(f"{self.server}: connection refused on ports "
                        f"{', '.join(map(str, ports))}: {last}")

    def _tcp(self, data: bytes, port: int) -> bytes:
        fam = socket.AF_INET6 if ":" in self.server else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            if self.bind:
                s.bind((self.bind, 0))
            s.connect((self.server, port))
            if self.tls is not None:
                return self._tls(s, data)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return _read_all(s)

    def _tls(self, s: socket.socket, data: bytes) -> bytes:
        """Emulab's way: the 17-byte tag in the clear, the handshake, then the
        request as one record (TLS cannot half-close); the server's close ends
        the reply."""
        assert self.tls is not None
        s.sendall(TLS_PREFIX)
        try:
            with self.tls.wrap_socket(s, server_hostname=self.server) as t:
                t.sendall(data)
                return _read_all(t)
        except ssl.SSLError as e:
            raise TmccError(f"{self.server}: TLS: {e}") from None

    def _udp(self, data: bytes, port: int) -> bytes:
        fam = socket.AF_INET6 if ":" in self.server else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(self.timeout)
            if self.bind:
                s.bind((self.bind, 0))
            s.connect((self.server, port))  # connected: an ICMP refusal surfaces here
            s.send(data)
            return s.recv(UDP_MAX_READ)

    def _unix(self, data: bytes) -> bytes:
        assert self.proxy_socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(self.proxy_socket)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return _read_all(s)

    # -- the cache -----------------------------------------------------------------

    @property
    def cache_path(self) -> Path | None:
        if not self.cachedir:
            return None
        base = Path(self.cachedir)
        return base / "vnodes" / self.vnode if self.vnode else base

    def cached(self, command: str) -> bytes | None:
        d = self.cache_path
        if d is None or command not in CACHEABLE or not (d / VALID_MARK).exists():
            return None
        try:
            return (d / command).read_bytes()
        except FileNotFoundError:
            return None

    def clear_cache(self) -> None:
        d = self.cache_path
        if d is None or not d.exists():
            return
        with contextlib.suppress(FileNotFoundError):
            (d / VALID_MARK).unlink()
        for name in CACHEABLE:
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()

    def store(self, sections: dict[str, str]) -> None:
        d = self.cache_path
        if d is None:
            return
        d.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (d / VALID_MARK).unlink()
        for name in sorted(CACHEABLE):
            if name in sections:
                _write_atomic(d / name, sections[name].encode(),
                              0o600 if name in SECRET_SECTIONS else 0o644)
            else:
                with contextlib.suppress(FileNotFoundError):
                    (d / name).unlink()
        _write_atomic(d / VALID_MARK, b"", 0o644)

    def fetch_fullconfig(self) -> dict[str, str]:
        """fullconfig over TCP (it carries secrets), split into the cache."""
        text = self.request("fullconfig", udp=False).decode(errors="replace")
        sections = split_fullconfig(text)
        self.store(sections)
        return sections

    def get(self, command: str, args: str = "", bypass: bool = False) -> bytes:
        """What `tmcc COMMAND [ARGS]` prints: the cache when it can, else the server."""
        if not args and not bypass:
            hit = self.cached(command)
            if hit is not None:
                return hit
        return self.request(command, args)

    # -- boot and watchdog -----------------------------------------------------------

    def boot(self) -> bytes:
        """status live, then fullconfig once if allocated.  Returns the status reply."""
        self.clear_cache()
        status = self.request("status", udp=False)
        if status.startswith(b"ALLOCATED="):
            self.fetch_fullconfig()
        return status

    def isalive(self, retries: int = 3) -> bool | None:
        """isalive over UDP with retries; True = UPDATE=1, None = no answer."""
        for _ in range(max(1, retries)):
            try:
                reply = self.request("isalive", udp=True)
            except TmccError:
                continue
            kv = parse_kv(reply.decode(errors="replace").strip())
            if "UPDATE" in kv:
                return kv["UPDATE"] == "1"
        return None

    def watchdog_once(self, retries: int = 3) -> bool:
        """One watchdog round; True if the configuration was refetched."""
        if self.isalive(retries):
            self.fetch_fullconfig()
            return True
        return False

    def watchdog(self, interval: float = 180.0, retries: int = 3, count: int = 0) -> int:
        rounds = updates = 0
        while True:
            try:
                if self.watchdog_once(retries):
                    updates += 1
            except TmccError as e:
                print(f"tmcc watchdog: {e}", file=sys.stderr)
            rounds += 1
            if count and rounds >= count:
                return updates
            time.sleep(interval)


def _read_all(s: socket.socket) -> bytes:
    chunks, total = [], 0
    while True:
        try:
            b = s.recv(65536)
        except ssl.SSLEOFError:
            b = b""  # closed without close_notify: the reply ends there too
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        total += len(b)
        if total > MAX_REPLY:
            raise TmccError("reply too large")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tmcc", description="TMCD client (Emulab tmcc compatible requests).",
        epilog="special commands: boot, watchdog, proxy")
    p.add_argument("-s", "--server", default=os.environ.get("TMCC_SERVER", "127.0.0.1"))
    p.add_argument("-p", "--port", type=int, default=7777)
    p.add_argument("-P", "--fallback-port", type=int, default=14447,
                   help="tried only when the first port refuses (0: none)")
    p.add_argument("-u", "--udp", action="store_true", help="send the request over UDP")
    p.add_argument("-v", "--version", type=int, default=CURRENT_VERSION,
                   help="protocol version to speak")
    p.add_argument("-t", "--timeout", type=float, default=10.0)
    p.add_argument("-b", "--bypass", action="store_true", help="ignore the cache")
    p.add_argument("-n", "--vnode", help="ask about this vnode of the host (VNODEID=)")
    p.add_argument("-c", "--cachedir", default=DEFAULT_CACHEDIR)
    p.add_argument("-l", "--bind", help="source address to send from")
    p.add_argument("-k", "--privkey", help="wide-area node key (PRIVKEY=)")
    p.add_argument("-x", "--proxy-socket", help="send requests to a local tmcc proxy")
    p.add_argument("--tls", action="store_true",
                   help="speak TLS (ISPEAKSSL_TMCDV10, then the handshake)")
    p.add_argument("--ca", help="TLS: CA file the server's certificate must chain to")
    p.add_argument("--cert", help="TLS: client certificate (PEM) to present")
    p.add_argument("--key", help="TLS: key of --cert (PEM; default: in --cert)")
    p.add_argument("--interval", type=float, default=180.0, help="watchdog: seconds")
    p.add_argument("--retries", type=int, default=3, help="watchdog: isalive attempts")
    p.add_argument("--count", type=int, default=0, help="watchdog: rounds (0: forever)")
    p.add_argument("--socket", help="proxy: unix socket path to listen on")
    p.add_argument("command")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command in ("boot", "watchdog", "proxy") and a.args:
        # Options after a special command (`tmcc watchdog --count 1`) are options too.
        a = parser.parse_args([*a.args, "--", a.command], namespace=a)
        a.args = []
    try:
        tls = client_context(a.ca, a.cert, a.key) if a.tls else None
    except (OSError, ssl.SSLError) as e:
        print(f"tmcc: TLS: {e}", file=sys.stderr)
        return 2
    client = TmccClient(server=a.server, port=a.port, fallback_port=a.fallback_port,
                        udp=a.udp, version=a.version, timeout=a.timeout, vnode=a.vnode,
                        bind=a.bind, cachedir=a.cachedir, proxy_socket=a.proxy_socket,
                        privkey=a.privkey, tls=tls)
    out = sys.stdout.buffer
    try:
        if a.command == "boot":
            out.write(client.boot())
        elif a.command == "watchdog":
            client.watchdog(a.interval, a.retries, a.count)
        elif a.command == "proxy":
            from .proxy import TmccProxy

            if not a.socket:
                print("tmcc proxy: --socket is required", file=sys.stderr)
                return 2
            TmccProxy(client, a.socket, pinned_vnode=a.vnode).serve_forever()
        else:
            out.write(client.get(a.command, " ".join(a.args), a.bypass))
        out.flush()
    except TmccError as e:
        print(f"tmcc: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

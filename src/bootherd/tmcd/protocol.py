"""TMCD wire protocol, sans-IO: request lines in, typed requests out; reply text helpers.

Nothing here touches a socket or a clock.  The transport hands `parse_request`
the bytes it read (one line, or everything before the client's half-close)
and writes back whatever the server core renders.  Reply formats follow
protocol version 40; see docs/tmcd.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_VERSION = 2  # a request without VERSION= is version 2 (Emulab's rule)
CURRENT_VERSION = 40
TLS_PREFIX = b"ISPEAKSSL_TMCDV10"
UDP_MAX_READ = 2047  # what a tmcc client reads from one datagram

OPTION_KEYS = frozenset({"VERSION", "VNODEID", "PROXYFOR", "PRIVKEY", "IDKEY", "REDIRECT"})

# Commands in the boot-time table, plus the meta-request.
COMMANDS = (
    "reboot", "state", "status", "ntpinfo", "mounts", "accounts", "ifconfig", "tunnels",
    "hostnames", "routing", "routelist", "trafgens", "nseconfigs", "rpms", "tarballs",
    "startupcmd", "delay", "ipodinfo", "vnodelist", "isalive", "creator", "bootwhat",
    "fullconfig",
)
# Sections of fullconfig, in this order.  status/state/reboot/isalive/hostnames
# always go to the server; bootwhat is a per-boot decision (it may consume a
# one-shot next_os), so it is not cached either.
FULLCONFIG_SECTIONS = (
    "ntpinfo", "mounts", "accounts", "ifconfig", "tunnels", "routing", "routelist",
    "trafgens", "nseconfigs", "rpms", "tarballs", "startupcmd", "delay", "ipodinfo",
    "vnodelist", "creator",
)
SECRET_COMMANDS = frozenset({"accounts", "ipodinfo", "fullconfig"})
SECRET_SECTIONS = frozenset({"accounts", "ipodinfo"})
MARKER = "*** "

_KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_STATE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class Malformed(ValueError):
    """The bytes are not a TMCD request; the server closes without a reply."""


@dataclass(frozen=True, slots=True)
class Request:
    command: str
    args: str = ""
    version: int = DEFAULT_VERSION
    vnodeid: str | None = None
    proxyfor: str | None = None
    privkey: str | None = None
    idkey: str | None = None
    redirect: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # unknown KEY=VALUE options

    @property
    def target_vnode(self) -> str | None:
        return self.vnodeid or self.proxyfor


def is_tls_hello(data: bytes) -> bool:
    return data.startswith(TLS_PREFIX)


def parse_request(data: bytes, max_len: int = 4096) -> Request:
    """Parse one request: `[KEY=VALUE ...] command [args...]`.

    Raises Malformed for anything that is not printable ASCII, too long,
    empty, or has a bad option value.  Unknown *commands* parse fine (the
    core decides they get nothing); unknown options are kept in `extra`.
    """
    if len(data) > max_len:
        raise Malformed("request too long")
    nl = data.find(b"\n")
    if nl >= 0:
        data = data[:nl]
    data = data.rstrip(b"\r")
    try:
        line = data.decode("ascii")
    except UnicodeDecodeError:
        raise Malformed("not ASCII") from None
    if any(not (" " <= c <= "~" or c == "\t") for c in line):
        raise Malformed("control characters")
    tokens = line.split()
    if not tokens:
        raise Malformed("empty request")
    opts: dict[str, str] = {}
    i = 0
    while i < len(tokens) and "=" in tokens[i]:
        key, value = tokens[i].split("=", 1)
        if not _KEY_RE.match(key):
            raise Malformed(f"bad option {key!r}")
        if key in opts:
            raise Malformed(f"repeated option {key}")
        opts[key] = value
        i += 1
    if i == len(tokens):
        raise Malformed("no command")
    command = tokens[i]
    if not command.isascii() or not command.isalnum():
        raise Malformed("bad command")
    args = " ".join(tokens[i + 1:])
    version = DEFAULT_VERSION
    if "VERSION" in opts:
        v = opts["VERSION"]
        if not v.isdigit() or len(v) > 4:
            raise Malformed("bad VERSION")
        version = int(v)
    for k in ("VNODEID", "PROXYFOR", "PRIVKEY", "IDKEY", "REDIRECT"):
        if k in opts and not opts[k]:
            raise Malformed(f"empty {k}")
    return Request(
        command=command.lower(), args=args, version=version,
        vnodeid=opts.get("VNODEID"), proxyfor=opts.get("PROXYFOR"),
        privkey=opts.get("PRIVKEY"), idkey=opts.get("IDKEY"), redirect=opts.get("REDIRECT"),
        extra={k: v for k, v in opts.items() if k not in OPTION_KEYS})


def render_request(command: str, args: str = "", version: int = CURRENT_VERSION,
                   **options: str | None) -> bytes:
    """The request line a tmcc client sends (with the trailing space real clients send)."""
    parts = [f"VERSION={version}"]
    for k, v in options.items():
        if v:
            parts.append(f"{k.upper()}={v}")
    parts.append(command)
    if args:
        parts.append(args)
    return (" ".join(parts) + " \n").encode()


def valid_state(name: str) -> bool:
    return bool(_STATE_RE.match(name))


# --- reply text -------------------------------------------------------------------

def sq(value: object) -> str:
    """Single-quote a value (tmcc clients strip the quotes); a ' inside becomes "."""
    s = str(value)
    if "'" in s and '"' not in s:
        return '"' + s + '"'
    return "'" + s.replace("'", "") + "'"


def dq(value: object) -> str:
    """Double-quote a value; a " inside is dropped (the wire has no escapes)."""
    s = str(value)
    if '"' in s and "'" not in s:
        return "'" + s + "'"
    return '"' + s.replace('"', "") + '"'


def kv_line(*items: tuple[str, object] | str) -> str:
    """`WORD KEY=VALUE KEY=VALUE`; values must already be quoted if needed."""
    out = []
    for it in items:
        out.append(it if isinstance(it, str) else f"{it[0]}={it[1]}")
    return " ".join(out)


def join_lines(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def render_fullconfig(sections: dict[str, str]) -> str:
    """Wrap each section in identical `*** name` start and end markers."""
    out = []
    for name, text in sections.items():
        out.append(f"{MARKER}{name}\n")
        if text:
            out.append(text if text.endswith("\n") else text + "\n")
        out.append(f"{MARKER}{name}\n")
    return "".join(out)


def split_fullconfig(text: str) -> dict[str, str]:
    """Inverse of render_fullconfig: section name -> reply text (may be empty).

    A section whose end marker is missing (a truncated reply) is dropped, so
    a client never caches half an answer.
    """
    out: dict[str, str] = {}
    current: str | None = None
    buf: list[str] = []
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        if stripped.startswith(MARKER):
            name = stripped[len(MARKER):].strip()
            if current is None:
                current, buf = name, []
                continue
            if name == current:
                out[current] = "".join(buf)
                current = None
                continue
        if current is not None:
            buf.append(line)
    return out


def parse_kv(line: str) -> dict[str, str]:
    """KEY=VALUE pairs of one reply line (quotes removed); bare words map to ''."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and line[j] not in " =":
            j += 1
        key = line[i:j]
        if j < n and line[j] == "=":
            j += 1
            if j < n and line[j] in "'\"":
                q = line[j]
                k = line.find(q, j + 1)
                k = n if k < 0 else k
                out[key] = line[j + 1:k]
                i = k + 1
            else:
                k = line.find(" ", j)
                k = n if k < 0 else k
                out[key] = line[j:k]
                i = k
        else:
            out[key] = ""
            i = j
    return out

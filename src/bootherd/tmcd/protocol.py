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

# --- the command table -------------------------------------------------------------
#
# tmcd's command table at protocol 40, in tmcd's order (fullconfig's sections come
# out in this order).  Each command says which fullconfig it is part of (a
# physical node's, a vnode's, both or neither) and the rules the core applies
# before it renders anything.  The table is the protocol: the core, the
# renderers, the client's cache and docs/tmcd.md all read it.

PHYS, VIRT = 1, 2  # in the fullconfig of a physical node / of a vnode
ALL = PHYS | VIRT

ALLOCATED = 0x01  # only for a node allocated to an experiment
REMUDP = 0x02     # nodes off the trusted ranges may ask over UDP (the others may anyway)
SECRET = 0x04     # off the trusted ranges only over TLS; never over UDP
TCPONLY = 0x08    # never over UDP (tmcd refuses these there for everyone)
EVENT = 0x10      # the node reports something; the reply is empty or a short ack
BINARY = 0x20     # the reply is not text (gzip)
TLS = 0x40        # only over TLS, for every node


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    fullconfig: int
    flags: int

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


def _table(*rows: tuple[str, int, int]) -> dict[str, Command]:
    return {name: Command(name, fc, flags) for name, fc, flags in rows}


COMMAND_TABLE: dict[str, Command] = _table(
    ("reboot", 0, EVENT),
    ("nodeid", ALL, 0),
    ("nodeuuid", ALL, 0),
    ("manifest", ALL, 0),
    ("status", 0, 0),
    ("ifconfig", ALL, ALLOCATED),
    ("accounts", ALL, ALLOCATED | SECRET | TCPONLY),
    ("delay", ALL, ALLOCATED),
    ("bridges", ALL, ALLOCATED),
    ("linkdelay", ALL, ALLOCATED),
    ("hostnames", 0, ALLOCATED),
    ("rpms", ALL, ALLOCATED),
    ("deltas", 0, ALLOCATED),
    ("tarballs", ALL, ALLOCATED),
    ("blobs", ALL, ALLOCATED),
    ("startupcmd", ALL, ALLOCATED),
    ("startstatus", 0, ALLOCATED | EVENT),
    ("startstat", 0, EVENT),
    ("readycount", 0, ALLOCATED),
    ("ready", 0, ALLOCATED | EVENT),
    ("storageconfig", ALL, ALLOCATED),
    ("mounts", ALL, ALLOCATED),
    ("sfshostid", 0, ALLOCATED | EVENT),
    ("loadinfo", 0, 0),
    ("reset", 0, EVENT),
    ("routing", ALL, ALLOCATED),
    ("trafgens", ALL, ALLOCATED),
    ("nseconfigs", ALL, ALLOCATED | TCPONLY),
    ("creator", ALL, ALLOCATED),
    ("state", 0, EVENT),
    ("tunnels", ALL, ALLOCATED),
    ("vnodelist", PHYS, 0),
    ("subnodelist", PHYS, 0),
    ("isalive", 0, REMUDP | EVENT),
    ("ipodinfo", PHYS, SECRET | TCPONLY),
    ("ntpinfo", PHYS, TCPONLY),
    ("ntpdrift", 0, TCPONLY | EVENT),
    ("jailconfig", VIRT, ALLOCATED),
    ("plabconfig", VIRT, ALLOCATED),
    ("subconfig", 0, 0),
    ("sdparams", PHYS, 0),
    ("programs", ALL, ALLOCATED),
    ("syncserver", ALL, ALLOCATED),
    ("keyhash", ALL, ALLOCATED | SECRET),
    ("eventkey", ALL, ALLOCATED | SECRET),
    ("fullconfig", 0, ALLOCATED),
    ("routelist", PHYS, ALLOCATED),
    ("role", PHYS, ALLOCATED),
    ("rusage", 0, REMUDP | EVENT),
    ("watchdoginfo", ALL, REMUDP),
    ("hostkeys", 0, EVENT),
    ("tmcctest", 0, 0),
    ("firewallinfo", ALL, 0),
    ("hostinfo", 0, EVENT),
    ("emulabconfig", 0, ALLOCATED),
    ("eplabconfig", 0, ALLOCATED),
    ("localization", PHYS, 0),
    ("rootpswd", 0, SECRET),
    ("booterrno", 0, EVENT),
    ("bootlog", 0, EVENT),
    ("battery", 0, REMUDP | EVENT),
    ("topomap", 0, ALLOCATED | BINARY),
    ("userenv", ALL, ALLOCATED),
    ("tiptunnels", ALL, ALLOCATED),
    ("traceinfo", ALL, ALLOCATED),
    ("ltmap", 0, ALLOCATED | BINARY),
    ("ltpmap", 0, ALLOCATED | BINARY),
    ("elvindport", 0, EVENT),
    ("plabeventkeys", 0, SECRET),
    ("intfcmap", 0, 0),
    ("motelog", ALL, ALLOCATED),
    ("portregister", 0, 0),
    ("bootwhat", 0, 0),
    ("tpmblob", ALL, 0),
    ("tpmpubkey", ALL, 0),
    ("dhcpdconf", ALL, 0),
    ("securestate", 0, SECRET),
    ("quoteprep", 0, SECRET),
    ("nodeattributes", ALL, 0),
    ("disks", ALL, 0),
    ("arpinfo", 0, TLS),
    ("hwinfo", 0, 0),
    ("tiplineinfo", 0, ALLOCATED),
    ("imageinfo", 0, ALLOCATED),
    ("imagesize", 0, ALLOCATED),
    ("pnetnodeattrs", 0, ALLOCATED),
    ("serviceinfo", 0, 0),
)
COMMANDS = tuple(COMMAND_TABLE)


def fullconfig_sections(virtual: bool) -> tuple[str, ...]:
    """The sections of a node's fullconfig, in order (tmcd's table order)."""
    mask = VIRT if virtual else PHYS
    return tuple(c.name for c in COMMAND_TABLE.values() if c.fullconfig & mask)


FULLCONFIG_SECTIONS = fullconfig_sections(virtual=False)  # a physical node's
VNODE_SECTIONS = fullconfig_sections(virtual=True)
CACHEABLE = frozenset(FULLCONFIG_SECTIONS) | frozenset(VNODE_SECTIONS)
SECRET_SECTIONS = frozenset(c.name for c in COMMAND_TABLE.values() if c.has(SECRET))
MARKER = "*** "

_KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_NOT_PRINTABLE = re.compile(r"[^\t -~]")
# Requests parsed before, by their bytes: thousands of nodes send the same few lines
# ("VERSION=40 status "), and a Request is immutable.
_PARSED: dict[bytes, Request] = {}
_PARSED_MAX = 4096
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
    hit = _PARSED.get(data)
    if hit is not None:
        return hit
    req = _parse(data)
    if len(_PARSED) >= _PARSED_MAX:
        _PARSED.clear()
    _PARSED[data] = req
    return req


def _parse(data: bytes) -> Request:
    nl = data.find(b"\n")
    if nl >= 0:
        data = data[:nl]
    data = data.rstrip(b"\r")
    try:
        line = data.decode("ascii")
    except UnicodeDecodeError:
        raise Malformed("not ASCII") from None
    if _NOT_PRINTABLE.search(line):
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
    if not command.isascii() or not command.replace("_", "").isalnum():
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

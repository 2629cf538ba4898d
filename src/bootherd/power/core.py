"""Out-of-band power, the part with no I/O: operations, results, errors, the
power-on ramp and the node selection grammar.

Nothing here touches a socket, a thread or a clock: the ramp takes an explicit
``now`` and answers when the next power-on may start, so its rule is tested
with plain numbers (tests/power/test_power_core.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class PowerOp(StrEnum):
    ON = "on"
    OFF = "off"          # hard off, no OS shutdown
    CYCLE = "cycle"      # off then on (an off node is just powered on)
    RESET = "reset"      # warm reset, power stays on
    SOFT = "soft"        # ask the OS to shut down (ACPI power button)
    STATUS = "status"


# Operations that end with the node drawing its inrush current: these follow the
# power-on ramp (power.power_on_rate).  A reset keeps the power supply on.
POWERS_ON = frozenset({PowerOp.ON, PowerOp.CYCLE})

# Drivers of real BMCs: they can read a node's power state and cycle it
# (Wake-on-LAN can only power on; manual only records).
BMC_DRIVERS = frozenset({"ipmi", "ipmitool", "redfish"})

# The node_events.state of each action (status queries are not history).
EVENT_STATE = {PowerOp.ON: "POWER_ON", PowerOp.OFF: "POWER_OFF", PowerOp.CYCLE: "POWER_CYCLE",
               PowerOp.RESET: "POWER_RESET", PowerOp.SOFT: "POWER_SOFT"}
EVENT_SOURCE_MAX = 16  # node_events.source is String(16)


class ErrorKind(StrEnum):
    """Why one node's operation failed; each kind has one clear message shape."""

    CONFIG = "config"            # no driver, no address, unknown node
    AUTH = "auth"                # the BMC refused the credentials
    UNREACHABLE = "unreachable"  # nothing answered (refused, silent, no route)
    PROTOCOL = "protocol"        # something answered, but not the BMC protocol
    REFUSED = "refused"          # the BMC understood and said no (completion code, HTTP 4xx/5xx)
    UNSUPPORTED = "unsupported"  # the driver cannot do this operation
    TIMEOUT = "timeout"          # power.timeout passed
    CANCELLED = "cancelled"      # the batch was stopped before this node started


class PowerError(Exception):
    """A failed operation on one node; never carries a password."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class BmcTarget:
    """What a driver needs to reach one node's BMC (or console server)."""

    node_id: str
    driver: str             # ipmi | ipmitool | redfish | wol | manual
    address: str = ""       # host or IP; Redfish also takes a URL (http://host:port)
    port: int = 0           # 0: the driver's default (623, 443, 9)
    user: str = ""
    password: str = field(default="", repr=False)
    system: str = ""        # Redfish system id; "" = the BMC's only system
    console: str = ""       # "" | sol | tcp:HOST:PORT
    mac: str = ""           # control interface MAC, for Wake-on-LAN

    def where(self) -> str:
        """The BMC as named in messages and events: driver and address, never secrets."""
        if not self.address:
            return self.driver
        return f"{self.driver} {self.address}" + (f":{self.port}" if self.port else "")


@dataclass(frozen=True, slots=True)
class PowerResult:
    node_id: str
    op: PowerOp
    ok: bool
    power: str = ""          # on | off | unknown | "" (not asked)
    message: str = ""        # what happened, for the operator
    error: str = ""          # an ErrorKind value when not ok
    driver: str = ""
    started: float = 0.0     # wall clock when the BMC command was issued
    elapsed: float = 0.0     # seconds until the answer (or the timeout)

    def as_dict(self) -> dict:
        return {"node_id": self.node_id, "op": str(self.op), "ok": self.ok, "power": self.power,
                "message": self.message, "error": self.error, "driver": self.driver,
                "started": round(self.started, 6), "elapsed": round(self.elapsed, 3)}


def failed(node_id: str, op: PowerOp, err: PowerError, driver: str = "", started: float = 0.0,
           elapsed: float = 0.0) -> PowerResult:
    return PowerResult(node_id, op, False, "", err.message, str(err.kind), driver, started, elapsed)


class Ramp:
    """At most `per_second` power-ons per second, evenly spaced.

    A breaker trips on the sum of inrush currents, so starts are kept at least
    1/rate apart rather than allowed in bursts: the next start may come
    `delay(now)` seconds from now, and `start(now)` books one.  Measured from
    the previous *actual* start, a late start (a busy event loop) never lets
    the next one come sooner.  Several batches (CLI, API, the coordinator)
    share one Ramp, so the cap holds across callers.  ``per_second`` 0: no cap.
    """

    def __init__(self, per_second: float):
        if per_second < 0:
            raise ValueError("power-on rate must not be negative")
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self._last = float("-inf")

    def delay(self, now: float) -> float:
        """Seconds until a power-on may start (0: now)."""
        return max(0.0, self._last + self.interval - now)

    def start(self, now: float) -> None:
        """A power-on starts now."""
        self._last = max(self._last, now)


# --- node selection -------------------------------------------------------------

_RANGE = re.compile(r"^(?P<head>[A-Za-z0-9._-]*)\[(?P<body>[0-9,\- ]+)\](?P<tail>[A-Za-z0-9._-]*)$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_RANGE = 100_000  # nodes one pattern may name; a typo must not allocate a billion names


def expand_pattern(spec: str) -> list[str]:
    """`pc[1-3,7]` -> pc1 pc2 pc3 pc7; `pc[01-10]` keeps the zero padding.

    A plain node id comes back as itself.  Raises ValueError naming the spec."""
    spec = spec.strip()
    m = _RANGE.match(spec)
    if m is None:
        if not _NODE.match(spec):
            raise ValueError(f"{spec!r}: not a node id or a range like pc[1-40]")
        return [spec]
    out: list[str] = []
    for part in m.group("body").split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"{spec!r}: empty item in the range")
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{spec!r}: {part!r} is not N or N-M")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"{spec!r}: {part!r} runs backwards")
        if len(out) + last - first + 1 > MAX_RANGE:
            raise ValueError(f"{spec!r}: names more than {MAX_RANGE} nodes")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        out.extend(f"{m.group('head')}{i:0{width}d}{m.group('tail')}"
                   for i in range(first, last + 1))
    return out


def select_nodes(specs: Iterable[str], known: Iterable[str],
                 experiments: Mapping[tuple[str, str], Iterable[str]]) -> tuple[list[str], list[str]]:
    """Resolve node ids, ranges and `pid/eid` (every node of an experiment).

    Returns (nodes in the order named, without repeats; names that are not
    nodes).  Unknown names are reported, not fatal: the other nodes still run.
    Raises ValueError for a malformed spec or an unknown experiment."""
    known_set = set(known)
    seen: set[str] = set()
    nodes: list[str] = []
    unknown: list[str] = []
    for spec in specs:
        if "/" in spec:
            pid, _, eid = spec.strip().partition("/")
            members = experiments.get((pid, eid))
            if members is None:
                raise ValueError(f"{spec!r}: no experiment {pid}/{eid}")
            names = list(members)
        else:
            names = expand_pattern(spec)
        for n in names:
            if n in seen:
                continue
            seen.add(n)
            (nodes if n in known_set else unknown).append(n)
    return nodes, unknown

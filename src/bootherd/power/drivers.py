"""Power drivers: one interface, one class per way of reaching a node's power.

    driver.run(op, target, pxe=..., timeout=...) -> Answer    (raises PowerError)

- ``ipmi``: IPMI 2.0 over LAN (lanplus, RMCP+) with pyghmi, in a bounded pool of
  threads (pyghmi blocks); falls back to ``ipmitool`` when pyghmi is missing.
- ``ipmitool``: the same commands through an ``ipmitool -I lanplus`` child; the
  password reaches it through its environment (``-E``), never its command line.
- ``redfish``: DMTF Redfish with sushy (OpenStack's client), in the same kind of pool.
- ``wol``: a Wake-on-LAN magic packet to the node's control MAC; can only power on.
- ``manual``: does nothing but answer; the controller records the request, so an
  operator's checklist is the node's history.

Both IPMI drivers send the same bytes (Chassis Control, Get Chassis Status, Set
System Boot Options parameter 5), so they behave alike towards a BMC.  Every
driver ends by itself within ``timeout``; the controller does not depend on it
but frees the BMC's slot only when the driver has let go.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from .core import BmcTarget, ErrorKind, PowerError, PowerOp

IPMI_PORT = 623
REDFISH_PORT = 443
WOL_PORT = 9

# IPMI Chassis Control (netfn 0x00, command 0x02) data byte per operation.
CHASSIS_CONTROL = {PowerOp.OFF: 0, PowerOp.ON: 1, PowerOp.CYCLE: 2, PowerOp.RESET: 3,
                   PowerOp.SOFT: 5}
# Set System Boot Options, parameter 5 (boot flags): valid, this boot only, force PXE.
BOOT_FLAGS_PXE_ONCE = (0x05, 0x80, 0x04, 0x00, 0x00, 0x00)
# Completion codes a BMC answers with, as the IPMI 2.0 spec names them.
COMPLETION_CODES = {0xc0: "node busy", 0xc1: "invalid command", 0xc3: "timeout",
                    0xc7: "request data length invalid", 0xc9: "parameter out of range",
                    0xcc: "invalid data field in request", 0xd4: "insufficient privilege",
                    0xd5: "not supported in present state", 0xff: "unspecified error"}


@dataclass(frozen=True, slots=True)
class Answer:
    power: str      # on | off | unknown | "" (an action the BMC accepted)
    message: str


class Driver(Protocol):
    """`pxe`: set a one-time network boot first; with `pxe_optional` a BMC that refuses
    it (ipmi_sim driving a VM, a Redfish BMC without the override) is still powered,
    and the answer's message says the boot device was refused."""

    name: str

    async def run(self, op: PowerOp, target: BmcTarget, *, pxe: bool, timeout: float,
                  pxe_optional: bool = False) -> Answer: ...


def _need(target: BmcTarget, *fields: str) -> None:
    missing = [f for f in fields if not getattr(target, f)]
    if missing:
        raise PowerError(ErrorKind.CONFIG, f"{target.driver} BMC of {target.node_id} has no "
                                           f"{' or '.join(missing)} in the inventory")


def _done_message(op: PowerOp, pxe: bool, extra: str = "") -> str:
    words = {PowerOp.ON: "power on", PowerOp.OFF: "power off", PowerOp.CYCLE: "power cycle",
             PowerOp.RESET: "reset", PowerOp.SOFT: "soft off (OS asked to shut down)"}
    msg = words[op] + " accepted"
    if pxe:
        msg = "one-time PXE boot set; " + msg
    return msg + (f" ({extra})" if extra else "")


# --- IPMI over LAN with pyghmi ---------------------------------------------------------

class PyghmiDriver:
    """IPMI 2.0 lanplus through pyghmi, each operation on its own session."""

    name = "ipmi"

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool

    async def run(self, op: PowerOp, target: BmcTarget, *, pxe: bool, timeout: float,
                  pxe_optional: bool = False) -> Answer:
        from pyghmi import exceptions as pexc

        _need(target, "address", "user")
        loop = asyncio.get_running_loop()

        def call(fn: Any, *args: Any) -> Any:
            return loop.run_in_executor(self.pool, fn, *args)

        def error(e: Any) -> PowerError:
            return _ipmi_error(target, str(e.args[0]) if e.args and e.args[0] else "",
                               getattr(e, "ipmicode", 0) or 0)

        async def raw(netfn: int, no: int, data: tuple = ()) -> bytes:
            # A PowerError, as ipmitool's: ipmi_sequence tells a refused boot device by it.
            try:
                return await call(_pyghmi_raw, cmd, netfn, no, data)
            except pexc.IpmiException as e:
                raise error(e) from None

        try:
            cmd = await call(_pyghmi_login, target)
            try:
                return await ipmi_sequence(op, pxe, raw, pxe_optional)
            finally:
                await call(_pyghmi_logout, cmd)
        except pexc.IpmiException as e:
            raise error(e) from None
        except OSError as e:  # name resolution, no route
            raise PowerError(ErrorKind.UNREACHABLE,
                             f"cannot reach {target.where()}: {e.strerror or e}") from None


_login_locks: dict[tuple[str, int], threading.Lock] = {}
_login_locks_guard = threading.Lock()


def _pyghmi_login(t: BmcTarget) -> Any:
    port = t.port or IPMI_PORT
    # pyghmi shares sessions per BMC in class-wide tables; two logins to one BMC at
    # once (two nodes of a chassis, a wrong and a right password) can pick up each
    # other's half-made session.  Logins to one BMC take turns; different BMCs don't.
    with _login_locks_guard:
        lock = _login_locks.setdefault((t.address, port), threading.Lock())
    with lock:
        try:
            return _pyghmi_command(t, port)
        except AttributeError as e:
            # pyghmi marks a failed session broken before it stores the reason, and a
            # loaded machine can read it in between ("no attribute 'errormsg'"); the
            # second login gets the BMC's answer itself.
            if "errormsg" in str(e):
                try:
                    return _pyghmi_command(t, port)
                except AttributeError:
                    pass
        raise PowerError(ErrorKind.UNREACHABLE, f"IPMI session to {t.where()} failed to start")


def _pyghmi_command(t: BmcTarget, port: int) -> Any:
    from pyghmi.ipmi import command
    from pyghmi.ipmi.private import session

    try:
        return command.Command(bmc=t.address, userid=t.user, password=t.password, port=port)
    finally:
        # pyghmi leaves a logged-in session in its table of sessions being set up; the
        # next Command for the same BMC would then wait on it forever.
        session.Session.initting_sessions.pop((t.address, t.user, t.password, port, None), None)


def _pyghmi_raw(cmd: Any, netfn: int, cmdno: int, data: tuple = ()) -> bytes:
    from pyghmi import exceptions as pexc

    rsp = cmd.raw_command(netfn=netfn, command=cmdno, data=data)
    if "error" in rsp:
        raise pexc.IpmiException(rsp["error"], rsp.get("code", 0))
    return bytes(rsp.get("data", b""))


def _pyghmi_logout(cmd: Any) -> None:
    try:
        cmd.ipmi_session.logout()
    except Exception:  # noqa: BLE001 - the answer is in; a lost logout expires by itself
        pass


# What `ipmitool -v` prints on every call (its vendor probe included), not about an error.
_IPMITOOL_CHATTER = ("Loading IANA", "Running Get VSO", "Invalid completion code received: Invalid "
                     "command", "Discovered IPMB", "RAW REQ", "RAW RSP")


async def _kill(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's group, by its pid
    except ProcessLookupError:
        pass
    await proc.wait()


async def ipmi_sequence(op: PowerOp, pxe: bool, raw: Any, pxe_optional: bool = False) -> Answer:
    """The IPMI commands of one operation over any transport's `await raw(netfn, cmd, data)`."""
    status = await raw(0x00, 0x01)
    power = "on" if status and status[0] & 1 else "off"
    if op == PowerOp.STATUS:
        return Answer(power, f"power is {power}")
    refused = ""
    if pxe:
        try:
            await raw(0x00, 0x08, BOOT_FLAGS_PXE_ONCE)
        except PowerError as e:
            if not pxe_optional or e.kind is not ErrorKind.REFUSED:
                raise
            pxe, refused = False, f"one-time PXE boot refused: {e.message}"
    if op == PowerOp.CYCLE and power == "off":
        await raw(0x00, 0x02, (CHASSIS_CONTROL[PowerOp.ON],))  # a cycle of an off node is an on
        return Answer("on", _done_message(PowerOp.ON, pxe, _join("was off", refused)))
    await raw(0x00, 0x02, (CHASSIS_CONTROL[op],))
    return Answer(_AFTER.get(op, ""), _done_message(op, pxe, refused))


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


_AFTER = {PowerOp.ON: "on", PowerOp.OFF: "off", PowerOp.CYCLE: "on"}


def _ipmi_error(t: BmcTarget, text: str, code: int = 0) -> PowerError:
    low = text.lower()
    if any(w in low for w in ("password", "unauthorized", "rakp", "hmac", "privilege level",
                              "authentication")):
        return PowerError(ErrorKind.AUTH, f"{t.where()} refused the credentials of user "
                                          f"{t.user!r} ({text})")
    if code or any(w in low for w in ("invalid data", "completion code", "not supported",
                                      "invalid command", "insufficient")):
        name = COMPLETION_CODES.get(code, "")
        detail = text or name or f"completion code 0x{code:02x}"
        return PowerError(ErrorKind.REFUSED, f"{t.where()} refused the command: {detail}")
    return PowerError(ErrorKind.UNREACHABLE,
                      f"no valid IPMI answer from {t.where()}"
                      + (f" ({text})" if text else "")
                      + ": BMC down, filtered, or not an IPMI 2.0 (lanplus) BMC")


# --- IPMI over LAN with ipmitool -------------------------------------------------------

class IpmitoolDriver:
    """The same commands as PyghmiDriver through an `ipmitool -I lanplus` child."""

    name = "ipmitool"

    def __init__(self, path: str = "ipmitool", cipher_suite: int = 3):
        self.path = path
        self.cipher_suite = cipher_suite

    async def run(self, op: PowerOp, target: BmcTarget, *, pxe: bool, timeout: float,
                  pxe_optional: bool = False) -> Answer:
        _need(target, "address", "user")
        exe = shutil.which(self.path)
        if exe is None:
            raise PowerError(ErrorKind.CONFIG, f"ipmitool not found ({self.path!r}): install "
                                               "Debian package ipmitool")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def raw(netfn: int, cmdno: int, data: tuple = ()) -> bytes:
            left = deadline - loop.time()
            if left <= 0:
                raise PowerError(ErrorKind.TIMEOUT, f"{target.where()}: no answer within "
                                                    f"{timeout:g} s")
            return await self._ipmitool(exe, target, left, ["raw", f"0x{netfn:02x}",
                                                             f"0x{cmdno:02x}",
                                                             *(f"0x{b:02x}" for b in data)])

        return await ipmi_sequence(op, pxe, raw, pxe_optional)

    async def _ipmitool(self, exe: str, t: BmcTarget, timeout: float, args: list[str]) -> bytes:
        # Each retry waits 1 s: as many as fit the time left, so ipmitool ends by itself.
        retries = max(0, min(4, int(timeout) - 1))
        # -v: only then does ipmitool say why a session failed (RAKP errors, no answer).
        cmd = [exe, "-v", "-I", "lanplus", "-H", t.address, "-p", str(t.port or IPMI_PORT),
               "-U", t.user, "-E", "-C", str(self.cipher_suite), "-N", "1", "-R", str(retries),
               *args]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "IPMI_PASSWORD": t.password,
               "LC_ALL": "C"}
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            await _kill(proc)
            raise PowerError(ErrorKind.TIMEOUT, f"{t.where()}: ipmitool got no answer within "
                                                f"{timeout:.1f} s") from None
        except asyncio.CancelledError:
            await _kill(proc)
            raise
        if proc.returncode != 0:
            text = " ".join(line.strip() for line in err.decode(errors="replace").splitlines()
                            if line.strip() and not line.startswith(_IPMITOOL_CHATTER))
            code = 0
            if "rsp=0x" in text:
                try:
                    code = int(text.split("rsp=0x", 1)[1][:2], 16)
                except ValueError:
                    code = 0
            raise _ipmi_error(t, text[:300], code)
        try:
            return bytes(int(x, 16) for x in out.split())
        except ValueError:
            raise PowerError(ErrorKind.PROTOCOL, f"{t.where()}: ipmitool printed something "
                                                 f"that is not a raw answer: {out[:80]!r}") from None


# --- Redfish with sushy ----------------------------------------------------------------

class RedfishDriver:
    name = "redfish"

    def __init__(self, pool: ThreadPoolExecutor, verify_tls: bool = True):
        self.pool = pool
        self.verify_tls = verify_tls

    async def run(self, op: PowerOp, target: BmcTarget, *, pxe: bool, timeout: float,
                  pxe_optional: bool = False) -> Answer:
        _need(target, "address")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, _redfish_run, op, target, pxe, timeout,
                                          self.verify_tls, pxe_optional)


def redfish_url(t: BmcTarget) -> str:
    """The BMC's base URL: `address` may be a host (https assumed) or a URL."""
    addr = t.address.rstrip("/")
    if "://" in addr:
        return addr
    host = f"[{addr}]" if ":" in addr else addr
    return f"https://{host}" + (f":{t.port}" if t.port else "")


def _redfish_run(op: PowerOp, t: BmcTarget, pxe: bool, timeout: float, verify: bool,
                 pxe_optional: bool = False) -> Answer:
    import requests
    import sushy
    import sushy.auth
    from sushy import exceptions as sx

    url = redfish_url(t)
    try:
        # Basic auth: one short conversation per operation, no session to clean up.
        # server_side_retries=1: one attempt (sushy reads 0 as its default of 3 tries).
        auth = sushy.auth.BasicAuth(t.user, t.password) if t.user else None
        root = sushy.Sushy(url, auth=auth, verify=verify, read_timeout=max(1.0, timeout),
                           connect_timeout=max(1.0, min(timeout, 5.0)),
                           server_side_retries=1, server_side_retries_delay=1)
        ident = t.system
        if ident and not ident.startswith("/"):
            ident = f"/redfish/v1/Systems/{ident}"
        system = root.get_system(ident or None)
        state = str(getattr(system.power_state, "value", system.power_state) or "unknown").lower()
        power = state if state in ("on", "off") else "unknown"
        if op == PowerOp.STATUS:
            return Answer(power, f"power is {state}")
        refused = ""
        if pxe:
            try:
                system.set_system_boot_options(sushy.BootSource.PXE,
                                               enabled=sushy.BootSourceOverrideEnabled.ONCE)
            except sx.AccessError:
                raise
            except (sx.HTTPError, sx.InvalidParameterValueError) as e:
                if not pxe_optional:
                    raise
                pxe, refused = False, f"one-time PXE boot refused: {_short(e, 120)}"
        if op == PowerOp.CYCLE and power == "off":
            system.reset_system(sushy.ResetType.ON)
            return Answer("on", _done_message(PowerOp.ON, pxe, _join("was off", refused)))
        allowed = set(system.get_allowed_reset_system_values() or ())
        if op == PowerOp.CYCLE:
            # PowerCycle where the BMC offers it; ForceRestart is the closest otherwise.
            kind = sushy.ResetType.POWER_CYCLE if sushy.ResetType.POWER_CYCLE in allowed \
                else sushy.ResetType.FORCE_RESTART
        else:
            kind = {PowerOp.ON: sushy.ResetType.ON, PowerOp.OFF: sushy.ResetType.FORCE_OFF,
                    PowerOp.RESET: sushy.ResetType.FORCE_RESTART,
                    PowerOp.SOFT: sushy.ResetType.GRACEFUL_SHUTDOWN}[op]
        if allowed and kind not in allowed:
            raise PowerError(ErrorKind.UNSUPPORTED, f"{t.where()} offers no {kind.value} reset "
                                                    f"(it offers {', '.join(sorted(allowed))})")
        system.reset_system(kind)
        return Answer(_AFTER.get(op, ""), _done_message(op, pxe, _join(kind.value, refused)))
    except sx.AccessError as e:
        raise PowerError(ErrorKind.AUTH, f"{t.where()} refused the credentials of user "
                                         f"{t.user!r} (HTTP {_status(e)})") from None
    except sx.ConnectionError as e:
        raise _redfish_transport_error(t, e) from None
    except sx.HTTPError as e:
        raise PowerError(ErrorKind.REFUSED, f"{t.where()} refused: HTTP {_status(e)} "
                                            f"{_short(getattr(e, 'detail', '') or e)}") from None
    except (sx.SushyError, ValueError, KeyError, TypeError, AttributeError) as e:
        # JSON that is not Redfish, HTML, a bare 200: sushy finds no attribute it needs.
        raise PowerError(ErrorKind.PROTOCOL, f"{t.where()} answered, but not with Redfish "
                                             f"({type(e).__name__}: {_short(e)})") from None
    except requests.RequestException as e:
        raise _redfish_transport_error(t, e) from None


def _redfish_transport_error(t: BmcTarget, e: Exception) -> PowerError:
    text = _short(e)
    low = text.lower()
    if any(w in low for w in ("badstatusline", "remotedisconnected", "invalid http",
                              "wrong version number", "protocol")):
        return PowerError(ErrorKind.PROTOCOL, f"{t.where()} answered, but not with HTTP/Redfish "
                                              f"({text})")
    if "timed out" in low or "timeout" in low:
        return PowerError(ErrorKind.TIMEOUT, f"{t.where()}: no answer in time ({text})")
    return PowerError(ErrorKind.UNREACHABLE, f"cannot reach {t.where()} ({text})")


def _status(e: Exception) -> str:
    return str(getattr(e, "status_code", "") or "?")


def _short(e: object, n: int = 200) -> str:
    text = " ".join(str(e).split())
    return text[:n]


# --- Wake-on-LAN ------------------------------------------------------------------------

def magic_packet(mac: str) -> bytes:
    """Six 0xff bytes, then the MAC sixteen times (AMD's Magic Packet)."""
    raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return b"\xff" * 6 + raw * 16


class WolDriver:
    """Powers a node on with a magic packet; it can do nothing else."""

    name = "wol"

    def __init__(self, default_address: str = "255.255.255.255"):
        self.default_address = default_address

    async def run(self, op: PowerOp, target: BmcTarget, *, pxe: bool, timeout: float,
                  pxe_optional: bool = False) -> Answer:
        if op == PowerOp.STATUS:
            return Answer("unknown", "Wake-on-LAN cannot read the power state")
        pxe = pxe and not pxe_optional  # a magic packet boots what the NIC's firmware boots
        if op != PowerOp.ON or pxe:
            what = "a one-time boot device" if pxe else op.value
            raise PowerError(ErrorKind.UNSUPPORTED, f"Wake-on-LAN can only power on, not {what}")
        _need(target, "mac")
        addr = target.address or self.default_address
        port = target.port or WOL_PORT
        try:
            pkt = magic_packet(target.mac)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.setblocking(False)
                sock.sendto(pkt, (addr, port))
        except (OSError, ValueError) as e:
            raise PowerError(ErrorKind.UNREACHABLE, f"cannot send the magic packet for "
                                                    f"{target.mac} to {addr}:{port}: {e}") from None
        return Answer("", f"magic packet for {target.mac} sent to {addr}:{port}")


# --- manual ---------------------------------------------------------------------------------

class ManualDriver:
    """No BMC: the request is recorded (by the controller) for an operator to carry out."""

    name = "manual"

    async def run(self, op: PowerOp, target: BmcTarget, *, pxe: bool, timeout: float,
                  pxe_optional: bool = False) -> Answer:
        if op == PowerOp.STATUS:
            return Answer("unknown", "manual power: no BMC to ask")
        return Answer("", f"recorded for an operator: {op.value} by hand"
                          + (" and boot it from the network once" if pxe else ""))


DRIVER_NAMES = ("ipmi", "ipmitool", "redfish", "wol", "manual")


def make_drivers(settings: Any, pool: ThreadPoolExecutor) -> Mapping[str, Driver]:
    """One instance of each driver, sharing the thread pool of the blocking ones."""
    ipmitool = IpmitoolDriver(settings.ipmitool, settings.ipmi_cipher_suite)
    try:
        import pyghmi  # noqa: F401
    except ImportError:
        ipmi: Driver = ipmitool  # the fallback everyone knows
    else:
        ipmi = PyghmiDriver(pool)
    return {"ipmi": ipmi, "ipmitool": ipmitool,
            "redfish": RedfishDriver(pool, settings.redfish_verify_tls),
            "wol": WolDriver(settings.wol_address), "manual": ManualDriver()}

"""Real BMCs for the power tests, on loopback: OpenIPMI's ipmi_sim and sushy-tools'
Redfish emulator, plus BMCs that misbehave (garbage answers, silence).

Not a conftest.py (see tests/web/web_helpers.py for why); test modules import
what they use.  Every process is started here, recorded, and killed by its pid.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootherd.procs import free_port, terminate

USER, PASSWORD = "admin", "bmc-secret-7"
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """preexec_fn: a killed test run takes its BMCs along (PR_SET_PDEATHSIG)."""
    _libc.prctl(1, signal.SIGKILL, 0, 0, 0)

# The chassis behind a BMC without a VM: ipmi_sim runs this for power and boot
# commands (its chassis_control interface) and we read its state files.
CHASSIS = r"""#!/bin/sh
dir=$1; shift; op=$1; shift
case $op in
get)
    for p in "$@"; do
        case $p in
        power) echo "power:$(cat "$dir/power" 2>/dev/null || echo 0)" ;;
        boot) echo "boot:$(cat "$dir/boot" 2>/dev/null || echo default)" ;;
        *) echo "Invalid parameter: $p"; exit 1 ;;
        esac
    done ;;
set)
    while [ $# -ge 2 ]; do
        echo "$(date +%s.%N) $1 $2" >> "$dir/log"
        case $1 in
        power) echo "$2" > "$dir/power" ;;
        boot) echo "$2" > "$dir/boot" ;;
        reset|shutdown) ;;
        *) echo "Invalid parameter: $1"; exit 1 ;;
        esac
        shift 2
    done ;;
*) echo "Unknown operation: $op"; exit 1 ;;
esac
"""


def need_ipmi_sim() -> None:
    missing = [p for p in ("ipmi_sim", "ipmitool") if shutil.which(p) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{' and '.join(missing)} missing: scripts/setup.sh installs openipmi, "
                        "ipmitool")
        pytest.skip(f"{' and '.join(missing)} not installed (Debian openipmi, ipmitool)")


@dataclass
class IpmiSim:
    """One ipmi_sim BMC on 127.0.0.1:port, its chassis state in `state`."""

    dir: Path
    port: int
    proc: subprocess.Popen

    @property
    def state(self) -> Path:
        return self.dir / "chassis"

    def power(self) -> str:
        try:
            return "on" if (self.state / "power").read_text().strip() == "1" else "off"
        except FileNotFoundError:
            return "off"

    def boot(self) -> str:
        try:
            return (self.state / "boot").read_text().strip()
        except FileNotFoundError:
            return "default"

    def commands(self) -> list[tuple[float, str, str]]:
        try:
            lines = (self.state / "log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [(float(ts), what, value) for ts, what, value in (ln.split() for ln in lines)]

    def ipmitool(self, *args: str, password: str = PASSWORD) -> subprocess.CompletedProcess:
        return subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(self.port),
                               "-U", USER, "-E", "-C", "3", *args], capture_output=True, text=True,
                              env={**os.environ, "IPMI_PASSWORD": password}, timeout=30)

    def stop(self) -> None:
        terminate(self.proc, 5)


def lan_conf(port: int, extra: str, name: str = "bh") -> str:
    return textwrap.dedent(f"""\
        name "{name}"
        set_working_mc 0x20
          startlan 1
            addr 127.0.0.1 {port}
            priv_limit admin
            allowed_auths_callback none md2 md5 straight
            allowed_auths_user none md2 md5 straight
            allowed_auths_operator none md2 md5 straight
            allowed_auths_admin none md2 md5 straight
            guid a123456789abcdefa123456789abcdef
          endlan
        """) + extra + f'  user 2 true "{USER}" "{PASSWORD}" admin 16 none md2 md5 straight\n'


EMU = "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n" \
      "mc_enable 0x20\n"


# A chassis without boot options (as ipmi_sim driving a VM): a one-time boot device is
# refused, power works.
CHASSIS_NO_BOOT = CHASSIS.replace('        boot) echo "$2" > "$dir/boot" ;;\n', "")


def start_ipmi_sim(workdir: Path, extra: str = "", port: int = 0,
                   chassis: str = CHASSIS) -> IpmiSim:
    """ipmi_sim with `extra` lan.conf lines (default: the `chassis` script's chassis)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    if not extra:
        (workdir / "chassis").mkdir(exist_ok=True)
        script = workdir / "chassis.sh"
        script.write_text(chassis)
        script.chmod(0o755)
        extra = f'  chassis_control "{script} {workdir / "chassis"}"\n'
    (workdir / "lan.conf").write_text(lan_conf(port, extra))
    (workdir / "bmc.emu").write_text(EMU)
    (workdir / "state").mkdir(exist_ok=True)
    with open(workdir / "ipmi_sim.log", "ab") as log:
        proc = subprocess.Popen(["ipmi_sim", "-c", str(workdir / "lan.conf"), "-f",
                                 str(workdir / "bmc.emu"), "-s", str(workdir / "state"), "-n"],
                                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    sim = IpmiSim(workdir, port, proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("ipmi_sim exited:\n" + (workdir / "ipmi_sim.log").read_text())
        if sim.ipmitool("chassis", "power", "status").returncode == 0:
            return sim
        time.sleep(0.3)
    sim.stop()
    raise RuntimeError("ipmi_sim did not answer within 20 s")


# --- Redfish -------------------------------------------------------------------------------

SYSTEM_UUIDS = ["8cf7c1b4-6d3a-4b5e-9a0f-5f7a2c000001", "8cf7c1b4-6d3a-4b5e-9a0f-5f7a2c000002"]


@dataclass
class SushyEmulator:
    url: str
    proc: subprocess.Popen
    dir: Path

    def system(self, uuid: str) -> dict:
        import requests

        r = requests.get(f"{self.url}/redfish/v1/Systems/{uuid}", auth=(USER, PASSWORD), timeout=10)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        terminate(self.proc, 5)


def start_sushy(workdir: Path) -> SushyEmulator:
    """sushy-tools' emulator with its fake driver (no libvirt) and basic auth."""
    import bcrypt

    exe = Path(sys.executable).with_name("sushy-emulator")
    if not exe.exists():
        pytest.fail("sushy-emulator missing: pip install -e '.[test]' installs sushy-tools")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = workdir / "htpasswd"
    auth.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}\n")
    systems = [{"uuid": u, "name": f"node-{i}", "power_state": "Off", "external_notifier": False,
                "nics": [{"mac": f"52:54:00:aa:00:{i:02x}", "ip": f"127.30.0.{i + 1}"}]}
               for i, u in enumerate(SYSTEM_UUIDS)]
    conf = workdir / "emulator.conf"
    conf.write_text(f"SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\nSUSHY_EMULATOR_LISTEN_PORT = {port}\n"
                    f"SUSHY_EMULATOR_AUTH_FILE = {str(auth)!r}\n"
                    f"SUSHY_EMULATOR_STATE_DIR = {str(workdir / 'state')!r}\n"
                    f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}\n")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    with open(workdir / "emulator.log", "ab") as log:
        proc = subprocess.Popen([str(exe), "--config", str(conf), "--fake"], cwd=workdir,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, preexec_fn=die_with_parent)
    emu = SushyEmulator(f"http://127.0.0.1:{port}", proc, workdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("sushy-emulator exited:\n" + (workdir / "emulator.log").read_text())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return emu
        except OSError:
            time.sleep(0.3)
    emu.stop()
    raise RuntimeError("sushy-emulator did not listen within 30 s")


# --- BMCs that misbehave ------------------------------------------------------------------

class Misbehaving:
    """Loopback servers that are not BMCs: each answers every packet or connection
    with garbage, or accepts and never answers."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()

    def udp_garbage(self) -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.2)
        self.socks.append(s)

        def serve() -> None:
            while not self.stop.is_set():
                try:
                    _, addr = s.recvfrom(4096)
                    s.sendto(b"\x06\x00\xff\x07" + os.urandom(40), addr)
                except (TimeoutError, OSError):
                    continue
        threading.Thread(target=serve, daemon=True).start()
        return s.getsockname()[1]

    def tcp(self, answer: bytes | None) -> int:
        """`answer` to every connection (then close); None: accept and stay silent."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        s.settimeout(0.2)
        self.socks.append(s)
        held: list[socket.socket] = []

        def serve() -> None:
            while not self.stop.is_set():
                try:
                    c, _ = s.accept()
                except (TimeoutError, OSError):
                    continue
                if answer is None:
                    held.append(c)  # silent: keep it open, say nothing
                    continue
                try:
                    c.settimeout(2)
                    c.recv(65536)
                    c.sendall(answer)
                except OSError:
                    pass
                finally:
                    c.close()
            for c in held:
                c.close()
        threading.Thread(target=serve, daemon=True).start()
        return s.getsockname()[1]

    def close(self) -> None:
        self.stop.set()
        time.sleep(0.3)
        for s in self.socks:
            s.close()


def closed_port() -> int:
    """A loopback port nothing listens on (TCP refused, UDP unanswered)."""
    return free_port()

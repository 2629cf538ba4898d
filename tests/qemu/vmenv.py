"""A throw-away boot lab: `bootherd serve` in one network namespace, QEMU VMs
in another, joined by a veth pair and a bridge.

    server ns bhq<pid><rand>s            client ns bhq<pid><rand>c
    vs0 10.77.0.1/24  <--- veth --->  vc0 --+-- br0 --+-- tap0 (VM)
    bootherd serve (67, 69, 7777, 80)              +-- tap1 (VM) ...

Nothing touches the host's own interfaces.  Every process is started by us and
killed by its pid; both namespaces are deleted by close(), which also runs at
interpreter exit, so a failing or interrupted test leaves nothing behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from nodeimage import HTTP_PORT, MARKER_FAIL, MARKER_OK, NodeImage

SUBNET = "10.77.0"
SERVER_IP = f"{SUBNET}.1"
# The IPv6-only lab: one /64, radvd announcing it (managed flag: DHCPv6 for the firmware;
# autonomous: the booted node forms the same EUI-64 address the inventory gives it).
PREFIX6 = "fd77::"
SERVER6 = "fd77::1"
RADVD_CONF = """interface vs0 {
    AdvSendAdvert on;
    MinRtrAdvInterval 3;
    MaxRtrAdvInterval 4;
    AdvManagedFlag on;
    AdvOtherConfigFlag on;
    AdvDefaultLifetime 0;
    prefix fd77::/64 { AdvOnLink on; AdvAutonomous on; };
};
"""
PID, EID = "qemuproj", "boot"
OS_IMAGE = "QEMU-NODE"
OS_IMAGE_ARM64 = "QEMU-NODE-ARM64"
OS_DISK = "QEMU-DISK"  # boot the node's own disk (what a reload wrote)
OS_IMAGE_UP = "QEMU-NODE-UP"  # the same node, which stays up at ISUP (the BMC VM's)
# A kernel that hangs on purpose: no init it can run (rdinit names none), so it
# panics for want of a root file system, and panic=0 keeps it hung, not rebooting.
OS_HANG = "QEMU-HANG"
HANG_TEXT = "end Kernel panic - not syncing"
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
# Secure Boot enforced: the SMM build with the Microsoft keys enrolled (shim is signed
# by the UEFI CA), one copy of the variable store per VM.
OVMF_CODE_SB = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
OVMF_VARS_MS = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
AAVMF_CODE = "/usr/share/AAVMF/AAVMF_CODE.fd"
AAVMF_VARS = "/usr/share/AAVMF/AAVMF_VARS.fd"
ARM64_LOADER = "arm64/grubnetaa64.efi"  # in the TFTP root: Debian's signed arm64 GRUB
# OVMF's network boot options, switched off through fw_cfg to leave the one a test wants.
NO_PXE4 = ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n"]
NO_PXE6 = ["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"]
REPO = Path(__file__).resolve().parents[2]


PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
NS_RE = re.compile(r"^bhq(\d+)x[0-9a-f]{4}[sc]$")


def _die_with_parent() -> None:
    # Runs in the child before exec: a killed test run takes its VMs and server along.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(cmd: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start cmd with stdout and stderr into log; it dies with this process."""
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                cwd=cwd, preexec_fn=_die_with_parent)


def sweep_stale_namespaces() -> list[str]:
    """Delete lab namespaces left by runs that died without cleaning up (pid gone)."""
    gone = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NS_RE.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            sh("ip", "netns", "del", name, check=False)
            gone.append(name)
    return gone


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def bootherd_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("bootherd")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from bootherd.cli import main; sys.exit(main())"]


# Router advertisements on the boot LAN, as a real network has: without them iPXE
# waits about 13 s for IPv6 autoconfiguration before it uses its DHCP answer.
# Flags 0 (no DHCPv6) and router lifetime 0 (not a default router).
RA_SENDER = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 0, 0, 0)
idx = socket.if_nametoindex(sys.argv[1])
while True:
    try:
        s.sendto(ra, ("ff02::1", 0, 0, idx))
    except OSError:
        pass  # link-local address still in duplicate address detection
    time.sleep(1)
"""


# A node with a BMC: OpenIPMI's ipmi_sim in the client namespace on the boot LAN
# (a BMC sharing the node's LAN, as many do), driving its VM through QEMU's
# external BMC device; its serial-over-LAN is the VM's serial port.
BMC_IP = f"{SUBNET}.250"
BMC_USER, BMC_PASSWORD = "admin", "lab-bmc-pw"


@dataclass
class NodeSpec:
    node_id: str
    mac: str
    ip: str  # "" on the IPv6-only lab
    allocated: bool = True
    bmc: bool = False  # power over IPMI through ipmi_sim at BMC_IP (see Lab.start_bmc)
    type: str = "qemu"
    os: str = OS_IMAGE
    ip6: str = ""


def eui64_address(prefix: str, mac: str) -> str:
    """The SLAAC (modified EUI-64) address of `mac` in the /64 `prefix`."""
    import ipaddress

    b = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([b[0] ^ 2]) + b[1:3] + b"\xff\xfe" + b[3:]
    return str(ipaddress.IPv6Address(ipaddress.IPv6Address(prefix).packed[:8] + iid))


def node_specs6(count: int) -> list[NodeSpec]:
    """Nodes of the IPv6-only lab: no IPv4 address, their SLAAC address as ip6."""
    out = []
    for i in range(1, count + 1):
        mac = f"52:54:00:77:06:{i:02x}"
        out.append(NodeSpec(f"qemu6n{i}", mac, "", ip6=eui64_address(PREFIX6, mac)))
    return out

def node_specs(count: int, unallocated: set[str] = frozenset(),  # type: ignore[assignment]
               bmc: set[str] = frozenset(),  # type: ignore[assignment]
               types: dict[str, str] | None = None, oses: dict[str, str] | None = None
               ) -> list[NodeSpec]:
    out = []
    for i in range(1, count + 1):
        nid = f"qemu{i}"
        out.append(NodeSpec(nid, f"52:54:00:77:00:{i:02x}", f"{SUBNET}.{10 + i}",
                            nid not in unallocated, nid in bmc, (types or {}).get(nid, "qemu"),
                            (oses or {}).get(nid, OS_IMAGE)))
    return out


def testbed_toml(nodes: list[NodeSpec], cmdline_extra: str = "") -> str:
    """A small inventory: one image booting our kernel, one experiment with a tarball."""
    doc = {
        "groups": [{"name": PID, "gid": 6100}],
        "users": [{"login": "tester", "uid": 20000, "gid": 6100, "name": "QEMU Tester",
                   "email": "tester@example.org", "groups": [PID],
                   "keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAtest tester@lab"]}],
        # bootherd's defaults for x86 (no loader named: undionly.kpxe, snponly.efi,
        # ipxe.efi, served from Debian's ipxe package), the arm64 slot named; Secure Boot
        # nodes get shim as their UEFI loader.
        "node_types": [{"name": "qemu", "description": "QEMU TCG virtual machine",
                        "loaders": {"uefi-arm64": ARM64_LOADER}},
                       {"name": "qemu-sb", "description": "QEMU, OVMF with Secure Boot",
                        "loader_uefi": "shimx64.efi"}],
        "os_images": [{"name": OS_IMAGE, "kind": "kernel", "path": "node/vmlinuz",
                       "initrd": "node/initrd.gz",
                       "cmdline": f"console=ttyS0 panic=-1 edd=off{cmdline_extra}",
                       "description": "Debian kernel + busybox test node"},
                      {"name": OS_IMAGE_UP, "kind": "kernel", "path": "node/vmlinuz",
                       "initrd": "node/initrd.gz",
                       "cmdline": f"console=ttyS0 panic=-1 edd=off bootherd.stayup{cmdline_extra}",
                       "description": "the test node, staying up once ISUP"},
                      {"name": OS_HANG, "kind": "kernel", "path": "node/vmlinuz",
                       "initrd": "node/initrd.gz",
                       "cmdline": "console=ttyS0 panic=0 edd=off rdinit=/no-such-init",
                       "description": "a kernel that panics and hangs (no init)"},
                      {"name": OS_DISK, "kind": "part", "partition": 1,
                       "description": "the node's disk (written by a reload)"},
                      {"name": OS_IMAGE_ARM64, "kind": "kernel", "path": "node/arm64/vmlinuz",
                       "initrd": "node/arm64/initrd.gz", "cmdline": "console=ttyAMA0 panic=-1",
                       "description": "Debian arm64 kernel + busybox test node"}],
        "nodes": [{"node_id": n.node_id, "type": n.type, "default_os": n.os,
                   "interfaces": [{"mac": n.mac, "ip": n.ip, "ip6": n.ip6,
                                   "mask": "255.255.255.0" if n.ip else "",
                                   "role": "ctrl", "iface": "eth0"}],
                   **({"power": {"driver": "ipmi", "address": BMC_IP, "user": BMC_USER,
                                 "password": "env:BOOTHERD_LAB_BMC_PASSWORD", "console": "sol"}}
                      if n.bmc else {})} for n in nodes],
        "experiments": [{"pid": PID, "eid": EID, "creator": "tester", "swapper": "tester",
                         "keyhash": "5eed" * 10,
                         "gid": PID, "members": [{"login": "tester", "root": True}],
                         "nodes": [{"node_id": n.node_id, "vname": f"n{n.node_id[4:]}"}
                                   for n in nodes if n.allocated],
                         "tarballs": [{"vname": "", "dir": "/opt/hello",
                                       "path": "tarballs/hello.tar.gz"}]}],
    }
    return tomli_w.dumps(doc)


# Serial-log milestones timed for reports (first appearance, seconds after QEMU start).
MILESTONES = {
    "firmware": ("SeaBIOS", "UEFI", "BdsDxe"),
    "pxe_dhcp": ("Configuring (net0", ">>Start PXE", ">>Start HTTP"),
    "loader": ("snponly.efi", "iPXE initialising", "Welcome to GRUB", "GNU GRUB"),
    "script": ("/ipxe... ok",),
    "kernel_fetched": ("initrd.gz... ok",),
    "linux": ("Linux version",),
    "init": ("node: kernel",),
    "node_dhcp": ("node: control address",),
    "isup": (MARKER_OK,),
}


@dataclass
class VM:
    name: str
    node: NodeSpec
    tap: str
    serial: Path
    proc: subprocess.Popen
    vars_file: Path | None = None  # UEFI variable store (boot the same VM again with it)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    milestones: dict[str, float] = field(default_factory=dict)

    def watch(self) -> None:
        """Poll the serial log until QEMU exits, timing the milestones."""
        while True:
            exited = self.proc.poll() is not None
            out = self.output()
            for name, needles in MILESTONES.items():
                if name not in self.milestones and any(n in out for n in needles):
                    self.milestones[name] = round(time.monotonic() - self.started, 1)
            if exited:
                return
            time.sleep(0.1)

    def timeline(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.milestones.items(),
                                                     key=lambda kv: kv[1]))

    def output(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def done(self) -> bool:
        if self.proc.poll() is not None and self.ended is None:
            self.ended = time.monotonic()
        return self.ended is not None

    def wait(self, timeout: float) -> str:
        """Wait for power-off (or the timeout); return the serial log."""
        deadline = time.monotonic() + timeout
        while not self.done() and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.output()

    @property
    def booted(self) -> bool:
        return MARKER_OK in self.output()

    @property
    def failed(self) -> str | None:
        out = self.output()
        i = out.find(MARKER_FAIL)
        return out[i:].splitlines()[0] if i >= 0 else None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-n:])


@dataclass
class Bmc:
    node_id: str
    mac: str
    dir: Path
    proc: subprocess.Popen

    def vm_pids(self) -> list[int]:
        """The QEMU processes running this node's VM (found by its MAC on the command line)."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"qemu-system-x86_64") \
                    and any(self.mac.encode() in a for a in argv):
                out.append(int(d.name))
        return sorted(out)


class Lab:
    """The namespaces, the server process and the VMs of one test session."""

    def __init__(self, image: NodeImage, workdir: Path, nodes: list[NodeSpec], taps: int,
                 arm64: NodeImage | None = None, ipv6_only: bool = False):
        self.image = image
        self.arm64 = arm64
        self.ipv6_only = ipv6_only
        self.dir = workdir
        self.nodes = {n.node_id: n for n in nodes}
        self.taps = taps
        tag = f"bhq{os.getpid()}x{secrets.token_hex(2)}"
        self.ns_server, self.ns_client = tag + "s", tag + "c"
        self.server: subprocess.Popen | None = None
        self.services: list[str] = []
        self.helpers: list[subprocess.Popen] = []
        self.server_log = workdir / "bootherd.log"
        self.vms: list[VM] = []
        self.bmcs: list[Bmc] = []
        self.free_taps = [f"tap{i}" for i in range(taps)]
        self.config = workdir / "bootherd.toml"
        self.db_url = f"sqlite:///{workdir / 'inventory.db'}"
        self._closed = False
        atexit.register(self.close)

    # ---------------------------------------------------------------- network
    def create_network(self) -> None:
        sweep_stale_namespaces()
        s, c = self.ns_server, self.ns_client
        sh("ip", "netns", "add", s)
        sh("ip", "netns", "add", c)
        nse = ("ip", "netns", "exec")
        # Create the pair inside the client namespace so nothing appears on the host.
        sh(*nse, c, "ip", "link", "add", "vc0", "type", "veth", "peer", "name", "vs0")
        sh(*nse, c, "ip", "link", "set", "vs0", "netns", s)
        if self.ipv6_only:
            sh(*nse, s, "ip", "-6", "addr", "add", f"{SERVER6}/64", "dev", "vs0", "nodad")
        else:
            sh(*nse, s, "ip", "addr", "add", f"{SERVER_IP}/24", "dev", "vs0")
        sh(*nse, s, "ip", "link", "set", "vs0", "up")
        sh(*nse, s, "ip", "link", "set", "lo", "up")
        if not self.ipv6_only:
            # Replies to 255.255.255.255 need a route; the namespace has only this link.
            sh(*nse, s, "ip", "route", "add", "default", "dev", "vs0")
        sh(*nse, c, "ip", "link", "set", "lo", "up")
        sh(*nse, c, "ip", "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        sh(*nse, c, "ip", "link", "set", "vc0", "master", "br0")
        for i in range(self.taps):
            sh(*nse, c, "ip", "tuntap", "add", f"tap{i}", "mode", "tap")
            sh(*nse, c, "ip", "link", "set", f"tap{i}", "master", "br0")
            sh(*nse, c, "ip", "link", "set", f"tap{i}", "up")
        sh(*nse, c, "ip", "link", "set", "vc0", "up")
        sh(*nse, c, "ip", "link", "set", "br0", "up")
        if self.ipv6_only:
            (self.dir / "radvd.conf").write_text(RADVD_CONF)
            self.helpers.append(spawn([*nse, s, "radvd", "-n", "-C", str(self.dir / "radvd.conf"),
                                       "-p", str(self.dir / "radvd.pid"), "-m", "stderr"],
                                      self.dir / "radvd.log"))
        else:
            self.helpers.append(spawn([*nse, s, sys.executable, "-c", RA_SENDER, "vs0"],
                                      self.dir / "ra.log"))

    # ----------------------------------------------------------------- server
    def prepare_server(self) -> None:
        from bootherd.inventory.db import make_engine, upgrade
        from bootherd.inventory.testbed import import_testbed

        files = self.dir / "www"
        (files / "node").mkdir(parents=True)
        (files / "tarballs").mkdir()
        shutil.copy(self.image.kernel, files / "node/vmlinuz")
        shutil.copy(self.image.initrd, files / "node/initrd.gz")
        shutil.copy(self.image.tarball, files / "tarballs/hello.tar.gz")
        # The TFTP root holds no x86 loader: iPXE, shim and GRUB come from their Debian
        # packages (tftp.system_loaders).  It holds the arm64 loader, and the kernels
        # too: GRUB fetches them over TFTP (Debian's signed GRUB has no HTTP).
        tftp = self.dir / "tftpboot"
        (tftp / "node").mkdir(parents=True)
        if self.arm64 is not None:
            (files / "node/arm64").mkdir()
            shutil.copy(self.arm64.kernel, files / "node/arm64/vmlinuz")
            shutil.copy(self.arm64.initrd, files / "node/arm64/initrd.gz")
            (tftp / ARM64_LOADER).parent.mkdir()
            assert self.arm64.loader is not None
            shutil.copy(self.arm64.loader, tftp / ARM64_LOADER)
        for rel in ("node/vmlinuz", "node/initrd.gz", "node/arm64/vmlinuz",
                    "node/arm64/initrd.gz"):
            if (files / rel).exists():
                (tftp / rel).parent.mkdir(exist_ok=True)
                os.link(files / rel, tftp / rel)
        engine = make_engine(self.db_url)
        upgrade(engine)
        extra = f" bootherd.server6={SERVER6}" if self.ipv6_only else ""
        import_testbed(engine, testbed_toml(list(self.nodes.values()), extra),
                       env={"BOOTHERD_LAB_BMC_PASSWORD": BMC_PASSWORD})
        engine.dispose()
        addr = SERVER6 if self.ipv6_only else SERVER_IP
        cfg = {
            "database": {"url": self.db_url},
            "server": {"name": self.ns_server, "public_address": addr},
            "log": {"level": "debug"},
            # Bound to its address plus the device, the server also hears broadcasts.
            "dhcp": {"address": SERVER_IP, "interface": "vs0", "port": 67},
            "tftp": {"address": addr, "port": 69, "root": str(tftp)},
            "bootinfo": {"address": SERVER_IP, "port": 6969},
            "tmcd": {"address": addr, "port": 7777},
            "http": {"address": addr, "port": HTTP_PORT, "root": str(files),
                     "log_dir": str(self.dir / "nodelogs"),
                     "admin_token_file": str(self.dir / "admin-token")},
            # Capture the consoles of the nodes with a BMC (serial-over-LAN).
            "console": {"enabled": True, "reconnect_max": 2.0, "rescan_interval": 5.0},
            "power": {"timeout": 15.0},
            # Reloads: multicast leaves through vs0; the imaging MFS (tests/qemu/
            # test_qemu_reload.py puts it under www/mfs) writes the VM's virtio disk.
            "imaging": {"address": SERVER_IP, "interface_address": SERVER_IP,
                        "root": str(self.dir / "images"), "mfs_kernel": "mfs/vmlinuz",
                        "mfs_initrd": "mfs/initrd.gz", "reload_disk": "/dev/vda",
                        "mfs_cmdline": "console=ttyS0 panic=-1 edd=off",
                        # TCG VMs on shared cores drop what they cannot take in at a
                        # real node's rate: 4 of them keep up with 16 Mbit/s.
                        "rate_mbps": 16.0, "gather_timeout": 90.0},
        }
        if self.ipv6_only:
            # No IPv4 anywhere: DHCPv6 on the link's All_DHCP_Servers group instead.
            cfg["dhcp"] = {"enabled": False}
            cfg["bootinfo"] = {"enabled": False}
            cfg["imaging"] = {"enabled": False}  # IPv4 multicast; no IPv4 address here
            cfg["dhcp6"] = {"enabled": True, "address": SERVER6, "interface": "vs0",
                            "port": 547}
        self.config.write_text(tomli_w.dumps(cfg))

    def start_server(self, only: list[str], timeout: float = 30.0,
                     overrides: dict[str, object] | None = None) -> None:
        """`bootherd serve` with services `only`; `overrides`: --set KEY=VALUE items."""
        self.services = only
        sets = [a for k, v in (overrides or {}).items() for a in ("--set", f"{k}={v}")]
        cmd = ["ip", "netns", "exec", self.ns_server, *bootherd_cmd(), "serve",
               "--config", str(self.config), "--only", ",".join(only), *sets]
        start = self.server_log.stat().st_size if self.server_log.exists() else 0
        self.server = spawn(cmd, self.server_log, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"bootherd serve exited with {self.server.returncode}:\n"
                                   + self.server_tail())
            with open(self.server_log, "rb") as f:  # this start's lines only
                f.seek(start)
                if b"bootherd ready" in f.read():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"bootherd serve not ready after {timeout:.0f} s:\n"
                           + self.server_tail())

    @contextlib.contextmanager
    def server_settings(self, overrides: dict[str, object]) -> Iterator[None]:
        """The server restarted with `overrides` (say, short watcher timeouts that would
        fail the other tests' slow boots), then restarted as it was."""
        assert self.server is not None
        only = self.services
        _kill(self.server, signal.SIGTERM, grace=5.0)
        self.start_server(only, overrides=overrides)
        try:
            yield
        finally:
            _kill(self.server, signal.SIGTERM, grace=5.0)
            self.start_server(only)

    @property
    def http_host(self) -> str:
        return f"[{SERVER6}]" if self.ipv6_only else SERVER_IP

    def server_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.server_log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def http_get(self, path: str, timeout: float = 5.0) -> str:
        """GET from the server's own namespace (the host cannot reach it)."""
        code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                f"{f'http://{self.http_host}:{HTTP_PORT}{path}'!r}, timeout={timeout}).read()"
                ".decode())")
        r = sh("ip", "netns", "exec", self.ns_server, sys.executable, "-c", code, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"GET {path}: {r.stderr.strip()[-300:]}")
        return r.stdout

    def gauges(self) -> dict[str, float]:
        """The server's Prometheus samples (GET /metrics) by name: unlabelled ones as
        `name`, each service's events as `bootherd_<protocol>_<event>_total`."""
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for fam in text_string_to_metric_families(self.http_get("/metrics")):
            for s in fam.samples:
                if s.name == "bootherd_events_total":
                    out[f"bootherd_{s.labels['protocol']}_{s.labels['event']}_total"] = s.value
                elif not s.labels:
                    out[s.name] = s.value
        return out

    # -------------------------------------------------------------------- VMs
    def boot(self, node_id: str, firmware: str = "bios", nic: str = "virtio",
             vars_file: Path | None = None, tap: str | None = None,
             disk: Path | None = None) -> VM:
        """Start a VM for node_id.  firmware: bios (iPXE ROM), uefi (OVMF's own PXE),
        uefi-http (OVMF's HTTP boot only), uefi-sb (OVMF with Secure Boot enforced, PXE),
        uefi-pxe6 (OVMF's PXE over IPv6), uefi-http6 (HTTP boot; over IPv6 on the IPv6 lab),
        arm64 (qemu-system-aarch64, AAVMF's PXE).  `vars_file`: the UEFI variable store
        to use (the same VM again); by default a fresh copy per VM.  `disk`: a raw file
        as the VM's virtio disk; the VM then reboots instead of exiting on a reset (a
        reload writes its disk, reboots and boots from it)."""
        node = self.nodes[node_id]
        tap = tap or self.free_taps.pop(0)
        name = f"{node_id}-{firmware}-{nic}"
        n = sum(1 for vm in self.vms if vm.name.startswith(name))
        serial = self.dir / (f"{name}.serial" if not n else f"{name}.{n}.serial")
        model = {"virtio": "virtio-net-pci", "e1000": "e1000"}[nic]
        common = ["-nographic", "-monitor", "none", "-serial", f"file:{serial}",
                  "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no"]
        if disk is None:
            common.insert(1, "-no-reboot")
        else:
            common += ["-drive", f"file={disk},format=raw,if=virtio"]
        # romfile= drops the iPXE option ROM: the firmware's own PXE must do the work.
        nic_dev = ["-device", f"{model},netdev=n0,mac={node.mac},romfile="]
        ns = ["ip", "netns", "exec", self.ns_client]
        if firmware == "arm64":
            vars_file = vars_file or self._vars_copy(name, AAVMF_VARS)
            # pauth-impdef: TCG's cheap pointer authentication (QARMA is slow to emulate).
            cmd = [*ns, "qemu-system-aarch64", "-M", "virt", "-cpu", "max,pauth-impdef=on",
                   "-accel", "tcg", "-m", "512", *common,
                   "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={AAVMF_CODE}",
                   "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}", *nic_dev]
        else:
            # GRUB needs room for the kernel it loads, and the EFI stub for decompressing it.
            mem = "512" if firmware == "uefi-sb" else "256"
            cmd = [*ns, "qemu-system-x86_64", "-accel", "tcg", "-m", mem, *common]
            if firmware == "bios":
                cmd += ["-boot", "n", "-device", f"{model},netdev=n0,mac={node.mac}"]
            elif firmware in ("uefi", "uefi-http", "uefi-sb", "uefi-pxe6", "uefi-http6"):
                sb = firmware == "uefi-sb"
                vars_file = vars_file or self._vars_copy(name, OVMF_VARS_MS if sb else OVMF_VARS)
                code = OVMF_CODE_SB if sb else OVMF_CODE
                if sb:  # the Secure Boot build keeps its variables in SMM
                    cmd += ["-machine", "q35,smm=on",
                            "-global", "driver=cfi.pflash01,property=secure,value=on"]
                cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                        "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}", *nic_dev]
                # Leave OVMF the one network boot option the test is about.
                cmd += {"uefi-pxe6": NO_PXE4, "uefi-http6": NO_PXE4 + NO_PXE6,
                        "uefi-http": NO_PXE4 + NO_PXE6}.get(firmware, NO_PXE6)
            else:
                raise ValueError(firmware)
        proc = spawn(cmd, self.dir / f"{name}.qemu.log")
        vm = VM(name, node, tap, serial, proc, vars_file=vars_file)
        self.vms.append(vm)
        threading.Thread(target=vm.watch, daemon=True, name=f"watch-{name}").start()
        return vm

    def _vars_copy(self, name: str, template: str) -> Path:
        path = self.dir / f"{name}.vars.fd"
        shutil.copy(template, path)
        return path

    def stop_vm(self, vm: VM) -> None:
        _kill(vm.proc)
        vm.done()

    def start_bmc(self, node_id: str, timeout: float = 30.0) -> Bmc:
        """ipmi_sim as node_id's BMC at BMC_IP:623 (client namespace), powered off when
        started; the one already running when a test before started it.

        Its power on runs QEMU (BIOS, iPXE ROM, on a free tap) through `startcmd`;
        QEMU's external BMC device connects back to it, so chassis off, cycle and
        reset act on the VM, and the VM's serial port is its serial-over-LAN."""
        for bmc in self.bmcs:
            if bmc.node_id == node_id and bmc.proc.poll() is None:
                return bmc
        node = self.nodes[node_id]
        tap = self.free_taps.pop(0)
        d = self.dir / f"bmc-{node_id}"
        d.mkdir()
        (d / "state").mkdir()
        vmport, solport = 9002, 9003  # loopback of the client namespace: ours alone
        qemu = ["setpriv", "--pdeathsig", "KILL", "--", "qemu-system-x86_64", "-accel", "tcg",
                "-nographic", "-m", "256", "-monitor", "none", "-name", node_id,
                "-chardev", f"socket,id=ipmi0,host=127.0.0.1,port={vmport},reconnect=2",
                "-device", "ipmi-bmc-extern,chardev=ipmi0,id=bmc0",
                "-device", "isa-ipmi-kcs,bmc=bmc0",
                # wait=on: the guest starts once the BMC holds its serial line, so
                # serial-over-LAN sees the firmware's first line, as a real UART would.
                "-serial", f"telnet:127.0.0.1:{solport},server=on,wait=on",
                "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-boot", "n", "-device", f"virtio-net-pci,netdev=n0,mac={node.mac}"]
        (d / "lan.conf").write_text(
            f'name "{node_id}"\nset_working_mc 0x20\n  startlan 1\n    addr {BMC_IP} 623\n'
            "    priv_limit admin\n    allowed_auths_admin none md2 md5 straight\n"
            "    allowed_auths_operator none md2 md5 straight\n"
            "    guid a123456789abcdefa123456789abcdef\n  endlan\n"
            f"  serial 15 127.0.0.1 {vmport} codec VM\n"
            f'  sol "telnet:127.0.0.1:{solport}" 115200\n'
            f'  startcmd "{" ".join(qemu)}"\n  startnow false\n  poweroff_wait 10\n'
            f'  kill_wait 5\n  user 2 true "{BMC_USER}" "{BMC_PASSWORD}" admin 10 '
            "none md2 md5 straight\n")
        (d / "bmc.emu").write_text("mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 "
                                   "0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n")
        nse = ("ip", "netns", "exec", self.ns_client)
        if not self.bmcs:
            sh(*nse, "ip", "addr", "add", f"{BMC_IP}/24", "dev", "br0")
        proc = spawn([*nse, "ipmi_sim", "-c", str(d / "lan.conf"), "-f", str(d / "bmc.emu"),
                      "-s", str(d / "state"), "-n"], d / "ipmi_sim.log", cwd=d)
        bmc = Bmc(node_id, node.mac, d, proc)
        self.bmcs.append(bmc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("ipmi_sim exited:\n" + (d / "ipmi_sim.log").read_text())
            r = sh(*nse, "ipmitool", "-I", "lanplus", "-H", BMC_IP, "-U", BMC_USER, "-P",
                   BMC_PASSWORD, "-C", "3", "-N", "1", "-R", "1", "chassis", "power", "status",
                   check=False)
            if r.returncode == 0:
                return bmc
            time.sleep(0.5)
        raise RuntimeError(f"ipmi_sim for {node_id} did not answer in {timeout:.0f} s")

    # ---------------------------------------------------------------- cleanup
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for vm in self.vms:
            _kill(vm.proc)
        for bmc in self.bmcs:
            _kill(bmc.proc)  # its QEMU dies with it (setpriv --pdeathsig)
            for pid in bmc.vm_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.server is not None:
            _kill(self.server, signal.SIGTERM, grace=5.0)
        for p in self.helpers:
            _kill(p)
        for ns in (self.ns_client, self.ns_server):
            sh("ip", "netns", "del", ns, check=False)
        atexit.unregister(self.close)


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, grace: float = 0.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(grace or 5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5.0)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    """`python tests/qemu/vmenv.py [bios|uefi] [virtio|e1000]`: one boot by hand, then clean up."""
    import tempfile

    import nodeimage

    firmware = argv[0] if argv else "bios"
    nic = argv[1] if len(argv) > 1 else "virtio"
    why = nodeimage.ensure_host_packages()
    if why:
        print(why, file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="bootherd-qemu-"))
    lab = Lab(nodeimage.build(), workdir, node_specs(1), taps=1)
    try:
        lab.create_network()
        lab.prepare_server()
        from bootherd.service import available

        lab.start_server(available())
        vm = lab.boot("qemu1", firmware, nic)
        vm.wait(180)
        print(vm.tail(30))
        print(f"\n{vm.name}: {'ISUP' if vm.booted else 'NOT UP'}  {vm.timeline()}")
        print(f"files in {workdir}")
        return 0 if vm.booted else 1
    finally:
        lab.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main(sys.argv[1:]))

"""The node image for the QEMU tests: a Debian kernel plus a busybox initramfs.

Everything is built from Debian packages on first use and cached under
CACHE (default /var/cache/bootherd-test/qemu, outside the repository; set
BOOTHERD_QEMU_CACHE to move it).  A missing host package is installed with
apt-get (the suite runs as root), a missing kernel is fetched with
`apt-get download` and unpacked with dpkg, never assumed.

The kernel is Debian's generic one, not `-cloud`: the cloud flavour has no
e1000 driver at all, and the BIOS test boots an e1000 NIC too.  Only the NIC
drivers are taken from its modules and loaded by /init with insmod.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("BOOTHERD_QEMU_CACHE", "/var/cache/bootherd-test")) / "qemu"
# Pinned for reproducible runs; the current version of linux-image-amd64 is the fallback
# when the archive no longer carries this one.
KERNEL_PACKAGE = os.environ.get("BOOTHERD_QEMU_KERNEL", "linux-image-6.1.0-47-amd64")
# The arm64 node: Debian's arm64 kernel of the same version, static busybox and the signed
# GRUB network image (the arm64 loader), fetched with multiarch (`apt-get download
# PKG:arm64`, after `dpkg --add-architecture arm64` if apt does not know arm64 yet).
ARM64_KERNEL_PACKAGE = KERNEL_PACKAGE.replace("-amd64", "-arm64")
ARM64_BUSYBOX_PACKAGE = "busybox-static"
ARM64_GRUB_PACKAGE = "grub-efi-arm64-signed"
ARM64_GRUB = "usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed"

# file that must exist -> Debian package that ships it
HOST_FILES = {
    "/usr/bin/qemu-system-x86_64": "qemu-system-x86",
    "/usr/lib/ipxe/qemu/efi-virtio.rom": "ipxe-qemu",
    "/usr/lib/ipxe/qemu/efi-e1000.rom": "ipxe-qemu",
    "/usr/lib/ipxe/snponly.efi": "ipxe",
    "/usr/lib/ipxe/ipxe.efi": "ipxe",
    "/usr/share/OVMF/OVMF_CODE_4M.fd": "ovmf",
    "/usr/share/OVMF/OVMF_VARS_4M.fd": "ovmf",
    "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd": "ovmf",
    "/usr/share/OVMF/OVMF_VARS_4M.ms.fd": "ovmf",
    "/usr/lib/shim/shimx64.efi.signed": "shim-signed",
    "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed": "grub-efi-amd64-signed",
    "/usr/bin/qemu-system-aarch64": "qemu-system-arm",
    "/usr/share/AAVMF/AAVMF_CODE.fd": "qemu-efi-aarch64",
    "/usr/share/AAVMF/AAVMF_VARS.fd": "qemu-efi-aarch64",
    "/usr/sbin/radvd": "radvd",
    "/usr/bin/busybox": "busybox-static",
    "/usr/bin/dpkg-deb": "dpkg",
    "/usr/sbin/ip": "iproute2",
    "/usr/bin/ipmi_sim": "openipmi",
    "/usr/bin/ipmitool": "ipmitool",
}

# Loaded in this order (no modules.dep in the initramfs): virtio core first.
MODULES = [
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/net/ethernet/intel/e1000/e1000.ko",
]
# Debian's arm64 kernel has the virtio core built in.
ARM64_MODULES = [
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
]

HTTP_PORT = 80  # the lab's (vmenv.HTTP_PORT): GRUB 2.06 speaks HTTP to port 80 only
MARKER_OK = "BOOTHERD-NODE-ISUP"
MARKER_FAIL = "BOOTHERD-NODE-FAILED"

# udhcpc calls this with the lease in its environment (busybox: $mask is the prefix length).
UDHCPC_HOOK = r"""#!/bin/sh
case "$1" in
deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then ip route add default via "${router%% *}" dev "$interface"; fi
    {
        echo "IP=$ip"
        echo "SIADDR=$siaddr"
        echo "SERVERID=$serverid"
    } > /tmp/dhcp.env
    ;;
esac
exit 0
"""

# Everything a booted testbed node does before it is up; runs with its output
# teed into the boot log, leaves its findings in /tmp/result.
STAGE = r"""#!/bin/sh
result() { echo "$1=\"$2\"" >> /tmp/result; }
fail() { echo "node: FAILED: $*"; result REASON "$*"; exit 1; }

echo "node: kernel $(uname -r), cmdline: $(cat /proc/cmdline)"
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" 2>/dev/null; done
ip link set lo up
IF=""
for i in $(seq 1 100); do
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] && continue
        IF=$n
        break
    done
    [ -n "$IF" ] && break
    sleep 0.1
done
[ -n "$IF" ] || fail "no network interface (driver missing?)"
echo "node: interface $IF mac $(cat /sys/class/net/$IF/address)"

SERVER6=$(sed -n 's/.*bootherd.server6=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$SERVER6" ]; then
    # IPv6-only network: the address from the router advertisement's prefix (the
    # inventory's ip6, which DHCPv6 gave the firmware too); busybox has no DHCPv6 client.
    echo 0 > "/proc/sys/net/ipv6/conf/$IF/accept_dad"
    ip link set "$IF" up
    IP=""
    for i in $(seq 1 150); do
        IP=$(ip -6 addr show dev "$IF" scope global | sed -n 's/.*inet6 \([^/]*\).*/\1/p' | head -n 1)
        [ -n "$IP" ] && break
        sleep 0.1
    done
    [ -n "$IP" ] || fail "no IPv6 address (no router advertisement)"
    SERVER=$SERVER6
else
    udhcpc -i "$IF" -f -q -n -t 10 -T 2 -s /etc/udhcpc.sh || fail "no DHCP lease"
    . /tmp/dhcp.env
    SERVER=$SIADDR
    if [ -z "$SERVER" ] || [ "$SERVER" = 0.0.0.0 ]; then SERVER=$SERVERID; fi
fi
echo "node: control address $IP, boot server $SERVER"
result SERVER "$SERVER"

tmcc() { printf 'VERSION=40 %s \n' "$*" | nc "$SERVER" 7777; }
STATUS=$(tmcc status)
echo "node: tmcd status: $STATUS"
case "$STATUS" in
ALLOCATED=*) ;;
*) fail "tmcd status is not ALLOCATED: '$STATUS'" ;;
esac
NAME=${STATUS#*NICKNAME=}
NAME=${NAME%% *}
result NAME "$NAME"

tmcc fullconfig > /tmp/fullconfig
[ -s /tmp/fullconfig ] || fail "empty fullconfig"
echo "node: fullconfig $(wc -l < /tmp/fullconfig) lines, $(grep -c '^ADDUSER' /tmp/fullconfig) accounts"
tmcc state TBSETUP
echo "node: state TBSETUP sent"

LINE=$(grep 'TARBALL=' /tmp/fullconfig | head -n 1)
[ -n "$LINE" ] || fail "no tarball in fullconfig"
echo "node: tarball line: $LINE"
field() { echo "$LINE" | tr ' ' '\n' | sed -n "s/^$1=//p" | tr -d "'\""; }
[ "$(field USEWEB)" = 1 ] || fail "tarball not USEWEB=1: $LINE"
# Emulab's install-tarfile way: the web path with the node's id and key hash.
NODEID=$(sed -n '/^\*\*\* nodeid$/{n;p;q}' /tmp/fullconfig)
KEY=$(sed -n "s/^KEYHASH HASH='\(.*\)'$/\1/p" /tmp/fullconfig)
[ -n "$NODEID" ] && [ -n "$KEY" ] || fail "no nodeid or keyhash in fullconfig"
HOST=$(field SERVER)
case "$HOST" in *:*) HOST="[$HOST]" ;; esac  # an IPv6 address in a URL
HTTP="$HOST:@@HTTP_PORT@@"
TARBALL=$(field TARBALL)
DIR=$(field DIR)
result HTTP "$HTTP"
URL="http://$HTTP/spewrpmtar.php3?nodeid=$NODEID&file=$TARBALL&key=$KEY"
SUM=$(wget -q -O - "http://$HTTP/files/${TARBALL#/}?sha256" | cut -d ' ' -f 1)
echo "node: sha256 from the file endpoint: $SUM"
[ -n "$SUM" ] || fail "no sha256 for $TARBALL"
wget -q -O /tmp/tarball "$URL" || fail "download $URL failed"
echo "$SUM  /tmp/tarball" | sha256sum -c || fail "sha256 mismatch for $TARBALL"
echo "node: sha256 ok for $TARBALL"
mkdir -p "/tmp/root$DIR"
tar -xzf /tmp/tarball -C "/tmp/root$DIR" || fail "cannot unpack $TARBALL"
echo "node: unpacked into $DIR: $(cat /tmp/root$DIR/hello.txt)"
result OK 1
""".replace("@@HTTP_PORT@@", str(HTTP_PORT))

INIT = r"""#!/bin/sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
: > /tmp/result
sh /stage.sh 2>&1 | tee /tmp/boot.log
OK=0; SERVER=""; HTTP=""; NAME=""; REASON="stage script died"
. /tmp/result
if [ -n "$HTTP" ]; then
    if wget -q -O /tmp/upload.out --post-file=/tmp/boot.log "http://$HTTP/logs"; then
        echo "node: boot log uploaded: $(cat /tmp/upload.out)"
    else
        OK=0; REASON="log upload to http://$HTTP/logs failed"
    fi
fi
if [ "$OK" = 1 ]; then
    printf 'VERSION=40 state ISUP \n' | nc "$SERVER" 7777
    echo "@@MARKER_OK@@ name=$NAME"
    if grep -q bootherd.stayup /proc/cmdline; then
        # Up like a real node: powered off by its BMC, not by itself.
        echo "node: staying up"
        while :; do sleep 3600; done
    fi
else
    echo "@@MARKER_FAIL@@ $REASON"
fi
sync
poweroff -f
""".replace("@@MARKER_OK@@", MARKER_OK).replace("@@MARKER_FAIL@@", MARKER_FAIL)


@dataclass(frozen=True)
class NodeImage:
    kernel: Path
    initrd: Path
    tarball: Path
    kernel_package: str
    loader: Path | None = None  # arm64: the signed GRUB network image


def missing_host_packages() -> list[str]:
    pkgs = {pkg for f, pkg in HOST_FILES.items() if not Path(f).exists()}
    bb = Path("/usr/bin/busybox")
    if bb.exists() and b"/lib64/ld-linux" in bb.read_bytes()[:8192]:
        pkgs.add("busybox-static")  # the dynamic busybox cannot run in an initramfs
    return sorted(pkgs)


def ensure_host_packages() -> str | None:
    """Install what is missing; None when done, else why not."""
    missing = missing_host_packages()
    if not missing:
        return None
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    still = missing_host_packages()
    if still:
        return f"Debian packages missing and could not be installed: {' '.join(still)} " \
               f"({r.stderr.strip().splitlines()[-1:]})"
    return None


def _apt_candidate(pkg: str) -> bool:
    r = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True)
    return "Candidate:" in r.stdout and "Candidate: (none)" not in r.stdout


def _current_kernel_package() -> str | None:
    r = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                       text=True)
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split()[1]
    return None


def _fetch_kernel_deb(dest: Path) -> tuple[Path, str]:
    """The kernel .deb in dest (downloaded once); returns (deb, package)."""
    dest.mkdir(parents=True, exist_ok=True)
    for pkg in (KERNEL_PACKAGE, None):
        name = pkg or _current_kernel_package()
        if not name:
            continue
        have = sorted(dest.glob(f"{name}_*.deb"))
        if have:
            return have[-1], name
        if not _apt_candidate(name):
            subprocess.run(["apt-get", "update"], capture_output=True)
        if not _apt_candidate(name):
            continue
        # apt drops to user _apt for downloads; it cannot write a root-only cache.
        r = subprocess.run(["apt-get", "download", name], cwd=dest, capture_output=True,
                           text=True)
        have = sorted(dest.glob(f"{name}_*.deb"))
        if have:
            return have[-1], name
        raise RuntimeError(f"apt-get download {name} failed: {r.stderr.strip()[-300:]}")
    raise RuntimeError(f"no kernel package: neither {KERNEL_PACKAGE} nor linux-image-amd64's "
                       "dependency has an apt candidate")


def _cpio(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc cpio archive of (name, mode, data, (rdev major, minor))."""
    out = io.BytesIO()

    def put(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.write(nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for i, (name, mode, data, rdev) in enumerate(entries, 1):
        put(i, name, mode, data, rdev)
    put(0, "TRAILER!!!", 0, b"", (0, 0))
    return out.getvalue()


def _initramfs(modules: dict[str, bytes], busybox: bytes) -> bytes:
    d, f, x, link = 0o040755, 0o100644, 0o100755, 0o120777
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (p, d, b"", (0, 0)) for p in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys",
                                      "tmp", "sbin", "usr", "usr/bin", "usr/sbin")]
    # The kernel opens /dev/console before /init runs; without it /init has no output.
    entries.append(("dev/console", 0o020600, b"", (5, 1)))
    entries.append(("bin/busybox", x, busybox, (0, 0)))
    entries.append(("bin/sh", link, b"busybox", (0, 0)))
    entries.append(("init", x, INIT.encode(), (0, 0)))
    entries.append(("stage.sh", x, STAGE.encode(), (0, 0)))
    entries.append(("etc/udhcpc.sh", x, UDHCPC_HOOK.encode(), (0, 0)))
    order = []
    for rel, data in modules.items():
        name = Path(rel).name
        order.append(name)
        entries.append((f"lib/modules/{name}", f, data, (0, 0)))
    entries.append(("lib/modules/order", f, ("\n".join(order) + "\n").encode(), (0, 0)))
    return gzip.compress(_cpio(entries), compresslevel=6, mtime=0)


def _hello_tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        data = b"hello from bootherd\n"
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime = len(data), 0
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _unpack(deb: Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """Stream a package's file tree (dpkg-deb --fsys-tarfile) keeping only `wanted`
    (key -> path inside the package, or a "prefix*" for the first match)."""
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=dpkg.stdout, mode="r|") as t:
        for m in t:
            name = m.name.lstrip("./")
            for key, want in wanted.items():
                hit = name.startswith(want[:-1]) if want.endswith("*") else name == want
                if hit and m.isfile() and key not in found:
                    found[key] = t.extractfile(m).read()  # type: ignore[union-attr]
    dpkg.wait()
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise RuntimeError(f"{deb.name}: missing {', '.join(wanted[k] for k in missing)}")
    return found


def _image(out: Path, cache: Path, deb: Path, modules: list[str], busybox: bytes,
           extra: dict[str, bytes] | None = None) -> None:
    """Write vmlinuz, initrd.gz, hello.tar.gz (and `extra` files) into `out`, atomically."""
    work = cache / f"tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        ver = deb.name.split("_")[0].removeprefix("linux-image-")
        files = _unpack(deb, {"vmlinuz": "boot/vmlinuz-*",
                              **{m: f"lib/modules/{ver}/{m}" for m in modules}})
        (work / "vmlinuz").write_bytes(files["vmlinuz"])
        (work / "initrd.gz").write_bytes(_initramfs({m: files[m] for m in modules}, busybox))
        (work / "hello.tar.gz").write_bytes(_hello_tarball())
        for name, data in (extra or {}).items():
            (work / name).write_bytes(data)
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build(cache: Path = CACHE) -> NodeImage:
    """Build (or reuse) kernel, initramfs and test tarball; safe across processes."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        deb, pkg = _fetch_kernel_deb(cache / "deb")
        busybox = Path("/usr/bin/busybox").read_bytes()
        recipe = hashlib.sha256((INIT + STAGE + UDHCPC_HOOK + deb.name + "".join(MODULES))
                                .encode() + busybox).hexdigest()[:16]
        out = cache / f"node-{recipe}"
        img = NodeImage(out / "vmlinuz", out / "initrd.gz", out / "hello.tar.gz", pkg)
        if not img.initrd.exists():
            _image(out, cache, deb, MODULES, busybox)
        return img


def _multiarch_download(pkg: str, arch: str, dest: Path) -> Path:
    """`apt-get download pkg:arch` into dest (once); adds the architecture to dpkg and
    updates apt's lists when apt does not know the package for it yet."""
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob(f"{pkg}_*_{arch}.deb"))
    if have:
        return have[-1]
    name = f"{pkg}:{arch}"
    if not _apt_candidate(name):
        if arch not in subprocess.run(["dpkg", "--print-foreign-architectures"],
                                      capture_output=True, text=True).stdout.split():
            subprocess.run(["dpkg", "--add-architecture", arch], check=True)
        subprocess.run(["apt-get", "update"], capture_output=True)
    r = subprocess.run(["apt-get", "download", name], cwd=dest, capture_output=True, text=True)
    have = sorted(dest.glob(f"{pkg}_*_{arch}.deb"))
    if not have:
        raise RuntimeError(f"apt-get download {name} failed: {r.stderr.strip()[-300:]}")
    return have[-1]


def build_arm64(cache: Path = CACHE) -> NodeImage:
    """The arm64 node: Debian's arm64 kernel, an initramfs with arm64 busybox and the
    same /init, and `loader` = Debian's signed arm64 GRUB network image."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        debs = cache / "deb-arm64"
        kdeb = _multiarch_download(ARM64_KERNEL_PACKAGE, "arm64", debs)
        bdeb = _multiarch_download(ARM64_BUSYBOX_PACKAGE, "arm64", debs)
        gdeb = _multiarch_download(ARM64_GRUB_PACKAGE, "arm64", debs)
        recipe = hashlib.sha256((INIT + STAGE + UDHCPC_HOOK + kdeb.name + bdeb.name + gdeb.name
                                 + "".join(ARM64_MODULES)).encode()).hexdigest()[:16]
        out = cache / f"node-arm64-{recipe}"
        img = NodeImage(out / "vmlinuz", out / "initrd.gz", out / "hello.tar.gz",
                        ARM64_KERNEL_PACKAGE, out / "grubnetaa64.efi")
        if not img.initrd.exists():
            busybox = _unpack(bdeb, {"busybox": "bin/busybox"})["busybox"]
            grub = _unpack(gdeb, {"grub": ARM64_GRUB})["grub"]
            _image(out, cache, kdeb, ARM64_MODULES, busybox, {"grubnetaa64.efi": grub})
        return img

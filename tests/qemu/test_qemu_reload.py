"""The reload cycle with real firmware (issue 20): `bootherd node reload` makes a VM
with a blank virtual disk boot the imaging MFS (iPXE, the coordinator's answer), whose
static bhimg-recv writes the disk from the multicast session on the lab's bridge and
reports it; the VM reboots, iPXE boots that disk (sanboot), SYSLINUX starts the test
kernel from it and the node reaches ISUP.  Then four VMs reloaded with one command
share one session: the server sends about one image, not four.

The bootable disk is built here from Debian packages: a FAT file system made by
mkfs.vfat (dosfstools), SYSLINUX installed into it with `syslinux --install`
(syslinux, mtools: no mount needed), the lab's kernel and node initramfs copied in with
mcopy.  The MFS is the lab's Debian kernel with a busybox initramfs holding
bhimg-recv (compiled statically from src/bootherd/imaging/client) and virtio_blk.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
from pathlib import Path

import nodeimage
import pytest
import vmenv
from bootcheck import BOOT_TIMEOUT, RELOAD_MANY, RELOAD_NODE, boot_report, check_booted

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
IMAGE = "qemu-disk"
DISK_MIB = 48
RELOAD_TIMEOUT = 2 * BOOT_TIMEOUT + 120  # MFS boot, the write, the second boot
DISK_PACKAGES = {"/usr/bin/syslinux": "syslinux",
                 "/usr/lib/syslinux/modules/bios/ldlinux.c32": "syslinux-common",
                 "/usr/bin/mcopy": "mtools", "/usr/sbin/mkfs.vfat": "dosfstools"}
VIRTIO_BLK = "kernel/drivers/block/virtio_blk.ko"
SYSLINUX_CFG = """SERIAL 0 115200
DEFAULT node
PROMPT 0
TIMEOUT 0
LABEL node
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0 panic=-1 edd=off
"""
MFS_INIT = r"""#!/bin/sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" 2>/dev/null; done
arg() { sed -n "s/.*bootherd\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
IMAGE=$(arg image); IMAGING=$(arg imaging); HTTP=$(arg http); DISK=$(arg disk)
echo "mfs: image $IMAGE from $IMAGING onto $DISK"
ip link set lo up
IF=""
for i in $(seq 1 100); do
    for d in /sys/class/net/*; do [ "${d##*/}" = lo ] || IF=${d##*/}; done
    [ -n "$IF" ] && [ -b "$DISK" ] && break
    sleep 0.1
done
udhcpc -i "$IF" -f -q -n -t 10 -T 2 -s /etc/udhcpc.sh || { echo "mfs: no lease"; poweroff -f; }
. /tmp/dhcp.env
ip route add 224.0.0.0/4 dev "$IF" 2>/dev/null
HP=${HTTP#http://}
/bin/bhimg-recv --server "${IMAGING%:*}" --port "${IMAGING##*:}" --http-port "${HP##*:}" \
    --image "$IMAGE" -o "$DISK" --interface-address "$IP" --quiet \
    --report "$HTTP/images/$IMAGE/progress"
RC=$?
sync
if [ "$RC" = 0 ]; then echo "BOOTHERD-MFS-WRITTEN"; reboot -f; fi
echo "BOOTHERD-MFS-FAILED rc=$RC"
poweroff -f
"""


def _need_packages() -> None:
    missing = sorted({pkg for f, pkg in DISK_PACKAGES.items() if not Path(f).exists()})
    if missing:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                       capture_output=True)
    still = sorted({pkg for f, pkg in DISK_PACKAGES.items() if not Path(f).exists()})
    if still:
        pytest.skip(f"Debian packages missing and could not be installed: {' '.join(still)}")


def _bootable_disk(out: Path, image: nodeimage.NodeImage) -> Path:
    """A superfloppy FAT disk whose boot sector is SYSLINUX's, booting the lab's node."""
    sh = vmenv.sh
    sh("mkfs.vfat", "-C", "-n", "BHDISK", str(out), str(DISK_MIB * 1024))
    sh("syslinux", "--install", str(out))
    cfg = out.with_name("syslinux.cfg")
    cfg.write_text(SYSLINUX_CFG)
    sh("mcopy", "-i", str(out), str(image.kernel), "::vmlinuz")
    sh("mcopy", "-i", str(out), str(image.initrd), "::initrd.gz")
    sh("mcopy", "-i", str(out), str(cfg), "::syslinux.cfg")
    return out


def _mfs_initrd(out: Path, client: Path) -> None:
    deb = sorted((nodeimage.CACHE / "deb").glob(f"{nodeimage.KERNEL_PACKAGE}_*.deb")) \
        or sorted((nodeimage.CACHE / "deb").glob("linux-image-*.deb"))
    ver = deb[-1].name.split("_")[0].removeprefix("linux-image-")
    mods = [*nodeimage.MODULES, VIRTIO_BLK]
    files = nodeimage._unpack(deb[-1], {m: f"lib/modules/{ver}/{m}" for m in mods})
    d, f, x, link = 0o040755, 0o100644, 0o100755, 0o120777
    entries = [(p, d, b"", (0, 0)) for p in ("bin", "dev", "etc", "lib", "lib/modules", "proc",
                                             "sys", "tmp", "sbin", "usr", "usr/bin", "usr/sbin")]
    entries += [("dev/console", 0o020600, b"", (5, 1)),
                ("bin/busybox", x, Path("/usr/bin/busybox").read_bytes(), (0, 0)),
                ("bin/sh", link, b"busybox", (0, 0)),
                ("bin/bhimg-recv", x, client.read_bytes(), (0, 0)),
                ("init", x, MFS_INIT.encode(), (0, 0)),
                ("etc/udhcpc.sh", x, nodeimage.UDHCPC_HOOK.encode(), (0, 0))]
    entries += [(f"lib/modules/{Path(m).name}", f, files[m], (0, 0)) for m in mods]
    order = "\n".join(Path(m).name for m in mods) + "\n"
    entries.append(("lib/modules/order", f, order.encode(), (0, 0)))
    import gzip

    out.write_bytes(gzip.compress(nodeimage._cpio(entries), compresslevel=6, mtime=0))


@pytest.fixture(scope="module")
def reload_lab(lab):  # noqa: ANN001, ANN201
    """The session's lab with the imaging MFS in its files and IMAGE in its catalog."""
    lab.need("dhcp", "http", "tmcd", "imaging")
    _need_packages()
    if shutil.which("gcc") is None or not Path("/usr/include/zstd.h").exists():
        pytest.skip("gcc or libzstd-dev not installed (scripts/setup.sh installs them)")
    L = lab.lab
    work = L.dir / "reload"
    work.mkdir()
    client = work / "bhimg-recv"
    r = subprocess.run(["gcc", "-O2", "-static", "-o", str(client),
                        str(REPO / "src/bootherd/imaging/client/bhimg-recv.c"), "-lzstd", "-lm"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mfs = L.dir / "www" / "mfs"
    mfs.mkdir()
    shutil.copy(L.image.kernel, mfs / "vmlinuz")
    _mfs_initrd(mfs / "initrd.gz", client)
    disk = _bootable_disk(work / "source.raw", L.image)
    r = subprocess.run([*vmenv.bootherd_cmd(), "image", "create", str(disk), "-o", IMAGE,
                        "--config", str(L.config)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return lab, hashlib.sha256(disk.read_bytes()).hexdigest(), disk.stat().st_size


def _reload(L: vmenv.Lab, nodes: list[str]) -> list[dict]:
    """`bootherd node reload` in the server's namespace (it talks to the server's API)."""
    import json

    r = subprocess.run(["ip", "netns", "exec", L.ns_server, *vmenv.bootherd_cmd(), "node",
                        "reload", *nodes, "--image", IMAGE, "--json", "--config", str(L.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)["results"]


def _imaging_counters(L: vmenv.Lab) -> dict[str, float]:
    out = {}
    for m in re.finditer(r'^bootherd_events_total\{event="(\w+)",protocol="imaging"\} (\S+)$',
                         L.http_get("/metrics"), re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def _blank(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK_MIB << 20)
    return path


def _check_reloaded(L: vmenv.Lab, vm: vmenv.VM, disk: Path, want_sha: str) -> None:
    states = check_booted(L, vm, timeout=RELOAD_TIMEOUT,
                          via=["RELOADSETUP", "PXEBOOTING", "RELOADING", "RELOADDONE",
                               "PXEBOOTING", "BOOTING", "TBSETUP", "ISUP"])
    out = vm.output()
    assert "BOOTHERD-MFS-WRITTEN" in out, boot_report(L, vm)
    # SYSLINUX on the written disk started the kernel: the second boot is the disk's.
    assert out.index("BOOTHERD-MFS-WRITTEN") < out.rindex("Linux version"), boot_report(L, vm)
    assert "SYSLINUX" in out[out.index("BOOTHERD-MFS-WRITTEN"):], boot_report(L, vm)
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == want_sha
    assert states.count("RELOADDONE") == 1


def test_qemu_reload_writes_a_blank_disk_over_multicast_and_the_vm_boots_it(reload_lab) -> None:
    lab, sha, _ = reload_lab
    L = lab.lab
    before = _imaging_counters(L)
    (res,) = _reload(L, [RELOAD_NODE])
    # No BMC for this node: it is written at its next network boot, which is now.
    assert res["ok"] and "power cycle" in res["result"], res
    disk = _blank(L.dir / f"{RELOAD_NODE}.disk")
    vm = L.boot(RELOAD_NODE, firmware="bios", nic="virtio", disk=disk)
    _check_reloaded(L, vm, disk, sha)
    after = _imaging_counters(L)
    assert after.get("sessions_started", 0) - before.get("sessions_started", 0) == 1


def test_qemu_four_vms_reloaded_at_once_share_one_session_of_one_image(reload_lab) -> None:
    lab, sha, _ = reload_lab
    L = lab.lab
    before = _imaging_counters(L)
    results = _reload(L, RELOAD_MANY)
    assert [r["ok"] for r in results] == [True] * 4, results
    vms, disks = [], []
    for n in RELOAD_MANY:
        disks.append(_blank(L.dir / f"{n}.disk"))
        vms.append(L.boot(n, firmware="bios", nic="virtio", disk=disks[-1]))
        time.sleep(2)  # they boot a few seconds apart, as racks do
    for vm, disk in zip(vms, disks, strict=True):
        _check_reloaded(L, vm, disk, sha)
    after = _imaging_counters(L)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    from bootherd.imaging.format import read_header

    h = read_header(L.dir / "images" / f"{IMAGE}.bhimg")
    ratio = d["data_bytes"] / h.data_size
    stats = [ln for vm in vms for ln in vm.output().splitlines() if ln.startswith('{"ok"')]
    print(f"four VMs: one session, server sent {d['data_bytes'] / 1e6:.1f} MB for a "
          f"{h.data_size / 1e6:.1f} MB image ({ratio:.3f} x), {int(d.get('joins_held', 0))} "
          "JOINs held while the session gathered them; receivers:\n" + "\n".join(stats))
    assert d["sessions_started"] == 1
    assert ratio < 1.25, (d, stats)  # about one image, not four

#!/usr/bin/env bash
# Everything the demo and the tests need on a fresh Debian machine with Python 3.11:
# Debian packages (when run as root), a running PostgreSQL for the multi-server
# tests, and the virtual environment with bootherd installed in it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

# Test clients and peers (real software from elsewhere, not bootherd's own).  busybox-static
# provides /bin/busybox (it conflicts with the busybox package).  gcc, libc6-dev and
# python3-dev build the native sending thread (src/bootherd/_udpsend.c); openssl makes
# the TMCD TLS tests' certificates, wget is what Emulab's install-tarfile fetches with;
# openipmi (ipmi_sim) is the real BMC of the power tests, ipmitool the IPMI driver's fallback;
# shim-signed and grub-efi-amd64-signed: the Secure Boot chain; qemu-system-arm,
# qemu-efi-aarch64: the arm64 VM (its arm64 packages are fetched by the QEMU lab with
# multiarch, tests/qemu/nodeimage.py); radvd, kea-dhcp6-server: IPv6 router advertisements
# and the DHCPv6 peer.  Imaging: libzstd-dev for the static MFS client, e2fsprogs
# (mkfs.ext4 -d, dumpe2fs, e2fsck, debugfs), qemu-utils (qcow2 sources), nftables
# (per-receiver loss in tests), and the multicast peers of bench/imaging (udpcast, uftp);
# syslinux, syslinux-common, mtools, dosfstools: the QEMU reload test's bootable disk.
# chromium and chromium-driver run the web console's browser tests (Selenium drives them).
DEB_PACKAGES="gcc libc6-dev python3-dev postgresql dnsmasq kea-dhcp4-server kea-admin tftp-hpa atftp atftpd
isc-dhcp-client udhcpc busybox-static dhcpcd-base iproute2 cpio curl netcat-openbsd
nginx-light qemu-system-x86 ipxe-qemu ipxe ovmf procps openssl wget openipmi ipmitool
shim-signed grub-efi-amd64-signed qemu-system-arm qemu-efi-aarch64 radvd kea-dhcp6-server
libzstd-dev zstd e2fsprogs qemu-utils nftables udpcast uftp
chromium chromium-driver"

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for p in $DEB_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  # Installing a service starts no daemon here; make sure PostgreSQL runs.
  if command -v pg_lsclusters >/dev/null; then
    if ! pg_lsclusters -h | grep -q online; then
      ver=$(pg_lsclusters -h | awk 'NR==1{print $1}')
      name=$(pg_lsclusters -h | awk 'NR==1{print $2}')
      if [ -z "$ver" ]; then
        ver=$(ls /usr/lib/postgresql | sort -n | tail -1); name=main
        pg_createcluster "$ver" "$name" >/dev/null
      fi
      # After an unclean stop (a stale pid file, crash recovery) pg_ctlcluster can
      # report failure for a server that comes up; what counts is whether it answers.
      pg_ctlcluster "$ver" "$name" start || true
      for _ in $(seq 60); do pg_isready -q && break; sleep 1; done
      pg_isready -q || { echo "setup: PostgreSQL $ver/$name did not start (see /var/log/postgresql)" >&2; exit 1; }
    fi
    su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='bootherd'\"" | grep -q 1 \
      || su postgres -c "psql -qc \"CREATE ROLE bootherd LOGIN PASSWORD 'bootherd' CREATEDB\""
    # Tests drop their databases WITH (FORCE), which must end autovacuum workers too.
    su postgres -c "psql -qc \"GRANT pg_signal_backend TO bootherd\"" >/dev/null
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.bootherd-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ -n "$(find src/bootherd -maxdepth 1 -name "_*.[ch]" -newer "$stamp")" ]; then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/pip" install -q -e ".[test]"
  touch "$stamp"
fi

"""Fixtures for the real-firmware tests: one lab (namespaces + `bootherd serve`) per session.

Skips, with the reason, when not root, when a Debian package cannot be
installed, or when a server part the boot needs is not in this build.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import nodeimage  # noqa: E402
import vmenv  # noqa: E402
from bootcheck import BMC_NODE, NODE_COUNT, NODE_OSES, NODE_TYPES, WAIT_NODE  # noqa: E402

# Services the boot chain needs, and what each is for (named in skip reasons).
NEEDED = {"dhcp": "DHCP (bootherd.dhcp.service)", "tmcd": "TMCD (bootherd.tmcd.service)",
          "http": "HTTP /ipxe, /files, /logs (bootherd.web.service)"}


def _available_services() -> tuple[list[str], str]:
    code = "from bootherd.service import available; print(','.join(available()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return [], r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "import failed"
    return [s for s in r.stdout.strip().split(",") if s], ""


class LabInfo:
    def __init__(self, lab: vmenv.Lab, services: list[str]):
        self.lab = lab
        self.services = services

    def need(self, *names: str) -> None:
        from bootherd.service import SERVICES

        missing = [n for n in names if n not in self.services]
        if missing:
            mods = ", ".join(SERVICES.get(n, n) for n in missing)
            pytest.skip(f"bootherd serve has no {', '.join(missing)} service in this build "
                        f"({mods} missing); it runs: {', '.join(self.services)}")


def _prerequisites() -> list[str]:
    """The services this build runs; skips (with the reason) when a boot cannot work."""
    if os.geteuid() != 0:
        pytest.skip("QEMU boot tests need root (network namespaces, tap devices, apt-get)")
    why = nodeimage.ensure_host_packages()
    if why:
        pytest.skip(why)
    services, err = _available_services()
    if err:
        pytest.skip(f"bootherd services do not import: {err}")
    missing = [f"{n}: {what}" for n, what in NEEDED.items() if n not in services]
    if missing:
        pytest.skip("server parts missing for a network boot: " + "; ".join(missing))
    return services


@contextlib.contextmanager
def _running(lab: vmenv.Lab, services: list[str]) -> Iterator[LabInfo]:
    try:
        lab.create_network()
        lab.prepare_server()
        lab.start_server(services)
        script = lab.http_get("/ipxe")
        if not script.startswith("#!ipxe"):
            pytest.skip(f"GET /ipxe does not return an iPXE script: {script[:200]!r}")
        yield LabInfo(lab, services)
    finally:
        lab.close()
        if os.environ.get("BOOTHERD_QEMU_KEEP"):
            print(f"\nqemu lab files kept in {lab.dir}", file=sys.stderr)
        else:
            shutil.rmtree(lab.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def lab() -> Iterator[LabInfo]:
    services = _prerequisites()
    image = nodeimage.build()
    arm64 = nodeimage.build_arm64()
    workdir = Path(tempfile.mkdtemp(prefix="bootherd-qemu-"))
    specs = vmenv.node_specs(NODE_COUNT, {WAIT_NODE}, {BMC_NODE}, NODE_TYPES,
                             NODE_OSES)
    lab = vmenv.Lab(image, workdir, specs, taps=NODE_COUNT, arm64=arm64)
    with _running(lab, services) as info:
        yield info


@pytest.fixture(scope="session")
def lab6() -> Iterator[LabInfo]:
    """An IPv6-only boot network: no IPv4 address anywhere, radvd, DHCPv6."""
    services = _prerequisites()
    if shutil.which("radvd") is None:
        pytest.skip("radvd is not installed (Debian radvd)")
    lab = vmenv.Lab(nodeimage.build(), Path(tempfile.mkdtemp(prefix="bootherd-qemu6-")),
                    vmenv.node_specs6(2), taps=2, ipv6_only=True)
    with _running(lab, [s for s in services if s != "dhcp"]) as info:
        yield info

"""Fixtures for the real-firmware tests: one lab (namespaces + `bootherd serve`) per session.

Skips, with the reason, when not root, when a Debian package cannot be
installed, or when a server part the boot needs is not in this build.
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def lab() -> Iterator[LabInfo]:
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
    image = nodeimage.build()
    arm64 = nodeimage.build_arm64()
    workdir = Path(tempfile.mkdtemp(prefix="bootherd-qemu-"))
    specs = vmenv.node_specs(NODE_COUNT, {WAIT_NODE, BMC_NODE}, {BMC_NODE}, NODE_TYPES,
                             NODE_OSES)
    lab = vmenv.Lab(image, workdir, specs, taps=NODE_COUNT, arm64=arm64)
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
            print(f"\nqemu lab files kept in {workdir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

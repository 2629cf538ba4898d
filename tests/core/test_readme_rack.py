"""The README's "served rack in a network namespace", followed word for word.

Every fenced block after a `<!-- rack -->` marker runs, in order, in one bash (-e) in
a fresh folder; the only change is the namespace names (unique per run, as the
network rules want).  Then each answer a client got is checked: real ISC dhclient and
busybox udhcpc leases for all 20 nodes, the TFTP and HTTP iPXE scripts, TMCD's
serviceinfo: the server's namespace address everywhere, 127.0.0.1 nowhere.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER = "10.252.0.1"
TOOLS = ("ip", "busybox", "dhclient", "curl", "tftp")


def blocks(text: str) -> list[str]:
    return re.findall(r"<!-- rack -->\n```sh\n(.*?)```", text, re.S)


def test_readme_has_the_rack_walkthrough() -> None:
    found = blocks((ROOT / "README.md").read_text())
    assert len(found) >= 6 and "bootherd serve" in "".join(found)


def _cleanup(namespaces: list[str], work: Path) -> None:
    pid_file = work / "rack" / "serve.pid"
    if pid_file.exists() and pid_file.read_text().strip().isdigit():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            time.sleep(0.5)
        except ProcessLookupError:
            pass
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def test_readme_rack_word_for_word(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing or not Path("/usr/lib/ipxe/undionly.kpxe").exists():
        pytest.skip(f"not installed: {missing or 'ipxe'}")
    tag = f"bh{os.getpid()}{secrets.token_hex(2)}"
    names = {"bh-srv": f"{tag}s", "bh-rack": f"{tag}r"}
    script = "\n".join(blocks((ROOT / "README.md").read_text()))
    for old, new in names.items():
        script = script.replace(old, new)
    (tmp_path / "rack.sh").write_text(script)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        r = subprocess.run(["bash", "-e", "-o", "pipefail", "-x", "rack.sh"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        work = tmp_path / "rack"
        log = (work / "serve.log").read_text() if (work / "serve.log").exists() else ""
        assert r.returncode == 0, f"{r.stderr[-3000:]}\n--- serve.log\n{log[-3000:]}"
        (tmp_path / "rack.out").write_text(r.stdout + r.stderr)
        check_answers(work, log, r.stdout + r.stderr)
    finally:
        _cleanup(list(names.values()), tmp_path)


def lease(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split())


def check_answers(work: Path, log: str, output: str) -> None:
    doc = tomllib.loads((work / "rack.toml").read_text())
    nodes = {n["node_id"]: n["interfaces"][0] for n in doc["nodes"]}
    assert len(nodes) == 20
    net = ipaddress.IPv4Network("10.252.0.0/16")

    pc1 = lease((work / "pc1.lease").read_text().strip())
    assert pc1 == {"ip": nodes["pc1"]["ip"], "mask": "255.255.0.0", "server": SERVER,
                   "next-server": SERVER, "file": "undionly.kpxe"}, pc1
    rack = [lease(x) for x in (work / "rack.leases").read_text().splitlines()]
    assert sorted(x["ip"] for x in rack) == sorted(n["ip"] for n in nodes.values())
    for x in rack:
        assert ipaddress.IPv4Address(x["ip"]) in net
        assert (x["mask"], x["server"], x["next-server"], x["file"]) == \
            ("255.255.0.0", SERVER, SERVER, "undionly.kpxe"), x
    http = lease((work / "pc2-http.lease").read_text().strip())
    assert http["ip"] == nodes["pc2"]["ip"]
    assert http["file"] == f"http://{SERVER}:8080/boot/ipxe.efi", http

    assert (work / "pc1-undionly.kpxe").read_bytes() == \
        Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
    tftp_script = (work / "pc1-tftp.ipxe").read_text()
    assert tftp_script.startswith("#!ipxe") and \
        f"chain http://{SERVER}:8080/ipxe?mac=" in tftp_script, tftp_script
    ipxe = (work / "pc1.ipxe").read_text()
    assert ipxe.startswith("#!ipxe") and "FRISBEE-MFS" in ipxe, ipxe
    assert f"kernel http://{SERVER}:8080/files/tftpboot/frisbee" in ipxe, ipxe
    assert f"chain --replace --autofree http://{SERVER}:8080/ipxe?mac=" in ipxe, ipxe
    tmcd = (work / "pc1.tmcd").read_text()
    assert tmcd.strip() == f"TFTP={SERVER} DHCP={SERVER} FRISBEE={SERVER} PUBSUB={SERVER}", tmcd

    answers = [work / f for f in ("pc1.lease", "rack.leases", "pc2-http.lease",
                                  "pc1-tftp.ipxe", "pc1.ipxe", "pc1.tmcd")]
    for f in answers:
        assert "127.0.0.1" not in f.read_text(), f
    assert "127.0.0.1" not in (work / "rack.toml").read_text()
    assert "Traceback" not in log and "cannot send" not in log, log
    assert "warning: " not in output  # the import found every node on the served subnet

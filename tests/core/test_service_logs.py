"""What an operator reads from a running `bootherd serve` (a separate process, real
clients on loopback): one log line per request for the services named in log.requests,
a warning for every node that fails, structured fields in JSON lines, ISO times with
their zone; /metrics in prometheus-client's conventions."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bootherd.dhcp.codec import DhcpMessage, encode
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.logs import JSONFormatter, TextFormatter, event
from bootherd.procs import free_port, terminate

SUBNET = "127.43.0.0/24"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bootherd.cli", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=60)


class Deployment:
    def __init__(self, tmp: Path, conf: Path, ports: dict[str, int], log: Path,
                 proc: subprocess.Popen):
        self.tmp, self.conf, self.ports, self.log_path, self.proc = tmp, conf, ports, log, proc

    def lines(self) -> list[dict]:
        # The server may be mid-write: only lines it has ended are read, and each of
        # those must be one JSON object.
        complete = self.log_path.read_text().rpartition("\n")[0]
        return [json.loads(raw) for raw in complete.splitlines()]

    def wait_for(self, pred, timeout: float = 20.0) -> dict:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if pred(line):
                    return line
            time.sleep(0.1)
        raise AssertionError(f"no such log line in:\n{self.log_path.read_text()[-3000:]}")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}{path}",
                                    timeout=10) as r:
            return r.read().decode()


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    tmp = tmp_path_factory.mktemp("serve-logs")
    url = f"sqlite:///{tmp}/inv.db"
    engine = make_engine(url)
    upgrade(engine)
    import_testbed(engine, generate(20, subnet=SUBNET, server="127.0.0.1"))
    engine.dispose()
    (tmp / "tftpboot").mkdir()
    (tmp / "tftpboot" / "undionly.kpxe").write_bytes(b"\x55" * 3000)
    ports = {k: free_port() for k in ("dhcp", "proxy", "tftp", "bootinfo", "client", "order",
                                      "tmcd", "http", "imaging")}
    conf = tmp / "bootherd.toml"
    conf.write_text(f"""
[database]
url = "{url}"
[log]
format = "json"
requests = ["dhcp", "tftp", "bootinfo", "tmcd", "http"]
[dhcp]
port = {ports['dhcp']}
proxy_port = {ports['proxy']}
[tftp]
port = {ports['tftp']}
root = "tftpboot"
[bootinfo]
port = {ports['bootinfo']}
client_port = {ports['client']}
order_port = {ports['order']}
[tmcd]
port = {ports['tmcd']}
fallback_port = 0
[http]
port = {ports['http']}
[imaging]
port = {ports['imaging']}
""")
    log = tmp / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "bootherd.cli", "serve", "-c", str(conf)],
                                cwd=tmp, stdout=fh, stderr=subprocess.STDOUT)
    d = Deployment(tmp, conf, ports, log, proc)
    try:
        d.wait_for(lambda rec: rec["msg"] == "bootherd ready")
        yield d
    finally:
        terminate(proc)


def _node_ip(i: int) -> str:
    return f"127.43.0.{i + 2}"


def test_every_line_is_one_json_event_with_fields_and_zoned_time(dep: Deployment) -> None:
    lines = dep.lines()
    assert lines
    for rec in lines:
        assert ISO.match(rec["ts"]), rec["ts"]
        assert rec["level"] in ("debug", "info", "warning", "error") and rec["logger"]
    ready = next(rec for rec in lines if rec["msg"] == "bootherd ready")
    assert ready["nodes"] == 20 and "dhcp" in ready["services"]  # fields, not prose in msg


def test_text_lines_are_key_value_pairs() -> None:
    import logging

    rec = logging.LogRecord("bootherd.x", logging.WARNING, __file__, 1, "node failed", (),
                            None)
    rec.fields = {"node": "pc1", "detail": 'no "answer"\nafter 3 orders', "n": 3}
    line = TextFormatter().format(rec)
    assert "\n" not in line
    assert re.match(r'^ts=\S+ level=warning logger=bootherd.x msg="node failed" node=pc1 '
                    r'detail="no \\"answer\\"\\nafter 3 orders" n=3$', line), line
    assert ISO.match(line.split()[0][3:])
    obj = json.loads(JSONFormatter().format(rec))
    assert obj["node"] == "pc1" and obj["n"] == 3 and obj["msg"] == "node failed"
    # A traceback stays on its event's line.
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec.exc_info = sys.exc_info()
    assert "\n" not in TextFormatter().format(rec)
    # Nothing is formatted for a level that is off.
    calls = []

    class Loud:
        def __str__(self) -> str:
            calls.append(1)
            return "x"

    logging.getLogger("bootherd.quiet").setLevel(logging.WARNING)
    event(logging.getLogger("bootherd.quiet"), logging.INFO, "request", who=Loud())
    assert calls == []


def test_unknown_mac_is_one_dhcp_line(dep: Deployment) -> None:
    mac = bytes.fromhex("0a00000000ee")
    pkt = encode(DhcpMessage(1, xid=77, chaddr=mac, options={53: b"\x01"}))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.sendto(pkt, ("127.0.0.1", dep.ports["dhcp"]))
    rec = dep.wait_for(lambda r: r["msg"] == "dhcp request" and r.get("mac") == mac.hex(":"))
    assert rec["known"] is False and rec["outcome"] == "ignored" and rec["type"] == "DISCOVER"


def test_missing_tftp_file_is_one_line(dep: Deployment) -> None:
    r = subprocess.run(["tftp", "127.0.0.1", str(dep.ports["tftp"]), "-m", "binary",
                        "-c", "get", "no-such-loader.efi"], cwd=dep.tmp, capture_output=True,
                       text=True, timeout=30)
    assert "not found" in (r.stdout + r.stderr).lower() or r.returncode != 0
    rec = dep.wait_for(lambda x: x["msg"] == "tftp request"
                       and x.get("file") == "no-such-loader.efi")
    assert rec["outcome"] == "refused" and rec["code"] == 1
    subprocess.run(["tftp", "127.0.0.1", str(dep.ports["tftp"]), "-m", "binary",
                    "-c", "get", "undionly.kpxe"], cwd=dep.tmp, capture_output=True, timeout=30)
    rec = dep.wait_for(lambda x: x["msg"] == "tftp request" and x.get("outcome") == "ok")
    assert rec["bytes"] == 3000 and rec["file"].endswith("undionly.kpxe")


def test_http_404_is_one_access_line(dep: Deployment) -> None:
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", "*",
                        f"http://127.0.0.1:{dep.ports['http']}/files/no/such.tar.gz"],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout == "404"
    rec = dep.wait_for(lambda x: x["msg"] == "http request"
                       and x.get("path") == "/files/no/such.tar.gz")
    assert rec["status"] == 404 and rec["method"] == "GET" and rec["remote"] == "127.0.0.1"
    assert "curl" in rec["agent"]


def test_tmcd_request_and_failed_state_are_logged(dep: Deployment) -> None:
    r = cli("tmcc", "-s", "127.0.0.1", "-p", str(dep.ports["tmcd"]), "-P", "0",
            "-l", _node_ip(3), "state", "BOOTFAILED", cwd=dep.tmp)
    assert r.returncode == 0, r.stderr
    rec = dep.wait_for(lambda x: x["msg"] == "tmcd request" and x.get("command") == "state")
    assert rec["node"] == "pc4" and rec["remote"] == _node_ip(3) and rec["transport"] == "tcp"
    failed = dep.wait_for(lambda x: x["msg"] == "node failed")
    assert failed["level"] == "warning"
    assert failed["node"] == "pc4" and failed["state"] == "BOOTFAILED" and failed["source"]


def test_metrics_follow_prometheus_conventions(dep: Deployment) -> None:
    # Give TFTP and DHCP something to count (the tests above did; this one may run alone).
    subprocess.run(["tftp", "127.0.0.1", str(dep.ports["tftp"]), "-m", "binary",
                    "-c", "get", "missing.bin"], cwd=dep.tmp, capture_output=True, timeout=30)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"garbage", ("127.0.0.1", dep.ports["dhcp"]))
    time.sleep(0.3)
    families = {f.name: f for f in text_string_to_metric_families(dep.get("/metrics"))}
    events = families["bootherd_events"]
    assert events.type == "counter"
    protocols = {s.labels["protocol"] for s in events.samples}
    assert {"dhcp", "tftp", "tmcd", "http", "inventory"} <= protocols
    by = {(s.labels["protocol"], s.labels["event"]): s.value for s in events.samples
          if s.name == "bootherd_events_total"}
    assert by[("tftp", "request_errors")] >= 1 and by[("dhcp", "malformed")] >= 1
    assert by[("tftp", "requests")] >= 1 and ("dhcp", "lease_batches") in by
    # Nothing that only grows is a gauge; TFTP has no name-prefixed counters left.
    for name, fam in families.items():
        if name.startswith("bootherd_") and name != "bootherd_events":
            assert fam.type == "gauge", name
            assert not name.startswith("bootherd_tftp_") or name == "bootherd_tftp_active_transfers"
    states = {s.labels["state"]: s.value for s in families["bootherd_node_states"].samples}
    assert sum(states.values()) == 20
    assert states["NONE"] >= 18  # nodes nobody has heard from yet
    assert families["process_cpu_seconds"].type == "counter"
    assert "process_open_fds" in families and "python_info" in families


def test_inventory_changes_are_logged_with_their_origin(dep: Deployment) -> None:
    r = cli("node", "set", "pc2", "next_os=FRISBEE-MFS", "-c", str(dep.conf), cwd=dep.tmp)
    assert r.returncode == 0, r.stderr
    rec = dep.wait_for(lambda x: x["msg"] == "inventory change" and x.get("key") == "pc2")
    assert rec["origin"] == "cli" and rec["who"] and rec["action"] == "change"
    assert rec["kind"] == "node" and "next_os '' -> 'FRISBEE-MFS'" in rec["detail"]


def test_bootinfo_question_is_one_line(dep: Deployment) -> None:
    from bootherd.bootinfo import codec

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((_node_ip(5), dep.ports["client"]))
        s.settimeout(5)
        s.sendto(codec.request(), ("127.0.0.1", dep.ports["bootinfo"]))
        s.recvfrom(1024)
    rec = dep.wait_for(lambda x: x["msg"] == "bootinfo request" and x.get("node") == "pc6")
    assert rec["remote"] == _node_ip(5) and rec["outcome"].startswith("reply_")


def test_bad_input_floods_are_one_line_per_source(dep: Deployment) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.9", 0))
        for _ in range(30):
            s.sendto(b"\x00\x09junk", ("127.0.0.1", dep.ports["tftp"]))
            s.sendto(b"\x01", ("127.0.0.1", dep.ports["bootinfo"]))
            s.sendto(b"\x01" * 10, ("127.0.0.1", dep.ports["dhcp"]))
    with socket.create_connection(("127.0.0.1", dep.ports["tmcd"]), timeout=5) as c:
        c.sendall(b"\x00" * 5000 + b"\n")
        c.recv(100)
    for what in ("tftp bad input", "bootinfo bad input", "dhcp bad input", "tmcd bad input"):
        dep.wait_for(lambda x, w=what: x["msg"] == w)
    time.sleep(0.5)
    lines = [x for x in dep.lines() if x["msg"].endswith("bad input")
             and x.get("remote") == "127.0.0.9"]
    assert sorted(x["msg"] for x in lines) == ["bootinfo bad input", "dhcp bad input",
                                               "tftp bad input"]
    assert all("exc" not in x for x in dep.lines())  # no traceback anywhere

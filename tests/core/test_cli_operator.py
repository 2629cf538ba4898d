"""The CLI as a new operator meets it (real processes): the inventory node by node,
imports that show their changes and keep running experiments, next steps in error
messages, states in any case, unclipped tables in pipes, --json everywhere, the
documented exit codes, and files named in errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import insert

from bootherd.cli import main
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # README "Exit codes"


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """`bootherd ARGS` as a separate process, output into pipes."""
    return subprocess.run([sys.executable, "-m", "bootherd.cli", *args], cwd=tmp, text=True,
                          capture_output=True, timeout=120)


def run_here(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """The same command line through bootherd.cli.main in this process (a second each
    saved: most steps need no process of their own), output captured the same way."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse
                code = int(e.code or 0)
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder with bootherd.toml, an upgraded database and a 30-node testbed imported."""
    (tmp_path / "bootherd.toml").write_text(f'[database]\nurl = "sqlite:///{tmp_path}/i.db"\n')
    assert run_here(tmp_path, "db", "upgrade", "-c", "bootherd.toml").returncode == 0
    r = run_here(tmp_path, "testbed", "generate", "--nodes", "30", "-o", "tb.toml")
    assert r.returncode == 0
    r = run_here(tmp_path, "testbed", "import", "tb.toml", "-c", "bootherd.toml")
    assert r.returncode == 0, r.stderr
    return tmp_path


def cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    return run_here(site, *args, "-c", "bootherd.toml")


def cli_process(site: Path, *args: str) -> subprocess.CompletedProcess:
    return run(site, *args, "-c", "bootherd.toml")


def test_a_rack_added_node_by_node_after_the_chain_of_next_steps(site: Path) -> None:
    # Each missing prerequisite names the command that makes it.
    r = cli(site, "experiment", "allocate", "rack", "exp1", "ra1")
    assert r.returncode == EXIT_FAILED
    assert "no experiment rack/exp1: create it with 'bootherd experiment create rack exp1 " \
           "--creator USER'" in r.stderr
    r = cli(site, "experiment", "create", "rack", "exp1", "--creator", "alice")
    assert r.returncode == EXIT_FAILED
    assert "no user 'alice': add it with 'bootherd user add alice " in r.stderr
    r = cli(site, "user", "add", "alice", "uid=30000", "gid=7100", "groups=rack")
    assert r.returncode == EXIT_FAILED and "bootherd group add rack" in r.stderr
    steps = [
        ("group", "add", "rack", "gid=7100"),
        ("user", "add", "alice", "uid=30000", "gid=7100", "groups=rack", "name=Alice A."),
        ("experiment", "create", "rack", "exp1", "--creator", "alice"),
        ("type", "add", "r650", "loader_bios=undionly.kpxe", "loader_uefi=snponly.efi"),
        ("node", "add", "ra1", "type=r650", "default_os=UBUNTU22-64-STD"),
        ("interface", "add", "ra1", "mac=02:aa:00:00:00:01", "ip=10.10.1.1",
         "mask=255.255.0.0", "role=ctrl", "iface=eth0"),
        ("experiment", "allocate", "rack", "exp1", "ra1:n0"),
        ("node", "set", "ra1", "next_os=FRISBEE-MFS"),
    ]
    for step in steps:
        r = cli(site, *step)
        assert r.returncode == EXIT_OK, (step, r.stderr)
    assert "alice" in cli(site, "user", "list").stdout
    node = json.loads(cli(site, "node", "show", "ra1", "--json").stdout)
    assert node["type"] == "r650" and node["next_os"] == "FRISBEE-MFS"
    assert node["interfaces"][0]["ip"] == "10.10.1.1" and node["allocation"]["vname"] == "n0"
    shown = cli(site, "node", "show", "ra1").stdout  # readable without --json
    assert "next_os" in shown and "FRISBEE-MFS" in shown and "{" not in shown
    # The rules of import hold, and nothing is written when they refuse.
    r = cli(site, "interface", "add", "ra1", "mac=02:aa:00:00:00:02", "ip=10.10.1.1")
    assert r.returncode == EXIT_USAGE and "duplicate IP 10.10.1.1" in r.stderr
    r = cli(site, "node", "add", "ra2", "typ=r650")
    assert r.returncode == EXIT_USAGE and "did you mean 'type'" in r.stderr
    r = cli(site, "node", "remove", "ra1")
    assert r.returncode == EXIT_FAILED and "allocated to rack/exp1" in r.stderr
    assert "--force" in r.stderr
    assert cli(site, "experiment", "free", "ra1").returncode == EXIT_OK
    r = cli(site, "node", "remove", "ra1")
    assert r.returncode == EXIT_OK and "- node ra1" in r.stdout
    r = cli(site, "interface", "list", "ra1")
    assert r.returncode == EXIT_FAILED and "no node 'ra1'" in r.stderr


def test_import_shows_the_diff_and_refuses_to_drop_running_experiments(site: Path) -> None:
    nodes = json.loads(cli(site, "node", "list", "--json").stdout)
    free = next(n["node_id"] for n in nodes if not n["experiment"])
    assert cli(site, "node", "set", free, "next_os=FRISBEE-MFS").returncode == EXIT_OK
    # The operator's file: the generated one, without its experiments, one node changed.
    import tomllib

    import tomli_w
    doc = tomllib.loads((site / "tb.toml").read_text())
    doc["experiments"] = []
    doc["nodes"][2]["boot_cmdline"] = "console=ttyS1"
    (site / "mine.toml").write_text(tomli_w.dumps(doc))
    before = cli(site, "testbed", "export").stdout
    r = cli(site, "testbed", "import", "mine.toml", "--dry-run")
    assert r.returncode == EXIT_OK, r.stderr
    assert "- experiment proj0/exp0" in r.stdout
    assert f"~ node {doc['nodes'][2]['node_id']}: boot_cmdline '' -> 'console=ttyS1'" in r.stdout
    assert f"! pending next_os FRISBEE-MFS of {free} would be dropped" in r.stdout
    assert "nothing written" in r.stdout
    r = cli(site, "testbed", "import", "mine.toml")
    assert r.returncode == EXIT_FAILED
    assert "would drop what running experiments use" in r.stderr and "--force" in r.stderr
    assert cli(site, "testbed", "export").stdout == before  # nothing was written
    plan = json.loads(cli(site, "testbed", "import", "mine.toml", "--dry-run", "--json").stdout)
    assert plan["written"] is False and plan["losses"]
    r = cli(site, "testbed", "import", "mine.toml", "--force")
    assert r.returncode == EXIT_OK and "imported mine.toml" in r.stdout
    assert json.loads(cli(site, "experiment", "list", "--json").stdout) == []


def test_node_events_state_filter_tables_and_json(site: Path) -> None:
    r = cli_process(site, "node", "events", "ra99")
    assert r.returncode == EXIT_FAILED and "no node 'ra99'" in r.stderr and r.stdout == ""
    engine = make_engine(f"sqlite:///{site}/i.db")
    with engine.begin() as c:
        c.execute(insert(s.node_states).values(node_id="pc3", state="ISUP", since=time.time(),
                                               source="tmcd"))
    engine.dispose()
    for spelled in ("isup", "ISUP", "IsUp"):
        rows = json.loads(cli(site, "node", "list", "--state", spelled, "--json").stdout)
        assert [n["node_id"] for n in rows] == ["pc3"]
    rows = json.loads(cli(site, "node", "list", "--state", "none", "--json").stdout)
    assert len(rows) == 29 and "pc3" not in {n["node_id"] for n in rows}
    r = cli_process(site, "node", "list", "--state", "BOGUS")
    assert r.returncode == EXIT_USAGE
    assert "unknown state 'BOGUS'" in r.stderr and "ISUP" in r.stderr and "PXEFAILED" in r.stderr
    # Into a pipe, every column whole: no row cut at 80 columns or folded.
    table = cli_process(site, "node", "list").stdout
    lines = table.splitlines()
    assert max(len(line) for line in lines) > 80
    row = next(line for line in lines if " pc3 " in line)
    assert "ISUP" in row and "…" not in table
    mac = json.loads(cli(site, "node", "show", "pc3", "--json").stdout)["interfaces"][0]["mac"]
    assert mac in row
    # --json where a listing or record is printed.
    cfg = json.loads(cli(site, "config", "check", "--json").stdout)
    assert cfg["tftp"]["max_blksize"] == 1468
    text = cli(site, "config", "check").stdout
    assert "[tftp]" in text and "max_blksize = 1468" in text


def test_exit_codes_and_files_named_in_errors(site: Path) -> None:
    assert cli_process(site, "node", "list").returncode == EXIT_OK
    assert run(site, "node", "frobnicate").returncode == EXIT_USAGE  # argparse
    assert cli(site, "node", "set", "pc1", "next_os").returncode == EXIT_USAGE  # no =VALUE
    assert cli_process(site, "node", "set", "pc999", "next_os=FRISBEE-MFS").returncode == \
        EXIT_FAILED
    (site / "bad.toml").write_text('[[nodes]]\nnode_id = "pc1"\ntype = \n')
    r = cli_process(site, "testbed", "import", "bad.toml")
    assert r.returncode == EXIT_USAGE and "bad.toml" in r.stderr and "line 3" in r.stderr
    (site / "typo.toml").write_text('[[nodez]]\nnode_id = "pc1"\n')
    r = cli(site, "testbed", "import", "typo.toml")
    assert r.returncode == EXIT_USAGE and "typo.toml" in r.stderr
    assert "did you mean 'nodes'" in r.stderr
    r = cli(site, "testbed", "import", "missing.toml")
    assert r.returncode == EXIT_FAILED and "missing.toml" in r.stderr
    (site / "conf2.toml").write_text("[tftp]\nmax_blksise = 1400\n")
    r = run(site, "config", "check", "-c", "conf2.toml")
    assert r.returncode == EXIT_USAGE and "did you mean 'max_blksize'" in r.stderr


def test_node_set_refuses_an_os_whose_kernel_is_missing(site: Path) -> None:
    r = cli(site, "node", "set", "pc1", "default_os=NO-SUCH-OS")
    assert r.returncode == EXIT_FAILED and "no os 'NO-SUCH-OS'" in r.stderr
    r = cli(site, "node", "set", "pc1", "next_os=LINUX-NETBOOT")
    assert r.returncode == EXIT_FAILED
    assert str(site / "var/www/kernels/vmlinuz") in r.stderr and "--force" in r.stderr
    assert json.loads(cli(site, "node", "show", "pc1", "--json").stdout)["next_os"] is None
    (site / "var/www/kernels").mkdir(parents=True)
    (site / "var/www/kernels/vmlinuz").write_bytes(b"k")
    r = cli(site, "node", "set", "pc1", "next_os=LINUX-NETBOOT")
    assert r.returncode == EXIT_FAILED and "initrd.img" in r.stderr  # the initrd, too
    (site / "var/www/kernels/initrd.img").write_bytes(b"i")
    assert cli(site, "node", "set", "pc1", "next_os=LINUX-NETBOOT").returncode == EXIT_OK
    r = cli(site, "node", "set", "pc2", "next_os=LINUX-NETBOOT", "--force")
    assert r.returncode == EXIT_OK

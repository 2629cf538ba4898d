"""BMC settings in the inventory: testbed import/export with password references
(the password never leaves in clear), validation naming the entry, the migration,
the targets the controller reads, and Wake-on-LAN to a node's control MAC."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import inspect

from bootherd.inventory import ops
from bootherd.inventory.db import upgrade
from bootherd.inventory.testbed import (
    TestbedError,
    export_secrets,
    export_testbed,
    generate,
    import_testbed,
    write_secrets,
)
from bootherd.power.controller import PowerController, PowerSettings
from bootherd.power.core import PowerOp
from bootherd.power.drivers import magic_packet, make_drivers
from bootherd.power.targets import load_targets

SECRET = "s3cr3t-Bmc!"


def with_power(text: str, node: str, **power: object) -> str:
    """Give `node` of a generated testbed a [nodes.power] table."""
    import tomllib

    import tomli_w

    doc = tomllib.loads(text)
    for n in doc["nodes"]:
        if n["node_id"] == node:
            n["power"] = power
    return tomli_w.dumps(doc)


def test_passwords_by_reference_round_trip_without_leaving_in_clear(engine, tmp_path: Path):
    pwfile = tmp_path / "pc2.pw"
    pwfile.write_text(SECRET + "-file\n")
    pwfile.chmod(0o600)
    text = generate(4, bmc="ipmi")
    text = with_power(text, "pc2", driver="ipmi", address="10.11.0.3", user="root",
                      password="file:pc2.pw", console="sol")
    text = with_power(text, "pc3", driver="redfish", address="https://10.11.0.4:8443",
                      user="ops", password="plain-literal", system="1")
    text = with_power(text, "pc4", driver="manual")
    import_testbed(engine, text, base_dir=tmp_path, env={"BOOTHERD_BMC_PASSWORD": SECRET})
    assert export_secrets(engine) == {"pc1": SECRET, "pc2": SECRET + "-file",
                                      "pc3": "plain-literal"}
    out = export_testbed(engine)
    assert SECRET not in out and "plain-literal" not in out
    assert out.count('password = "inventory:"') == 3
    # Re-importing the export keeps the stored passwords (the file said where they are).
    import_testbed(engine, out, env={})
    assert export_secrets(engine)["pc2"] == SECRET + "-file"
    assert export_testbed(engine) == out
    # With a secrets file: 0600 from the first byte, and import reads it back.
    secrets = tmp_path / "tb.secrets.toml"
    write_secrets(secrets, export_secrets(engine))
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    out2 = export_testbed(engine, "tb.secrets.toml")
    assert out2.count('password = "secrets:tb.secrets.toml"') == 3 and SECRET not in out2
    import_testbed(engine, out2, base_dir=tmp_path, env={})
    targets = load_targets(engine, ["pc1", "pc2", "pc3", "pc4", "nope"])
    assert set(targets) == {"pc1", "pc2", "pc3", "pc4"}
    assert targets["pc2"].password == SECRET + "-file" and targets["pc2"].console == "sol"
    assert targets["pc3"].system == "1" and targets["pc1"].mac == "02:00:01:00:00:08"
    assert SECRET not in repr(targets["pc1"])
    shown = ops.show_node(engine, "pc1")["power"]
    assert shown["password_set"] is True and "password" not in shown


@pytest.mark.parametrize("power, message", [
    ({"driver": "telnet", "address": "x"}, "power.driver: must be one of"),
    ({"driver": "ipmi"}, "power.address: the ipmi driver needs the BMC's address"),
    ({"driver": "redfish", "address": "h", "console": "sol"}, "serial-over-LAN needs an IPMI"),
    ({"driver": "ipmi", "address": "h", "console": "tcp:h"}, "tcp:HOST:PORT"),
    ({"driver": "ipmi", "address": "h", "port": 70000}, "power.port: must be 0-65535"),
    ({"driver": "ipmi", "address": "h", "password": "env:NOT_SET_ANYWHERE"}, "'NOT_SET_ANYWHERE'"),
    ({"driver": "ipmi", "address": "h", "password": "inventory:"}, "holds none for pc2"),
    ({"driver": "ipmi", "address": "h", "password": "file:missing.pw"}, "cannot read"),
    ({"driver": "ipmi", "address": "h", "colour": "red"}, "unknown field 'colour'"),
])
def test_bad_power_entries_are_refused_naming_them(sqlite_engine, tmp_path: Path, power, message):
    import_testbed(sqlite_engine, generate(3))
    with pytest.raises(TestbedError) as e:
        import_testbed(sqlite_engine, with_power(generate(3), "pc2", **power), base_dir=tmp_path,
                       env={})
    assert message in str(e.value) and "pc2" in str(e.value)
    assert export_secrets(sqlite_engine) == {} and "[nodes.power]" not in export_testbed(
        sqlite_engine), "nothing was written"


def test_a_password_file_readable_by_others_is_refused(sqlite_engine, tmp_path: Path):
    pw = tmp_path / "open.pw"
    pw.write_text(SECRET)
    pw.chmod(0o644)
    with pytest.raises(TestbedError, match="readable by others .mode 644.; chmod 600"):
        import_testbed(sqlite_engine, with_power(generate(2), "pc1", driver="ipmi", address="h",
                                                 password="file:open.pw"), base_dir=tmp_path)


def test_migration_0005_goes_down_and_up(engine):
    assert "node_power" in inspect(engine).get_table_names()
    from alembic import command

    from bootherd.inventory.db import _alembic_config

    cfg = _alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007")  # 0005's parent (later migrations go too)
    assert "node_power" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert "node_power" in inspect(engine).get_table_names()


def test_cli_export_writes_a_secrets_file_and_import_reads_it(tmp_path: Path):
    db = f"sqlite:///{tmp_path}/i.db"

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bootherd.cli", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env={**os.environ, **env})

    assert cli("db", "upgrade", "--db", db).returncode == 0
    r = cli("testbed", "generate", "--nodes", "5", "--bmc", "redfish", "-o", "tb.toml")
    assert r.returncode == 0, r.stderr
    r = cli("testbed", "import", "tb.toml", "--db", db, BOOTHERD_BMC_PASSWORD=SECRET)
    assert r.returncode == 0, r.stderr
    (tmp_path / "out").mkdir()
    r = cli("testbed", "export", "-o", "out/tb.toml", "--secrets", "out/tb.secrets.toml",
            "--db", db)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "out/tb.toml").read_text()
    assert SECRET not in text and 'password = "secrets:tb.secrets.toml"' in text
    assert stat.S_IMODE((tmp_path / "out/tb.secrets.toml").stat().st_mode) == 0o600
    r = cli("node", "show", "pc3", "--json", "--db", db)
    assert r.returncode == 0 and SECRET not in r.stdout and '"password_set": true' in r.stdout
    db2 = f"sqlite:///{tmp_path}/j.db"
    assert cli("db", "upgrade", "--db", db2).returncode == 0
    r = cli("testbed", "import", "out/tb.toml", "--db", db2)
    assert r.returncode == 0, r.stderr
    from bootherd.inventory.db import make_engine

    e = make_engine(db2)
    assert export_secrets(e) == {f"pc{i}": SECRET for i in range(1, 6)}
    e.dispose()


async def test_wake_on_lan_sends_the_magic_packet_for_the_control_mac(sqlite_engine):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        port = rx.getsockname()[1]
        text = with_power(generate(2), "pc1", driver="wol", address="127.0.0.1", port=port)
        import_testbed(sqlite_engine, text)
        st = PowerSettings(timeout=3.0, power_on_rate=0.0)
        pool = ThreadPoolExecutor(2)
        events: list = []

        async def load(ids: list[str]) -> dict:
            return await asyncio.to_thread(load_targets, sqlite_engine, ids)

        ctl = PowerController(st, load, lambda *ev: events.append(ev), make_drivers(st, pool))
        try:
            (on,) = await ctl.run(PowerOp.ON, ["pc1"])
            (off,) = await ctl.run(PowerOp.OFF, ["pc1"])
            (status,) = await ctl.run(PowerOp.STATUS, ["pc1"])
        finally:
            pool.shutdown()
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(rx, 1024), 5)
    assert data == magic_packet("02:00:01:00:00:08") and len(data) == 102
    assert data[:6] == b"\xff" * 6 and data[6:12] == bytes.fromhex("020001000008")
    assert on.ok and f"sent to 127.0.0.1:{port}" in on.message
    assert not off.ok and off.error == "unsupported" and "can only power on" in off.message
    assert status.ok and status.power == "unknown"
    assert [e[1] for e in events] == ["POWER_ON", "POWER_OFF"]


async def test_manual_power_records_what_an_operator_must_do(sqlite_engine):
    import_testbed(sqlite_engine, generate(3, bmc="manual"))
    st = PowerSettings(timeout=3.0, power_on_rate=0.0)
    pool = ThreadPoolExecutor(1)
    events: list = []

    async def load(ids: list[str]) -> dict:
        return load_targets(sqlite_engine, ids)

    ctl = PowerController(st, load, lambda *ev: events.append(ev), make_drivers(st, pool))
    try:
        res = await ctl.run(PowerOp.CYCLE, ["pc1", "pc2"], pxe=True, source="operator")
    finally:
        pool.shutdown()
    assert all(r.ok and "by hand" in r.message and "network once" in r.message for r in res)
    assert [(e[0], e[1], e[2]) for e in events] == [("pc1", "POWER_CYCLE", "operator"),
                                                   ("pc2", "POWER_CYCLE", "operator")]

"""`bootherd image create|list|show|verify|delete` against a real inventory, the
imaging config keys, and os_images.disk_image through testbed import and export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import update

from bootherd import config
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.testbed import TestbedError, export_testbed, generate, import_testbed

from .disks import make_disk


def bh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bootherd.cli", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "bootherd.toml").write_text(
        f'[database]\nurl = "sqlite:///{tmp_path}/i.db"\n[imaging]\nroot = "{tmp_path}/img"\n')
    upgrade(make_engine(f"sqlite:///{tmp_path}/i.db"))
    make_disk(tmp_path, size_mib=12, part_mib=8, files_mib=2)
    return tmp_path


def test_create_list_show_verify_delete(site: Path) -> None:
    c = ["-c", str(site / "bootherd.toml")]
    r = bh("image", "create", str(site / "disk.raw"), "-o", "deb12", *c, cwd=site)
    assert r.returncode == 0, r.stderr
    assert "partition 1: ext filesystem" in r.stdout
    r = bh("image", "create", str(site / "disk.raw"), "-o", "deb12", *c, cwd=site)
    assert r.returncode == 1 and "exists" in r.stderr
    rows = json.loads(bh("image", "list", "--json", *c, cwd=site).stdout)
    assert [x["name"] for x in rows] == ["deb12"] and rows[0]["present"]
    shown = json.loads(bh("image", "show", "deb12", *c, cwd=site).stdout)
    assert shown["state"] == "ok" and shown["fs_aware"] and shown["os_images"] == []
    assert bh("image", "verify", "deb12", *c, cwd=site).returncode == 0
    # An OS image pointing at it keeps it from being deleted.
    engine = make_engine(f"sqlite:///{site}/i.db")
    import_testbed(engine, generate(3))
    with engine.begin() as conn:
        conn.execute(update(s.os_images).where(s.os_images.c.name == "UBUNTU22-64-STD")
                     .values(disk_image="deb12"))
    assert json.loads(bh("image", "show", "deb12", *c, cwd=site).stdout)["os_images"] == \
        ["UBUNTU22-64-STD"]
    r = bh("image", "delete", "deb12", *c, cwd=site)
    assert r.returncode == 1 and "UBUNTU22-64-STD" in r.stderr
    # Tampered on disk: verify names the chunk and fails.
    path = site / "img" / "deb12.bhimg"
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x10
    path.write_bytes(bytes(data))
    r = bh("image", "verify", "deb12", *c, cwd=site)
    assert r.returncode == 1 and "SHA-256 mismatch" in r.stderr
    path.write_bytes(bytes(data[:-5000]))
    r = bh("image", "verify", "deb12", *c, cwd=site)
    assert r.returncode == 1 and "truncated" in r.stderr
    assert bh("image", "delete", "deb12", "--force", *c, cwd=site).returncode == 0
    assert not path.exists()
    assert json.loads(bh("image", "list", "--json", *c, cwd=site).stdout) == []
    r = bh("image", "show", "deb12", *c, cwd=site)
    assert r.returncode == 1 and "no disk image" in r.stderr  # README: exit codes


def test_bad_names_and_sources_are_refused(site: Path) -> None:
    c = ["-c", str(site / "bootherd.toml")]
    r = bh("image", "create", str(site / "disk.raw"), "-o", "../etc", *c, cwd=site)
    assert r.returncode == 2 and "image name" in r.stderr
    r = bh("image", "create", str(site / "nope.raw"), "-o", "x", *c, cwd=site)
    assert r.returncode == 1 and "no such file" in r.stderr


def test_disk_image_field_round_trips_through_testbed_files(engine) -> None:  # noqa: ANN001
    text = generate(4).replace('name = "UBUNTU22-64-STD"\n',
                               'name = "UBUNTU22-64-STD"\n', 1)
    import_testbed(engine, text)
    out = export_testbed(engine)
    assert 'disk_image = ""' in out
    with_image = out.replace('disk_image = ""', 'disk_image = "ubuntu22.v3"', 1)
    import_testbed(engine, with_image)
    assert export_testbed(engine) == with_image
    with pytest.raises(TestbedError, match="disk_image: not a disk image name"):
        import_testbed(engine, out.replace('disk_image = ""', 'disk_image = "a/b"', 1))


@pytest.mark.parametrize("key,value,message", [
    ("multicast_group", "10.1.1.1", "not an IPv4 multicast address"),
    ("multicast_ports", "40000", None),
    ("multicast_ports", "9-3", "FIRST <= LAST"),
    ("multicast_ports", "a-b", "expected FIRST-LAST"),
    ("ttl", "0", "1-255"),
    ("fec_proactive", "1.5", "0-1"),
    ("chunk_size", "1000", "multiple of 512"),
    ("interface_address", "nope", "not an IP address"),
])
def test_imaging_config_is_checked_naming_the_key(key: str, value: str, message: str | None) -> None:
    if message is None:
        assert config.multicast_ports(config.build({}, [f"imaging.{key}={value}"])
                                      .imaging.multicast_ports) == range(40000, 40001)
        return
    with pytest.raises(config.ConfigError, match=f"imaging.{key}.*{message}"):
        config.build({}, [f"imaging.{key}={value}"])

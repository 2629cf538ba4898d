"""Configuration: documented defaults, overrides, and refusals that name the key."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from bootherd import config


def test_example_is_valid_toml_holding_every_default():
    doc = tomllib.loads(config.example())
    assert config.build(doc).as_dict() == config.build({}).as_dict()
    for section, (_, keys) in config.SCHEMA.items():
        assert {k.name for k in keys} == set(doc[section])


@pytest.mark.parametrize("key", ["database.url", "dhcp.address", "dhcp.port", "tftp.address",
                                 "tftp.port", "tftp.root", "bootinfo.address", "bootinfo.port",
                                 "tmcd.address", "tmcd.port", "http.address", "http.port",
                                 "http.root"])
def test_fixed_key_names_exist(key):
    section, name = key.split(".")
    assert hasattr(getattr(config.build({}), section), name)


def test_set_overrides_one_key():
    cfg = config.build({"tmcd": {"port": 9000}}, ["tmcd.port=9001", "dhcp.routers=10.0.0.1,10.0.0.2"])
    assert cfg.tmcd.port == 9001
    assert cfg.dhcp.routers == ["10.0.0.1", "10.0.0.2"]


@pytest.mark.parametrize("raw, overrides, named", [
    ({"dhcp": {"port": "x"}}, [], "dhcp.port"),
    ({"dhcp": {"port": 70000}}, [], "dhcp.port"),
    ({"tftp": {"adress": "1.2.3.4"}}, [], "tftp.adress"),
    ({"nosuch": {}}, [], "nosuch"),
    ({"http": {"address": "localhost:80"}}, [], "http.address"),
    ({"dhcp": {"mode": "sometimes"}}, [], "dhcp.mode"),
    ({"dhcp": {"unknown_clients": "pool"}}, [], "dhcp.dynamic_pool"),
    ({"database": {"url": "mysql://x"}}, [], "database.url"),
    ({}, ["tmcd.port=abc"], "tmcd.port"),
    ({}, ["tmcd.nope=1"], "tmcd.nope"),
    ({"tftp": {"max_blksize": 4}}, [], "tftp.max_blksize"),
    ({}, ["tftp.max_windowsize=0"], "tftp.max_windowsize"),
    ({}, ["tftp.timeout=0"], "tftp.timeout"),
    ({}, ["tftp.native_data_path=sometimes"], "tftp.native_data_path"),
    ({"dhcp": {"native_send": "fast"}}, [], "dhcp.native_send"),
])
def test_bad_config_is_refused_naming_the_key(raw, overrides, named):
    with pytest.raises(config.ConfigError) as err:
        config.build(raw, overrides)
    assert named in str(err.value)


def test_serve_refuses_a_bad_file_at_start(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[tmcd]\nport = \"seventy\"\n")
    r = subprocess.run([sys.executable, "-m", "bootherd.cli", "serve", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "tmcd.port" in r.stderr

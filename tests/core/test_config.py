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


@pytest.mark.parametrize("raw,overrides,message", [
    ({"tftp": {"max_blksise": 1400}}, [], "tftp.max_blksise: unknown key (did you mean 'max_blksize'?)"),
    ({"tfpt": {}}, [], "tfpt: unknown section (did you mean 'tftp'?)"),
    ({"dhcp": {"root": "x"}}, [], "dhcp.root: unknown key (did you mean 'tftp.root'?)"),
    ({}, ["http.admin_tokn=x"], "http.admin_tokn: unknown key (did you mean 'admin_token'?)"),
    ({"tftp": {"max_blksize": 4}}, [], "tftp.max_blksize: must be 8 to 65464, got 4"),
    ({"dhcp": {"dynamic_pool": "10.1.0.200-10.1.0.10"}}, [],
     "dhcp.dynamic_pool: reversed range '10.1.0.200-10.1.0.10'"),
    ({"log": {"requests": ["dhcp", "tfpt"]}}, [],
     "log.requests: unknown service 'tfpt' (did you mean 'tftp'?)"),
    ({"http": {"header_timeout": 0}}, [], "http.header_timeout: must be 0.1 to 3600"),
])
def test_typos_and_impossible_values_are_refused_with_the_fix(raw, overrides, message):
    with pytest.raises(config.ConfigError) as e:
        config.build(raw, overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_rate_limited_logger_holds_back_repeats_per_source_and_stays_small(caplog):
    import logging

    from bootherd.logs import RateLimited

    now = [0.0]
    rl = RateLimited(logging.getLogger("bootherd.t"), interval=10.0, max_keys=3,
                     clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        assert rl("10.0.0.1", "bad input", what="x")
        assert not rl("10.0.0.1", "bad input", what="x")
        assert not rl("10.0.0.1", "bad input", what="x")
        assert rl("10.0.0.2", "bad input", what="x")  # another source: its own line
        now[0] = 11.0
        assert rl("10.0.0.1", "bad input", what="x")  # the next interval says what it held
        for i in range(50):  # a flood of sources shares one key past max_keys
            rl(f"10.1.0.{i}", "bad input")
    records = [r for r in caplog.records if r.name == "bootherd.t"]
    assert records[2].fields["suppressed"] == 2
    assert len(rl._last) <= 4 and len(records) <= 3 + 3 + 1

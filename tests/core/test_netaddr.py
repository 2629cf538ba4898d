"""norm_ip: the one place a dual-stack listener's `::ffff:` form is unmapped."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootherd.netaddr import norm_ip


@pytest.mark.parametrize("given_ip, expected", [
    ("10.1.2.3", "10.1.2.3"),
    ("::ffff:10.1.2.3", "10.1.2.3"),
    ("::FFFF:10.1.2.3", "10.1.2.3"),
    ("::ffff:a01:203", "10.1.2.3"),
    ("fe80::1%eth0", "fe80::1"),
    ("2001:DB8::1", "2001:db8::1"),
    ("", ""),
    ("not an address", "not an address"),
    ("::ffff:999.1.1.1", "::ffff:999.1.1.1"),
])
def test_norm_ip(given_ip, expected):
    assert norm_ip(given_ip) == expected


@given(st.ip_addresses(v=4))
def test_every_mapped_ipv4_unmaps(a):
    assert norm_ip(f"::ffff:{a}") == str(a)
    assert norm_ip(str(a)) == str(a)


@given(st.text())
def test_never_raises_and_is_idempotent(text):
    once = norm_ip(text)
    assert norm_ip(once) == once
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if ":" in text and "%" not in text:
            assert once == text

"""The power core as a specification: the ramp, node selection, the telnet filter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootherd.power.console import IAC, TelnetFilter
from bootherd.power.core import MAX_RANGE, Ramp, expand_pattern, select_nodes


def ramp_starts(r: Ramp, asks: list[float]) -> list[float]:
    """Start each power-on as soon as the ramp allows after it is asked for."""
    out, now = [], 0.0
    for t in asks:
        now = max(now, t)
        now += r.delay(now)
        r.start(now)
        out.append(now)
    return out


def test_ramp_spaces_power_ons_evenly_from_the_first() -> None:
    assert ramp_starts(Ramp(4.0), [10.0] * 5) == [10.0, 10.25, 10.5, 10.75, 11.0]


def test_ramp_saves_up_no_burst_after_a_pause() -> None:
    assert ramp_starts(Ramp(2.0), [0.0, 100.0, 100.1]) == [0.0, 100.0, 100.5]


def test_ramp_counts_from_the_actual_start_of_a_late_one() -> None:
    r = Ramp(10.0)
    r.start(0.0)
    assert r.delay(0.05) == pytest.approx(0.05)
    r.start(0.13)  # started late (a busy loop): the next waits a full interval from here
    assert r.delay(0.2) == pytest.approx(0.03)
    assert r.delay(0.23) == 0.0


def test_ramp_zero_means_no_cap() -> None:
    r = Ramp(0.0)
    r.start(3.0)
    assert r.delay(3.0) == 0.0
    with pytest.raises(ValueError):
        Ramp(-1.0)


@pytest.mark.parametrize("spec, names", [
    ("pc7", ["pc7"]),
    ("pc[1-3]", ["pc1", "pc2", "pc3"]),
    ("pc[1-2,7,9-10]", ["pc1", "pc2", "pc7", "pc9", "pc10"]),
    ("r[08-11]a", ["r08a", "r09a", "r10a", "r11a"]),
    ("node-[3]", ["node-3"]),
])
def test_ranges_expand(spec: str, names: list[str]) -> None:
    assert expand_pattern(spec) == names


@pytest.mark.parametrize("spec, message", [
    ("pc[3-1]", "runs backwards"), ("pc[1-]", "not N or N-M"), ("pc[]", "not a node id"),
    ("pc[1,,2]", "empty item"), ("p c", "not a node id"), ("pc[1-2", "not a node id"),
    (f"pc[1-{MAX_RANGE + 1}]", "more than"), ("../etc", "not a node id"),
])
def test_bad_ranges_are_refused_naming_the_spec(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        expand_pattern(spec)
    assert message in str(e.value) and repr(spec) in str(e.value)


@given(st.text(max_size=40))
def test_expand_pattern_only_ever_raises_value_error(spec: str) -> None:
    try:
        names = expand_pattern(spec)
    except ValueError:
        return
    assert names and len(names) <= MAX_RANGE


def test_select_nodes_mixes_ids_ranges_and_experiments_without_repeats() -> None:
    known = [f"pc{i}" for i in range(1, 11)]
    exps = {("proj", "exp"): ["pc9", "pc2"]}
    nodes, unknown = select_nodes(["pc[1-3]", "proj/exp", "pc2", "pc[10-12]"], known, exps)
    assert nodes == ["pc1", "pc2", "pc3", "pc9", "pc10"]
    assert unknown == ["pc11", "pc12"]
    with pytest.raises(ValueError, match="no experiment proj/nope"):
        select_nodes(["proj/nope"], known, exps)


def test_telnet_filter_strips_negotiation_and_refuses_options() -> None:
    f = TelnetFilter()
    data = bytes((IAC, 251, 1, IAC, 253, 3)) + b"login: " + bytes((IAC, IAC)) + b"x"
    out, reply = f.feed(data)
    assert out == b"login: \xffx"
    assert reply == bytes((IAC, 254, 1, IAC, 252, 3))  # DONT echo, WONT suppress-go-ahead
    # Split across reads, subnegotiation included.
    out1, _ = f.feed(bytes((IAC, 250, 24, 1)))
    out2, _ = f.feed(bytes((IAC, 240)) + b"ok")
    assert out1 + out2 == b"ok"


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_telnet_filter_is_the_same_in_any_chunks(data: bytes, chunk: int) -> None:
    whole = TelnetFilter().feed(data)
    f = TelnetFilter()
    parts = [f.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    assert (b"".join(p[0] for p in parts), b"".join(p[1] for p in parts)) == whole
    if IAC not in data:
        assert whole == (data, b"")

"""The console's cores without a server: the state-stream view (feed.py), sessions and
the sign-in guard (session.py), the nodes table (nodes.py) over a 10,000-node inventory
in memory, and the parsers of what a browser sends, fuzzed."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootherd.config import ConfigError, build
from bootherd.storm.report import percentile
from bootherd.web.ui import feed as f
from bootherd.web.ui import nodes as table
from bootherd.web.ui.pages import _safe_next
from bootherd.web.ui.session import SessionRefused, Sessions, SignInGuard, csrf_ok, same_origin
from bootherd.web.ui.terminal import TerminalText, printable

T0 = 1_800_000_000.0
BOOT = [("PXEBOOTING", "dhcp"), ("PXEBOOTING", "tftp"), ("PXEBOOTING", "bootinfo"),
        ("BOOTING", "bootinfo"), ("TBSETUP", "tmcd"), ("ISUP", "tmcd")]


@pytest.mark.parametrize("state, source, phase", [
    (None, "", "idle"), ("", "", "idle"), ("PXEBOOTING", "dhcp", "dhcp"),
    ("PXEBOOTING", "tftp", "tftp"), ("PXEBOOTING", "bootinfo", "loader"),
    ("PXEBOOTING", "ipxe", "loader"), ("PXEWAIT", "bootinfo", "waiting"),
    ("PXEWAKEUP", "bootinfo", "waiting"), ("BOOTING", "bootinfo", "os"),
    ("TBSETUP", "tmcd", "setup"), ("ISUP", "tmcd", "up"), ("PXEFAILED", "watcher", "failed"),
    ("BOOTFAILED", "watcher", "failed"), ("SHUTDOWN", "tmcd", "down"),
    ("REBOOTING", "bootinfo", "down"), ("SOMETHING", "x", "idle")])
def test_phase_of(state, source, phase) -> None:  # noqa: ANN001
    assert f.phase_of(state, source) == phase


def _boot(core: f.FeedCore, nid: str, start: float, step: float = 0.1) -> float:
    t = start
    for state, source in BOOT:
        core.on_event(nid, state, source, t, "")
        t += step
    return t - step - start


def test_a_storm_counts_phases_and_boot_time_percentiles() -> None:
    ids = [f"pc{i}" for i in range(1, 101)]
    core = f.FeedCore(ids, {"pc1": ("ISUP", T0 - 100, "tmcd")})
    assert core.counts()["states"] == {"ISUP": 1, "UNKNOWN": 99}
    assert core.storm is None and core.tick(T0, 0.25) is not None  # the first tick is sent
    assert core.tick(T0 + 0.25, 0.25) is None  # nothing changed since
    rng = random.Random(3)
    times = []
    for i, nid in enumerate(ids):
        times.append(_boot(core, nid, T0 + i * 0.01, rng.uniform(0.05, 0.3)))
    s = core.storm
    assert s is not None and s.number == 1 and s.t0 == T0
    stats = s.stats()
    assert stats["count"] == stats["up"] == stats["started"] == 100 and stats["failed"] == 0
    for p in (50, 95, 99):
        assert stats[f"p{p}"] == pytest.approx(percentile(times, p))
    assert stats["max"] == pytest.approx(max(times))
    hist = s.histogram()
    assert sum(hist["counts"]) == 100 and len(hist["counts"]) == f.HIST_BINS
    c = core.counts()
    assert c["states"] == {"ISUP": 100}
    assert c["phases"][f.PHASES.index("up")] == 100 and sum(c["phases"]) == 100


def test_storm_samples_end_and_a_new_storm() -> None:
    core = f.FeedCore(["a", "b"], {})
    core.on_event("a", "PXEBOOTING", "dhcp", T0, "")
    t = core.tick(T0 + 0.3, 0.25)
    assert t is not None and t["storm"]["number"] == 1
    assert t["storm"]["times"] == [0.0, 0.3]  # first heard of: the samples so far
    t = core.tick(T0 + 0.6, 0.25)
    assert t["storm"]["sample"][0] == 0.6 and "times" not in t["storm"]
    assert t["storm"]["sample"][1][f.PHASES.index("dhcp")] == 1
    # Quiet: the storm ends once, with a last update, then nothing more is sent.
    end = core.tick(T0 + f.STORM_QUIET + 1, 0.25)
    assert end is not None and end["storm"]["ended"] is True
    assert core.tick(T0 + f.STORM_QUIET + 2, 0.25) is None
    core.on_event("b", "PXEBOOTING", "dhcp", T0 + 100, "")
    assert core.storm.number == 2 and core.storm.started == 1
    # A's boot began in storm 1: its ISUP in storm 2 is not one of storm 2's boot times.
    core.on_event("a", "ISUP", "tmcd", T0 + 101, "")
    assert core.storm.up == 0


def test_samples_are_halved_past_the_limit() -> None:
    core = f.FeedCore(["a"], {})
    core.on_event("a", "PXEBOOTING", "dhcp", T0, "")
    now = T0
    for _ in range(f.MAX_SAMPLES + 5):
        now += 0.25
        core.on_event("a", "PXEBOOTING", "dhcp", now, "")  # keeps the storm open
        core.tick(now, 0.25)
    s = core.storm
    assert len(s.times) <= f.MAX_SAMPLES and s.step == 0.5
    assert s.times == sorted(s.times)


def test_failures_newest_first_and_counted_in_the_storm() -> None:
    core = f.FeedCore(["a", "b"], {}, [{"node_id": "old", "ts": 1.0, "state": "PXEFAILED",
                                        "source": "watcher", "detail": "from before"}])
    core.on_event("a", "PXEBOOTING", "dhcp", T0, "")
    core.on_event("a", "BOOTFAILED", "watcher", T0 + 1, "BOOTING for 600 s")
    assert [x["node_id"] for x in core.failures] == ["a", "old"]
    assert core.failures[0]["detail"] == "BOOTING for 600 s"
    assert core.storm.failed == 1
    t = core.tick(T0 + 1.2, 0.25)
    assert t["failures"][0]["node_id"] == "a"
    assert "failures" not in (core.tick(T0 + 1.5, 0.25) or {})


def test_a_long_wait_starts_the_boot_at_the_wake() -> None:
    core = f.FeedCore(["a"], {})
    core.on_event("a", "PXEBOOTING", "dhcp", T0, "")
    core.on_event("a", "PXEWAIT", "bootinfo", T0 + 1, "not allocated")
    core.on_event("a", "PXEWAKEUP", "bootinfo", T0 + 1 + f.LONG_WAIT + 5, "AUTO")
    core.on_event("a", "ISUP", "tmcd", T0 + f.LONG_WAIT + 10, "")
    # The storm of T0 ended long before; the boot time is from the wake.
    assert core.nodes["a"].boot_start is None
    core2 = f.FeedCore(["a"], {})
    core2.on_event("a", "PXEBOOTING", "dhcp", T0, "")
    core2.on_event("a", "PXEWAIT", "bootinfo", T0 + 1, "")
    core2.on_event("a", "PXEWAKEUP", "bootinfo", T0 + 3, "AUTO")
    core2.on_event("a", "ISUP", "tmcd", T0 + 4, "")
    assert core2.storm.boot_times == [4.0]  # a short wait is part of the boot


EVENTS = st.lists(st.tuples(st.sampled_from(["n1", "n2", "n3", "ghost"]),
                            st.sampled_from(["PXEBOOTING", "PXEWAIT", "PXEWAKEUP", "BOOTING",
                                             "TBSETUP", "ISUP", "PXEFAILED", "SHUTDOWN", "X"]),
                            st.sampled_from(["dhcp", "tftp", "bootinfo", "tmcd", "watcher"]),
                            st.floats(0, 100)), max_size=60)


@given(EVENTS, st.booleans())
def test_counts_always_match_the_nodes(events, resync) -> None:  # noqa: ANN001
    core = f.FeedCore(["n1", "n2", "n3"], {"n2": ("ISUP", 0.0, "tmcd")})
    now = T0
    for i, (nid, state, source, dt) in enumerate(events):
        now += dt
        core.on_event(nid, state, source, now, "")
        if resync and i == len(events) // 2:
            core.resync(["n1", "n3", "n4"])
        core.tick(now, 0.25)
    phases = [0] * len(f.PHASES)
    states: dict[str, int] = {}
    for v in core.nodes.values():
        phases[f.PHASES.index(v.phase)] += 1
        states[v.state or "UNKNOWN"] = states.get(v.state or "UNKNOWN", 0) + 1
    assert core.phase_counts == phases
    assert core.counts()["states"] == states
    if core.storm is not None:
        assert core.storm.boot_times == sorted(core.storm.boot_times)
        assert core.storm.up <= core.storm.started + len(core.nodes)


def test_a_console_that_stops_reading_is_dropped() -> None:
    async def run() -> None:
        sub = f.Subscriber(None)
        for _ in range(f.MAX_PENDING):
            sub.push(b"x")
        assert not sub.dropped
        assert await sub.next(1) == b"x" * f.MAX_PENDING
        for _ in range(f.MAX_PENDING + 1):
            sub.push(b"y")
        assert sub.dropped and await sub.next(1) is None
        quiet = f.Subscriber(None)
        assert await quiet.next(0.01) == b""  # nothing: a keepalive is due
    asyncio.run(run())


# -- sessions ----------------------------------------------------------------------------

def test_sessions_expire_end_and_refuse_strangers() -> None:
    s = Sessions(lifetime=100, max_sessions=3)
    a = s.create(T0, "127.0.0.1")
    assert s.check(a.sid, T0 + 99) is a
    assert a.sid != a.csrf and len(a.sid) >= 40
    with pytest.raises(SessionRefused) as e:
        s.check(a.sid, T0 + 100)
    assert e.value.kind == "expired"
    with pytest.raises(SessionRefused) as e:
        s.check(a.sid, T0 + 101)
    assert e.value.kind == "expired"  # remembered as ended, not called forged
    b = s.create(T0, "")
    s.end(b.sid, T0 + 1)
    with pytest.raises(SessionRefused) as e:
        s.check(b.sid, T0 + 2)
    assert e.value.kind == "expired"
    for kind, sid in (("missing", None), ("missing", ""), ("unknown", "forged" * 7)):
        with pytest.raises(SessionRefused) as e:
            s.check(sid, T0)
        assert e.value.kind == kind
    olds = [s.create(T0 + i, "") for i in range(5)]  # past max_sessions: oldest go first
    assert len(s) == 3
    with pytest.raises(SessionRefused):
        s.check(olds[0].sid, T0 + 10)
    assert s.check(olds[-1].sid, T0 + 10)
    assert csrf_ok(olds[-1], olds[-1].csrf) and not csrf_ok(olds[-1], "")
    assert not csrf_ok(olds[-1], olds[-2].csrf) and not csrf_ok(olds[-1], None)


def test_sign_in_guard() -> None:
    g = SignInGuard(limit=3, window=60)
    for i in range(3):
        assert g.retry_after("a", T0 + i) == 0
        g.failed("a", T0 + i)
    assert g.retry_after("a", T0 + 3) == pytest.approx(57)
    assert g.retry_after("b", T0 + 3) == 0  # per address
    assert g.retry_after("a", T0 + 61) == 0  # the first failure has aged out
    g.succeeded("a")
    assert g.retry_after("a", T0 + 61) == 0


@pytest.mark.parametrize("headers, refused", [
    ({}, False), ({"Origin": "http://h:1"}, False), ({"Origin": "http://evil"}, True),
    ({"Origin": "null"}, True), ({"Origin": "https://h:1"}, True),
    ({"Sec-Fetch-Site": "same-origin"}, False), ({"Sec-Fetch-Site": "cross-site"}, True),
    ({"Sec-Fetch-Site": "same-site"}, True), ({"Sec-Fetch-Site": "none"}, False),
    ({"Referer": "http://h:1/ui/nodes/a"}, False), ({"Referer": "http://h:10/"}, True),
    ({"Referer": "http://h:1.evil/"}, True)])
def test_same_origin(headers, refused) -> None:  # noqa: ANN001
    assert (same_origin(headers, "h:1", "http") is not None) is refused


@given(st.dictionaries(st.sampled_from(["Origin", "Sec-Fetch-Site", "Referer", "X"]),
                       st.text(max_size=40)), st.text(max_size=20))
def test_same_origin_never_raises(headers, host) -> None:  # noqa: ANN001
    why = same_origin(headers, host, "http")
    assert why is None or isinstance(why, str)


@given(st.text(max_size=80))
def test_sign_in_goes_only_to_console_pages(target) -> None:  # noqa: ANN001
    out = _safe_next(target)
    assert out.startswith("/ui/") and not out.startswith("//")
    assert not any(c in out for c in "\r\n\\")


@given(st.text(max_size=50))
def test_session_check_on_any_cookie(sid) -> None:  # noqa: ANN001
    s = Sessions(100)
    s.create(T0)
    with pytest.raises(SessionRefused):
        s.check(sid, T0)


# -- the nodes table ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big(memory_snapshot):  # noqa: ANN001, ANN201
    """10,000 nodes: the 20 of the generated testbed copied under new names and addresses
    (building a 10,000-node testbed from text would take most of a minute)."""
    base = list(memory_snapshot.nodes.values())
    rng = random.Random(1)
    nodes = {}
    for i in range(1, 10_001):
        n = base[i % len(base)]
        ctrl = dataclasses.replace(n.control, ip=f"10.80.{i // 250}.{i % 250 + 2}",
                                   mac=f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
                                   node_id=f"pc{i}")
        nodes[f"pc{i}"] = dataclasses.replace(n, node_id=f"pc{i}", interfaces=(ctrl,))
    exp_nodes: dict = {}
    for nid, n in nodes.items():
        if n.allocation:
            exp_nodes.setdefault((n.allocation.pid, n.allocation.eid), []).append(nid)
    snap = dataclasses.replace(memory_snapshot, nodes=nodes,
                               experiment_nodes={k: tuple(v) for k, v in exp_nodes.items()})
    views = {}
    for nid in snap.nodes:
        state, source = rng.choice(BOOT + [("PXEWAIT", "bootinfo"), ("", "")])
        v = f.NodeView(state=state, since=T0 - rng.uniform(0, 1000) if state else None,
                       source=source, ts=T0 - rng.uniform(0, 10), phase=f.phase_of(state, source))
        views[nid] = v
    return snap, views


def test_nodes_table_pages_filters_and_sorts_10000_nodes(big) -> None:  # noqa: ANN001
    snap, views = big
    res = table.run(snap, views, table.Query(per_page=100, page=3), T0)
    assert res["total"] == res["matched"] == 10_000 and res["pages"] == 100
    assert [r["node_id"] for r in res["rows"]] == table.natural_order(snap)[200:300]
    waiting = table.run(snap, views, table.Query(state="PXEWAIT", sort="since", per_page=500), T0)
    want = sorted((v.since, n) for n, v in views.items() if v.state == "PXEWAIT")
    assert waiting["matched"] == len(want)
    assert [r["node_id"] for r in waiting["rows"]] == [n for _, n in want[:500]]
    unknown = table.run(snap, views, table.Query(state="UNKNOWN", per_page=25), T0)
    assert unknown["matched"] == sum(1 for v in views.values() if not v.state)
    up = table.run(snap, views, table.Query(phase="up", sort="last", desc=True), T0)
    ts = [r["last_ts"] for r in up["rows"]]
    assert ts == sorted(ts)  # desc of "newest first" is oldest first
    one = table.run(snap, views, table.Query(q="PC1234"), T0)
    assert [r["node_id"] for r in one["rows"]] == ["pc1234"]
    exp = next(iter(snap.experiments))
    inexp = table.run(snap, views, table.Query(experiment=f"{exp[0]}/{exp[1]}", sort="experiment",
                                               per_page=500), T0)
    assert inexp["matched"] == len(snap.experiment_nodes[exp])
    last = table.run(snap, views, table.Query(page=10_000, per_page=250), T0)
    assert last["page"] == 40 and len(last["rows"]) == 250  # past the end: the last page
    by_ip = table.run(snap, views, table.Query(sort="ip", per_page=25), T0)
    assert by_ip["rows"][0]["ip"] == "10.80.0.3"  # pc1


@pytest.mark.parametrize("args, message", [
    ({"sort": "nope"}, "sort must be one of"), ({"page": "x"}, "whole numbers"),
    ({"page": "0"}, "page must be 1 or more"), ({"per_page": "7"}, "per_page must be"),
    ({"phase": "boiling"}, "phase must be one of")])
def test_bad_table_queries_are_named(args, message) -> None:  # noqa: ANN001
    with pytest.raises(table.BadQuery, match=message):
        table.Query.parse(args)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["q", "state", "phase", "experiment", "sort", "desc",
                                        "page", "per_page", "other"]), st.text(max_size=30)))
def test_any_table_query_parses_or_is_refused(memory_snapshot, args) -> None:  # noqa: ANN001
    try:
        q = table.Query.parse(args)
    except table.BadQuery:
        return
    res = table.run(memory_snapshot, {}, q, T0)
    assert len(res["rows"]) <= q.per_page and 1 <= res["page"] <= res["pages"]
    assert table.Query.parse(q.args()) == q  # links carry the query unchanged


@pytest.mark.parametrize("key, value", [("update_interval", 0.01), ("update_interval", "soon"),
                                        ("session_lifetime", 5), ("read_only", "maybe"),
                                        ("enabled", 3)])
def test_bad_console_keys_are_refused_by_name(key, value) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=f"ui.{key}"):
        build({"ui": {key: value}})


# -- a serial console as text ---------------------------------------------------------------

def test_console_text_drops_what_is_meant_for_a_terminal() -> None:
    t = TerminalText()
    # GRUB's menu, systemd's colours, a title, a bell, a backspace, CR LF and a lone CR.
    assert t.feed(b"\x1b[2J\x1b[1;1HGNU GRUB\r\n[\x1b[0;32m  OK  \x1b[0m] Started\x07 x\x08y") \
        == "GNU GRUB\n[  OK  ] Started xy"
    assert t.feed(b"\x1b]0;node: ~\x07login: \r") == "login: "
    assert t.feed(b"\n10%\r20%\r\n") == "\n10%\n20%\n"
    assert t.feed(b"ok\r\r") + t.feed(b"\nnext") == "ok\nnext"  # a pty's CR CR LF
    assert t.feed(b"\r\x1b") + t.feed(b"[0m\n") == "\n"
    # Cut inside an escape sequence and inside a UTF-8 character: nothing shown half.
    assert t.feed(b"a\x1b[1;3") == "a"
    assert t.feed(b"1mb \xe2\x82") == "b "
    assert t.feed(b"\xac\x1b") == "\u20ac"
    assert t.feed(b"(Bc") == "c"
    assert t.flush() == ""
    assert printable(b"\xff\xfeok\x1b") == "\ufffd\ufffdok"


CONSOLE_BYTES = st.lists(st.sampled_from(
    [b"\x1b", b"[", b"]", b"1", b";", b"m", b"H", b"\x07", b"\\", b"\r", b"\n", b"\t", b"a",
     b"\xe2", b"\x82", b"\xac", b"\xff", b"\x00", b"\x9b", b"(", b"B", b"?", b"25", b"l"]),
    max_size=60).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(CONSOLE_BYTES, st.lists(st.integers(0, 60), max_size=8))
def test_console_text_is_the_same_however_the_output_is_cut(data: bytes, cuts: list[int]) -> None:
    """Any bytes give text without escapes or control characters (tab and newline
    kept), and the same text whether the output came in one chunk or many."""
    whole = printable(data)
    t, parts, last = TerminalText(), [], 0
    for c in sorted(c for c in cuts if c <= len(data)):
        parts.append(t.feed(data[last:c]))
        last = c
    parts += [t.feed(data[last:]), t.flush()]
    assert "".join(parts) == whole
    assert not [ch for ch in whole if (ord(ch) < 32 and ch not in "\n\t") or 0x7f <= ord(ch) <= 0x9f]

"""The node lifecycle, specified: one test per rule of `bootherd.lifecycle.core`.

No sockets, no database, no clock: every call takes `now` (plain numbers here)
and returns effects as data, which the tests read.  The inventory is an
in-memory snapshot of a generated testbed (tests/memsnap.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from memsnap import DISK, MFS, node, snapshot

from bootherd.boottype import BootType
from bootherd.config import build
from bootherd.lifecycle import (
    Candidate,
    ClearNextOS,
    Coordinator,
    Record,
    RecordState,
    Remember,
    SendOrder,
    Stuck,
    Via,
    reply_state,
)
from bootherd.states import State, allowed

CFG = build({"states": {"pxewakeup_timeout": 20.0, "pxewakeup_retries": 2,
                        "booting_timeout": 600.0, "event_window": 10.0}})


def coordinator(server: str = "A") -> Coordinator:
    lc = Coordinator(CFG, server)
    lc.orders_up = True  # a bootinfo transport runs in this process
    return lc


def states(effects: list) -> list[tuple[str, str]]:
    return [(e.node_id, e.state) for e in effects if isinstance(e, RecordState)]


def of(effects: list, kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


# -- the vocabulary ---------------------------------------------------------------------

def test_answer_to_state_mapping():
    assert reply_state(BootType.WAIT) is State.PXEWAIT
    assert reply_state(BootType.REBOOT) is State.REBOOTING
    assert reply_state(BootType.AUTO) is State.PXEBOOTING
    for t in (BootType.PART, BootType.MB, BootType.MFS, BootType.SYSID, BootType.DISKPART):
        assert reply_state(t) is State.BOOTING


def test_transitions_a_healthy_boot_makes():
    assert allowed(None, State.BOOTING)
    assert allowed(State.ISUP, State.PXEBOOTING)  # a power cycle can happen any time
    assert allowed(State.PXEWAIT, State.PXEWAKEUP) and allowed(State.PXEWAKEUP, State.PXEFAILED)
    assert not allowed(State.PXEWAIT, State.ISUP) and not allowed("NONSENSE", State.ISUP)


# -- the boot decision ---------------------------------------------------------------------

def test_a_question_gets_the_policy_answer_and_records_pxebooting_then_its_state():
    lc, n = coordinator(), node(1)
    ans = lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=100.0)
    assert (ans.decision.type, ans.decision.partition) == (BootType.PART, 1)
    assert list(ans.effects) == [RecordState("pc1", State.PXEBOOTING, "bootinfo", "", 100.0),
                                 RecordState("pc1", State.BOOTING, "bootinfo", DISK, 100.0)]
    assert lc.states["pc1"] == (State.BOOTING, 100.0)


def test_an_unknown_node_gets_the_policy_answer_and_leaves_no_memory():
    lc = coordinator()
    ans = lc.boot_question(snapshot(), None, Via.BOOTINFO, now=1.0)
    assert (ans.decision.type, ans.decision.image) == (BootType.MFS, "NEWNODE-MFS")
    assert ans.effects == ()
    assert not lc.life and not lc.states and not lc.waiting


def test_one_shot_next_os_is_served_once_and_cleared():
    lc, n = coordinator(), node(1, next_os=MFS)
    snap = snapshot(n)
    first = lc.boot_question(snap, n, Via.BOOTINFO, now=1.0)
    assert first.decision.type is BootType.MFS
    assert of(list(first.effects), ClearNextOS) == [ClearNextOS("pc1", MFS)]
    # The snapshot still shows next_os until the clearing reaches it: not served again.
    second = lc.boot_question(snap, n, Via.IPXE, now=2.0)
    assert second.decision.type is BootType.PART and not of(list(second.effects), ClearNextOS)


def test_a_served_next_os_is_forgotten_once_the_snapshot_shows_it_cleared():
    lc, n = coordinator(), node(1, next_os=MFS)
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=1.0)
    cleared = replace(n, next_os=None)
    lc.inventory_changed(snapshot(n), snapshot(cleared, generation=2), now=2.0)
    # An operator sets the same one-shot OS again: it is served again.
    assert lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=3.0).decision.type is BootType.MFS


def test_tmcd_bootwhat_is_a_query_that_consumes_nothing():
    lc, n = coordinator(), node(1, next_os=MFS)
    snap = snapshot(n)
    assert lc.bootwhat(snap, n).type is BootType.MFS
    assert lc.bootwhat(snap, n).type is BootType.MFS
    assert not lc.states and "pc1" not in lc.life
    assert lc.boot_question(snap, n, Via.BOOTINFO, now=1.0).decision.type is BootType.MFS
    assert lc.bootwhat(snap, n).type is BootType.PART  # served meanwhile


# -- the waiting set ------------------------------------------------------------------------

def test_a_wait_answer_remembers_how_the_node_waits_in_the_inventory():
    lc, a, b = coordinator("A"), node(1, allocated=False), node(2, allocated=False)
    fa = lc.boot_question(snapshot(a, b), a, Via.BOOTINFO, now=5.0).effects
    lc.boot_question(snapshot(a, b), b, Via.IPXE, now=5.0)
    assert lc.waiting == {"pc1": Via.BOOTINFO, "pc2": Via.IPXE}
    assert of(list(fa), Remember) == [Remember("pc1", {"wait_via": "bootinfo",
                                                       "wait_server": "A", "wait_ts": 5.0}, 5.0)]
    assert states(list(fa))[-1] == ("pc1", State.PXEWAIT)


def test_any_other_answer_ends_the_wait():
    lc, n = coordinator(), node(1, allocated=False)
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=1.0)
    up = replace(n, allocation=node(1).allocation)
    fx = lc.boot_question(snapshot(up), up, Via.BOOTINFO, now=2.0).effects
    assert "pc1" not in lc.waiting
    assert Remember("pc1", {"wait_via": ""}, 2.0) in fx


def test_a_node_that_never_waited_costs_no_lifecycle_write():
    lc, n = coordinator(), node(1)
    assert not of(list(lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=1.0).effects), Remember)


def test_auto_wake_orders_a_loader_told_wait_once_its_node_is_allocated():
    lc, n = coordinator(), node(1, allocated=False)
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=1.0)
    up = snapshot(replace(n, allocation=node(1).allocation), generation=2)
    cands = lc.inventory_changed(snapshot(n), up, now=2.0)
    assert cands == [Candidate("pc1", "wake", State.PXEWAIT, 1.0)]
    assert "pc1" not in lc.waiting  # a second change does not wake it twice
    fx = lc.resolve(cands, {}, up, now=2.1)
    assert of(fx, SendOrder) == [SendOrder("pc1", node(1).control_ip, BootType.AUTO, False, "wake")]
    assert states(fx) == [("pc1", State.PXEWAKEUP)]


def test_auto_wake_when_the_boot_os_changes_not_for_unrelated_changes():
    lc, n = coordinator(), node(1, default_os=None)  # allocated, nothing to boot: WAIT
    assert lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=1.0).decision.type is BootType.WAIT
    assert lc.inventory_changed(snapshot(n), snapshot(replace(n, boot_cmdline="x")), 2.0) == []
    assert [c.node_id for c in lc.inventory_changed(
        snapshot(n), snapshot(replace(n, default_os=DISK)), 3.0)] == ["pc1"]


def test_ipxe_waiters_poll_by_themselves_and_are_never_ordered():
    lc, n = coordinator(), node(1, allocated=False)
    lc.boot_question(snapshot(n), n, Via.IPXE, now=1.0)
    up = snapshot(replace(n, allocation=node(1).allocation))
    assert lc.inventory_changed(snapshot(n), up, now=2.0) == []


def test_no_wake_without_an_order_channel_in_this_process():
    lc, n = coordinator(), node(1, allocated=False)
    lc.orders_up = False
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=1.0)
    up = snapshot(replace(n, allocation=node(1).allocation))
    assert lc.resolve(lc.inventory_changed(snapshot(n), up, 2.0), {}, up, 2.0) == []


# -- orders -----------------------------------------------------------------------------------

def test_an_order_goes_out_moves_the_node_to_pxewakeup_and_is_remembered():
    lc, n = coordinator("A"), node(1)
    fx = lc.order(n, "reboot", now=7.0)
    assert fx == [SendOrder("pc1", node(1).control_ip, BootType.REBOOT, False, "operator"),
                  RecordState("pc1", State.PXEWAKEUP, "bootinfo", "REBOOT", 7.0),
                  Remember("pc1", {"order_kind": "REBOOT", "order_resends": 0,
                                   "order_server": "A", "order_ts": 7.0, "wait_via": ""}, 7.0)]


def test_a_resend_repeats_the_last_order_and_counts_a_try():
    lc, n = coordinator(), node(1)
    lc.order(n, BootType.RESTART, now=1.0)
    fx = lc.order(n, None, now=30.0, resend=True, cause="recovery")
    assert of(fx, SendOrder)[0].kind is BootType.RESTART and of(fx, SendOrder)[0].resend
    assert states(fx) == [("pc1", State.PXEWAKEUP)] and fx[1].detail == "re-sent RESTART"
    assert lc.life["pc1"].tries == 1
    assert lc.order(n, None, now=40.0)[0].kind is BootType.AUTO  # a fresh order: AUTO
    assert lc.life["pc1"].tries == 0


def test_only_loader_orders_and_nodes_with_a_control_address():
    lc, n = coordinator(), node(1)
    for bad in (BootType.PART, "BOGUS", 99):
        with pytest.raises(ValueError, match="AUTO, REBOOT or RESTART"):
            lc.order(n, bad, now=1.0)
    with pytest.raises(ValueError, match="no control IP"):
        lc.order(replace(n, interfaces=()), "AUTO", now=1.0)


# -- one de-duplication of events ---------------------------------------------------------------

def test_the_same_answer_within_the_window_records_nothing():
    lc, n = coordinator(), node(1)
    snap = snapshot(n)
    assert states(list(lc.boot_question(snap, n, Via.BOOTINFO, 100.0).effects))
    assert lc.boot_question(snap, n, Via.BOOTINFO, 105.0).effects == ()  # a loader's retry
    assert states(list(lc.boot_question(snap, n, Via.BOOTINFO, 111.0).effects))  # window over


def test_a_repeat_is_recorded_when_the_node_moved_on_or_the_answer_changed():
    lc, n = coordinator(), node(1, allocated=False)
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, 100.0)
    lc.order(n, "AUTO", 101.0)  # woken meanwhile: PXEWAKEUP
    assert states(list(lc.boot_question(snapshot(n), n, Via.BOOTINFO, 102.0).effects)) == \
        [("pc1", State.PXEBOOTING), ("pc1", State.PXEWAIT)]
    up = replace(n, allocation=node(1).allocation)
    assert states(list(lc.boot_question(snapshot(up), up, Via.BOOTINFO, 103.0).effects))[-1] \
        == ("pc1", State.BOOTING)


def test_dhcp_acks_record_one_pxebooting_per_window():
    lc = coordinator()
    assert lc.dhcp_acked("pc1", 10.0) == [RecordState("pc1", State.PXEBOOTING, "dhcp", "", 10.0)]
    assert lc.dhcp_acked("pc1", 12.0) == []  # the REQUEST after the DISCOVER, a renewal
    assert lc.dhcp_acked("pc2", 12.0)
    assert lc.dhcp_acked("pc1", 20.5)


def test_loader_fetches_are_history_one_per_window_never_a_state_change():
    lc = coordinator()
    assert lc.loader_fetched("pc1", "/tftpboot/pxeboot.emu", 4096, 1.0) == \
        [RecordState("pc1", State.PXEBOOTING, "tftp", "loaded pxeboot.emu (4096 bytes)", 1.0,
                     moves=False)]
    assert "pc1" not in lc.states  # a fetch is not a state of its own
    assert lc.loader_fetched("pc1", "/tftpboot/other", 10, 2.0) == []  # the loader's 2nd file
    lc.state_reported("pc2", State.BOOTING, 3.0, "bootinfo")
    # A transfer reported late (the node went on meanwhile, maybe to another server)
    # names the state this server knows, and changes nothing.
    assert states(lc.loader_fetched("pc2", "kernel", 1, 4.0)) == [("pc2", State.BOOTING)]
    assert lc.states["pc2"] == (State.BOOTING, 3.0)


def test_a_state_the_node_reports_is_always_recorded():
    lc = coordinator()
    for t in (1.0, 1.1):
        assert lc.state_reported("pc1", State.ISUP, t) == \
            [RecordState("pc1", State.ISUP, "tmcd", "", t)]


# -- the watcher ------------------------------------------------------------------------------

def test_tick_lists_nodes_longer_in_a_state_than_it_may_last():
    lc = coordinator()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    lc.state_reported("pc2", State.TBSETUP, 500.0)
    lc.state_reported("pc3", State.ISUP, 0.0)  # not a state that times out
    lc.order(node(4), "AUTO", 0.0)
    assert lc.tick(15.0) == []
    assert lc.tick(601.0) == [Candidate("pc1", "stuck", State.BOOTING, 0.0),
                              Candidate("pc4", "stuck", State.PXEWAKEUP, 0.0)]


def test_stuck_in_pxewakeup_the_order_is_resent_retries_times_then_pxefailed():
    lc, n = coordinator(), node(1)
    snap = snapshot(n)
    lc.order(n, "REBOOT", 0.0)
    t = 0.0
    for attempt in (1, 2):
        t += 21
        fx = lc.resolve(lc.tick(t), {}, snap, t)
        assert of(fx, SendOrder) == [SendOrder("pc1", node(1).control_ip, BootType.REBOOT, True,
                                               "recovery")]
        assert lc.life["pc1"].tries == attempt
    t += 21
    fx = lc.resolve(lc.tick(t), {}, snap, t)
    assert fx == [RecordState("pc1", State.PXEFAILED, "watcher", "no answer to 3 orders", t)]
    assert lc.tick(t + 1000) == []  # failed is final for the watcher


def test_booting_or_tbsetup_too_long_is_bootfailed():
    lc = coordinator()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    lc.state_reported("pc2", State.TBSETUP, 0.0)
    fx = lc.resolve(lc.tick(700.0), {}, snapshot(node(1), node(2)), 700.0)
    assert fx == [RecordState("pc1", State.BOOTFAILED, "watcher", "BOOTING for 700 s", 700.0),
                  RecordState("pc2", State.BOOTFAILED, "watcher", "TBSETUP for 700 s", 700.0)]


def test_progress_gives_a_fresh_recovery_budget():
    lc, n = coordinator(), node(1)
    lc.order(n, "AUTO", 0.0)
    lc.resolve(lc.tick(21.0), {}, snapshot(n), 21.0)
    assert lc.life["pc1"].tries == 1
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, 22.0)  # it asked again
    assert lc.life["pc1"].tries == 0


def test_without_an_order_channel_a_stuck_wakeup_is_neither_resent_nor_failed():
    lc, n = coordinator(), node(1)
    lc.order(n, "AUTO", 0.0)
    lc.orders_up = False
    assert lc.resolve(lc.tick(21.0), {}, snapshot(n), 21.0) == []


def test_a_candidate_that_moved_on_before_it_was_resolved_is_left():
    lc, n = coordinator(), node(1)
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    cands = lc.tick(700.0)
    lc.state_reported("pc1", State.ISUP, 700.5)
    assert lc.resolve(cands, {}, snapshot(n), 701.0) == []


# -- several servers on one inventory ------------------------------------------------------------

def test_a_newer_state_another_server_recorded_is_taken_in_not_timed_out():
    lc = coordinator("A")
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    rec = {"pc1": Record(State.TBSETUP, 300.0, "B", True)}
    assert lc.resolve(lc.tick(700.0), rec, snapshot(node(1)), 700.0) == []
    assert lc.states["pc1"] == (State.TBSETUP, 300.0)  # times out at 900 if still there


def test_a_node_another_live_server_handles_is_left_to_it():
    lc, n = coordinator("A"), node(1)
    lc.order(n, "AUTO", 0.0)
    rec = {"pc1": Record(State.PXEWAKEUP, 0.0, "B", True)}
    assert lc.resolve(lc.tick(21.0), rec, snapshot(n), 21.0) == []
    # Deferred for the state's timeout: no new candidate (no database read) meanwhile.
    assert lc.tick(30.0) == []
    assert lc.tick(42.0) == [Candidate("pc1", "stuck", State.PXEWAKEUP, 0.0)]


def test_the_nodes_of_a_server_that_is_gone_are_taken_over():
    lc, n = coordinator("A"), node(1)
    lc.order(n, "AUTO", 0.0)
    rec = {"pc1": Record(State.PXEWAKEUP, 0.0, "B", False)}
    assert of(lc.resolve(lc.tick(21.0), rec, snapshot(n), 21.0), SendOrder)


def test_no_wake_for_a_node_that_spoke_to_another_server_since_it_was_told_wait():
    lc, n = coordinator("A"), node(1, allocated=False)
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=1.0)
    up = snapshot(replace(n, allocation=node(1).allocation))
    cands = lc.inventory_changed(snapshot(n), up, 5.0)
    assert lc.resolve(cands, {"pc1": Record(State.BOOTING, 3.0, "B", True)}, up, 5.0) == []


def test_no_wake_for_a_node_that_booted_here_while_the_inventory_was_asked():
    # The confirmation of a wake waits for the database (seconds, when it just came
    # back); a node that asked again meanwhile and booted must not be ordered, and its
    # newer state must stay the one this server holds.
    lc, n = coordinator("A"), node(1, allocated=False)
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=1.0)
    up = snapshot(replace(n, allocation=node(1).allocation))
    cands = lc.inventory_changed(snapshot(n), up, 5.0)
    lc.boot_question(up, up.nodes["pc1"], Via.BOOTINFO, now=5.5)
    lc.state_reported("pc1", State.ISUP, now=6.0)
    assert lc.resolve(cands, {"pc1": Record(State.PXEWAIT, 1.0, "A", True)}, up, 6.1) == []
    assert lc.states["pc1"] == (State.ISUP, 6.0)


def test_wake_when_our_wait_is_the_newest_contact():
    lc, n = coordinator("A"), node(1, allocated=False)
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=4.0)
    up = snapshot(replace(n, allocation=node(1).allocation))
    cands = lc.inventory_changed(snapshot(n), up, 5.0)
    fx = lc.resolve(cands, {"pc1": Record(State.PXEWAIT, 3.0, "B", True)}, up, 5.0)
    assert of(fx, SendOrder)


# -- TMCD's configuration digest -------------------------------------------------------------------

def test_isalive_with_nothing_known_takes_what_the_node_holds_as_current():
    lc = coordinator()
    assert not lc.config_outdated("pc1", "d1")
    assert lc.config_seen("pc1", "d1", 1.0, fetched=False) == \
        [Remember("pc1", {"config_digest": "d1"}, 1.0)]
    assert lc.config_outdated("pc1", "d2")  # changed since: UPDATE=1
    assert lc.config_seen("pc1", "d2", 2.0, fetched=False) == []  # isalive does not refresh it


def test_a_fetched_configuration_is_current_until_it_changes():
    lc = coordinator()
    lc.config_seen("pc1", "d1", 1.0, fetched=True)
    assert not lc.config_outdated("pc1", "d1") and lc.config_outdated("pc1", "d2")
    assert lc.config_seen("pc1", "d2", 2.0, fetched=True) == \
        [Remember("pc1", {"config_digest": "d2"}, 2.0)]
    assert lc.config_seen("pc1", "d2", 3.0, fetched=True) == []  # no write for no change


# -- memory that survives a restart -------------------------------------------------------------------

def test_a_restored_wait_another_server_told_is_left_to_that_server():
    lc, n = coordinator("A"), node(1, allocated=False)
    lc.restore([{"node_id": "pc1", "wait_via": "bootinfo", "wait_server": "B", "wait_ts": 5.0}])
    up = snapshot(replace(n, allocation=node(1).allocation))
    cands = lc.inventory_changed(snapshot(n), up, 9.0)
    assert lc.resolve(cands, {"pc1": Record(State.PXEWAIT, 5.0, "B", True)}, up, 9.0) == []
    lc.restore([{"node_id": "pc1", "wait_via": "bootinfo", "wait_server": "B", "wait_ts": 5.0}])
    cands = lc.inventory_changed(snapshot(n), up, 9.0)  # B is gone: A takes it over
    assert of(lc.resolve(cands, {"pc1": Record(State.PXEWAIT, 5.0, "B", False)}, up, 9.0),
              SendOrder)


def test_restore_brings_back_the_wait_the_order_and_the_digest():
    lc = coordinator()
    lc.restore([{"node_id": "pc1", "wait_via": "bootinfo", "wait_ts": 5.0, "order_kind": "",
                 "order_resends": 0, "order_ts": 0.0, "config_digest": ""},
                {"node_id": "pc2", "wait_via": "", "wait_ts": 0.0, "order_kind": "REBOOT",
                 "order_resends": 1, "order_ts": 9.0, "config_digest": "d9"}])
    assert lc.waiting == {"pc1": Via.BOOTINFO} and lc.life["pc1"].told_at == 5.0
    assert (lc.life["pc2"].order, lc.life["pc2"].tries) == (BootType.REBOOT, 1)
    assert lc.config_outdated("pc2", "d10")
    assert lc.order(node(2), None, 10.0, resend=True)[0].kind is BootType.REBOOT


# -- the extension point: a recovery policy is one more actor ---------------------------------------

@dataclass(frozen=True)
class PowerCycle:
    """An actor's own effect type (a power driver would execute it)."""

    node_id: str


class CycleThenGiveUp:
    """A recovery policy other than the default, as issue 19's ladder plugs in."""

    timeouts = {State.BOOTING: 60.0}
    retry_states = frozenset({State.BOOTING})

    def recover(self, stuck: Stuck, lc: Coordinator, now: float) -> list:
        if stuck.life.tries < 1:
            stuck.life.tries += 1
            return [PowerCycle(stuck.node_id),
                    *lc.record(stuck.node_id, State.BOOTING, "recovery", "power cycle", now)]
        return lc.record(stuck.node_id, State.BOOTFAILED, "recovery", "gave up", now)


def test_a_recovery_policy_replaces_the_remedy_with_its_own_actors_effects():
    lc = Coordinator(CFG, "A", recovery=CycleThenGiveUp())
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    snap = snapshot(node(1))
    assert lc.resolve(lc.tick(61.0), {}, snap, 61.0)[0] == PowerCycle("pc1")
    assert states(lc.resolve(lc.tick(122.0), {}, snap, 122.0)) == [("pc1", State.BOOTFAILED)]

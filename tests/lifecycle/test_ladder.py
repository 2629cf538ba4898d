"""The recovery ladder, specified: one test per rule of `bootherd.lifecycle.ladder`.

Sans-IO like the coordinator's tests: the ladder is the coordinator's recovery
policy, every call takes `now` (plain numbers) and returns effects as data; the
actors' reports (`power_done`, `ipod_done`) are plain calls with the outcome.
"""

from __future__ import annotations

import pytest
from memsnap import node, snapshot

from bootherd.boottype import BootType
from bootherd.config import build
from bootherd.lifecycle import (
    Candidate,
    Coordinator,
    Ladder,
    PowerCycle,
    Record,
    RecordState,
    Remember,
    SendIpod,
    SendOrder,
    Via,
)
from bootherd.states import State

CFG = build({"states": {"pxewakeup_timeout": 20.0, "pxewakeup_retries": 2,
                        "booting_timeout": 600.0, "event_window": 10.0},
             "recovery": {"reboot_timeout": 300.0, "power_cycles": 2, "bmc_retries": 2,
                          "bmc_retry_interval": 60.0, "operator_hold": 600.0},
             "power": {"timeout": 20.0}})


def ladder(server: str = "A") -> Coordinator:
    lc = Coordinator(CFG, server, recovery=Ladder.from_config(CFG))
    lc.orders_up = True
    return lc


def bmc(driver: str = "ipmi", **kw: object) -> Record:
    """The inventory's record of a node whose state is what this server knows."""
    return Record(None, 0.0, "", False, power_driver=driver, **kw)


def of(effects: list, kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


def moves(effects: list) -> list[tuple[str, str]]:
    return [(e.node_id, e.state) for e in effects if isinstance(e, RecordState) and e.moves]


def notes(effects: list) -> list[str]:
    return [e.state for e in effects if isinstance(e, RecordState) and not e.moves]


def step(lc: Coordinator, t: float, recs: dict | None = None, *nodes) -> list:  # noqa: ANN002
    """One watcher pass at `t`, every candidate confirmed with an IPMI BMC."""
    cands = lc.tick(t)
    recs = recs if recs is not None else {c.node_id: bmc() for c in cands}
    return lc.resolve(cands, recs, snapshot(*(nodes or (node(1),))), t)


def test_a_hung_kernel_is_power_cycled_with_a_pxe_boot_and_the_episode_ends_at_isup():
    lc = ladder()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    fx = step(lc, 601.0)
    (cycle,) = of(fx, PowerCycle)
    assert (cycle.node_id, cycle.attempt, cycle.fail_state) == ("pc1", 1, State.BOOTFAILED)
    assert "power cycle 1 of 2: in BOOTING for 601 s" == cycle.reason
    assert moves(fx) == [("pc1", State.REBOOTING)]
    assert Remember("pc1", {"power_cycles": 1}, 601.0) in fx
    # Queued or in flight: not a candidate again until the BMC answered.
    assert lc.tick(650.0) == []
    assert lc.recovery.power_done(cycle, True, "", "power cycle accepted", lc, 602.0) == []
    # It boots: PXEBOOTING is progress, but the episode (the cycle count) lasts until ISUP.
    lc.state_reported("pc1", State.PXEBOOTING, 640.0, "bootinfo")
    assert lc.life["pc1"].cycles == 1
    fx = lc.state_reported("pc1", State.ISUP, 700.0)
    assert Remember("pc1", {"power_cycles": 0}, 700.0) in fx
    assert lc.life["pc1"].cycles == 0


def test_no_boot_contact_after_a_cycle_is_the_next_cycle_then_failed_and_out_of_service():
    lc = ladder()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    (c1,) = of(step(lc, 601.0), PowerCycle)
    lc.recovery.power_done(c1, True, "", "", lc, 602.0)
    assert step(lc, 800.0) == []  # REBOOTING since 601, reboot_timeout 300
    fx = step(lc, 902.0)
    (c2,) = of(fx, PowerCycle)
    assert c2.attempt == 2 and "no boot contact 301 s after the reboot" in c2.reason
    lc.recovery.power_done(c2, True, "", "", lc, 903.0)
    fx = step(lc, 1203.0)
    assert of(fx, PowerCycle) == []
    assert moves(fx) == [("pc1", State.BOOTFAILED)]
    (failed,) = [e for e in fx if isinstance(e, RecordState) and e.moves]
    assert "2 power cycles did not bring it up; taken out of service" in failed.detail
    assert notes(fx) == ["OUT_OF_SERVICE"]
    (flag,) = [e for e in of(fx, Remember) if "out_of_service" in e.fields]
    assert flag.fields["out_of_service"].startswith("no boot contact")
    assert flag.fields["out_by"] == "A"
    assert lc.tick(99999.0) == []


def test_an_episode_begun_in_the_loader_ends_pxefailed_after_resends_and_cycles():
    lc, n = ladder(), node(1)
    lc.order(n, "REBOOT", 0.0)
    t = 0.0
    for attempt in (1, 2):
        t += 21
        fx = step(lc, t)
        assert [o.cause for o in of(fx, SendOrder)] == ["recovery"]
        assert lc.life["pc1"].tries == attempt
    t += 21
    (c1,) = of(step(lc, t), PowerCycle)
    assert c1.reason == "power cycle 1 of 2: no answer to 3 orders"
    assert c1.fail_state == State.PXEFAILED
    lc.recovery.power_done(c1, True, "", "", lc, t)
    # The cycled node PXE-boots, is told WAIT and never speaks again after an order:
    # still the same episode, so it still ends PXEFAILED.
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, t + 40)
    assert lc.life["pc1"].started_in == State.PXEWAKEUP


def test_a_node_whose_os_is_up_gets_its_ipod_first_then_the_power_cycle():
    lc = ladder()
    lc.state_reported("pc1", State.TBSETUP, 0.0)
    fx = step(lc, 601.0)
    assert fx == [SendIpod("pc1", node(1).control_ip, "in TBSETUP for 601 s")]
    assert lc.tick(610.0) == []  # the ping and IPOD are under way
    fx = lc.recovery.ipod_done(fx[0], True, "IPOD sent to pc1 at 10.0.0.2", lc, 603.0)
    assert notes(fx) == ["IPOD"] and moves(fx) == [("pc1", State.REBOOTING)]
    # The IPOD did not bring it back: the power cycle comes, no second IPOD.
    (cycle,) = of(step(lc, 904.0), PowerCycle)
    assert cycle.attempt == 1


def test_a_node_that_does_not_answer_the_ping_is_cycled_at_once():
    lc = ladder()
    lc.state_reported("pc1", State.TBSETUP, 0.0)
    (ipod,) = step(lc, 601.0)
    fx = lc.recovery.ipod_done(ipod, False, "", lc, 603.0)
    assert notes(fx) == ["IPOD"]
    (cycle,) = of(fx, PowerCycle)
    assert "it does not answer a ping" in cycle.reason


def test_an_operator_reboot_takes_the_softest_step_the_node_allows():
    lc, n1, n2, n3 = ladder(), node(1), node(2), node(3)
    lc.boot_question(snapshot(n1), node(1, allocated=False), Via.BOOTINFO, 1.0)  # told WAIT
    assert lc.waiting["pc1"] is Via.BOOTINFO
    lc.state_reported("pc2", State.ISUP, 1.0)
    lc.state_reported("pc3", State.BOOTING, 1.0, "bootinfo")
    fx1 = lc.reboot(n1, 5.0)
    assert [(o.kind, o.cause) for o in of(fx1, SendOrder)] == [(BootType.REBOOT, "operator")]
    assert of(lc.reboot(n2, 5.0), SendIpod) == [SendIpod("pc2", n2.control_ip,
                                                         "reboot asked by operator")]
    (cycle,) = of(lc.reboot(n3, 5.0, "imaging"), PowerCycle)
    assert cycle.reason == "power cycle 1 of 2: reboot asked by imaging"


def test_an_operator_reboot_starts_a_whole_budget():
    lc = ladder()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    step(lc, 601.0)
    assert lc.life["pc1"].cycles == 1
    (cycle,) = of(lc.reboot(node(1), 700.0), PowerCycle)
    assert cycle.attempt == 1


@pytest.mark.parametrize("driver, why", [("", "no BMC in the inventory to power-cycle it"),
                                         ("manual", "its power driver manual cannot"),
                                         ("wol", "its power driver wol cannot")])
def test_a_node_without_a_bmc_that_can_cycle_it_is_failed_at_once(driver, why):
    lc = ladder()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    fx = step(lc, 601.0, {"pc1": bmc(driver)})
    assert of(fx, PowerCycle) == []
    assert moves(fx) == [("pc1", State.BOOTFAILED)]
    assert why in fx[0].detail and notes(fx) == ["OUT_OF_SERVICE"]


@pytest.mark.parametrize("error", ["auth", "config", "unsupported"])
def test_a_bmc_error_no_retry_mends_gives_up_at_once(error):
    lc = ladder()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    (cycle,) = of(step(lc, 601.0), PowerCycle)
    fx = lc.recovery.power_done(cycle, False, error, "ipmi 10.9.0.1: refused", lc, 605.0)
    assert moves(fx) == [("pc1", State.BOOTFAILED)]
    assert f"cannot power-cycle it ({error}): ipmi 10.9.0.1: refused" in fx[0].detail


def test_a_bmc_that_does_not_answer_is_tried_again_later_without_counting_a_cycle():
    lc = ladder()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    t = 601.0
    (cycle,) = of(step(lc, t), PowerCycle)
    for _ in (1, 2):
        t += 20  # the BMC answers; the retry comes 60 s later
        fx = lc.recovery.power_done(cycle, False, "unreachable", "no answer", lc, t)
        assert notes(fx) == ["POWER_RETRY"] and lc.life["pc1"].cycles == 0
        assert lc.tick(t + 59) == []
        assert lc.tick(t + 60) == [Candidate("pc1", "recheck", State.REBOOTING, t - 20)]
        t += 60
        (cycle,) = of(step(lc, t), PowerCycle)
        assert cycle.attempt == 1 and "trying the power cycle again" in cycle.reason
    fx = lc.recovery.power_done(cycle, False, "timeout", "20 s", lc, t + 20)
    assert moves(fx) == [("pc1", State.BOOTFAILED)]
    assert "its BMC failed 3 times in a row (timeout)" in fx[0].detail


def test_out_of_service_or_an_operator_s_own_power_action_leaves_the_node_alone():
    lc = ladder()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    lc.state_reported("pc2", State.BOOTING, 0.0, "bootinfo")
    recs = {"pc1": bmc(out_of_service="BMC dead"), "pc2": bmc(operator_power_at=550.0)}
    assert step(lc, 601.0, recs, node(1), node(2)) == []
    # pc2's hold ends 600 s after the operator's action: then the ladder acts.
    assert [c.node_id for c in lc.tick(1149.0)] == []
    assert [c.node_id for c in lc.tick(1151.0)] == ["pc2"]


def test_back_in_service_the_budget_is_whole():
    lc = ladder()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    step(lc, 601.0)
    fx = lc.set_service("pc1", "", 700.0, "operator")
    assert notes(fx) == ["IN_SERVICE"]
    (r,) = of(fx, Remember)
    assert r.fields == {"out_of_service": "", "out_since": 0.0, "out_by": "", "power_cycles": 0}
    assert lc.life["pc1"].cycles == 0


def test_the_cycle_count_another_server_spent_is_taken_from_the_inventory():
    lc = ladder()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    fx = step(lc, 601.0, {"pc1": bmc(power_cycles=2)})
    assert of(fx, PowerCycle) == [] and moves(fx) == [("pc1", State.BOOTFAILED)]


def test_power_state_sync_records_changes_and_an_off_node_is_shutdown_not_stuck():
    lc = ladder()
    lc.state_reported("pc1", State.BOOTING, 0.0, "bootinfo")
    assert lc.power_observed("pc1", "on", 10.0, 10.0) == []  # first look: no change to tell
    fx = lc.power_observed("pc1", "off", 20.0, 21.0)
    assert notes(fx) == ["POWER_STATE"] and moves(fx) == [("pc1", State.SHUTDOWN)]
    assert lc.tick(1000.0) == []  # off is at rest: nothing powers it on behind anyone's back
    # A state newer than the question wins; a node the ladder is rebooting is left.
    lc.state_reported("pc2", State.BOOTING, 30.0, "bootinfo")
    assert moves(lc.power_observed("pc2", "off", 25.0, 31.0)) == []
    lc.state_reported("pc3", State.REBOOTING, 0.0, "ladder")
    assert moves(lc.power_observed("pc3", "off", 5.0, 6.0)) == []
    assert lc.power_observed("pc4", "unknown", 5.0, 6.0) == []

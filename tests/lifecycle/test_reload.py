"""The reload cycle's rules in the coordinator (issue 20), sans-IO like
test_coordinator.py: plain numbers for time, effects read as data."""

from __future__ import annotations

import pytest
from memsnap import DISK, node, snapshot

from bootherd.boottype import BootType
from bootherd.config import build
from bootherd.lifecycle import (
    Candidate,
    Coordinator,
    RecordState,
    Remember,
    SendOrder,
    StartReload,
    Via,
)
from bootherd.states import State, allowed

CFG = build({"server": {"public_address": "10.0.0.1"},
             "imaging": {"mfs_kernel": "mfs/vmlinuz", "mfs_initrd": "mfs/initrd.gz",
                         "address": "10.0.0.1", "port": 7979, "reload_disk": "/dev/vda"},
             "states": {"event_window": 10.0, "reload_timeout": 300.0}})


def coordinator(cfg=CFG) -> Coordinator:  # noqa: ANN001
    lc = Coordinator(cfg, "A")
    lc.orders_up = True
    return lc


def states(effects: list) -> list[str]:
    return [e.state for e in effects if isinstance(e, RecordState) and e.moves]


def of(effects: list, kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


def test_reload_records_reloadsetup_remembers_the_image_and_power_cycles_a_booted_node():
    lc, n = coordinator(), node(1)
    lc.boot_question(snapshot(n), n, Via.BOOTINFO, now=1.0)  # booted its disk: not waiting
    fx = lc.reload(n, "debian12", now=10.0)
    assert states(fx) == [State.RELOADSETUP]
    assert of(fx, RecordState)[0].detail == "debian12"
    assert of(fx, Remember)[0].fields == {"reload_image": "debian12"}
    assert of(fx, StartReload) == [StartReload("pc1", "debian12", True)]
    assert allowed(State.ISUP, State.RELOADSETUP)


def test_a_loader_waiting_for_an_order_is_ordered_and_an_ipxe_waiter_is_left_to_poll():
    lc = coordinator()
    a, b = node(1, allocated=False), node(2, allocated=False)
    snap = snapshot(a, b)
    lc.boot_question(snap, a, Via.BOOTINFO, now=1.0)
    lc.boot_question(snap, b, Via.IPXE, now=1.0)
    fa = lc.reload(a, "img", now=2.0)
    assert of(fa, StartReload) == [StartReload("pc1", "img", False)]
    assert [(o.kind, o.cause) for o in of(fa, SendOrder)] == [(BootType.AUTO, "reload")]
    fb = lc.reload(b, "img", now=2.0)
    assert of(fb, StartReload) == [StartReload("pc2", "img", False)] and not of(fb, SendOrder)


def test_a_reloading_node_is_answered_the_imaging_mfs_with_what_its_receiver_needs():
    lc, n = coordinator(), node(1)
    lc.reload(n, "debian12", now=1.0)
    ans = lc.boot_question(snapshot(n), n, Via.IPXE, now=5.0)
    d = ans.decision
    assert (d.type, d.path, d.initrd) == (BootType.MFS, "mfs/vmlinuz", "mfs/initrd.gz")
    for arg in ("bootherd.image=debian12", "bootherd.imaging=10.0.0.1:7979",
                "bootherd.node=pc1", "bootherd.disk=/dev/vda", "bootherd.http=http://10.0.0.1:"):
        assert arg in d.cmdline, d.cmdline
    assert states(ans.effects) == [State.PXEBOOTING, State.RELOADING]
    # TMCD's bootwhat says the same, and an unallocated node is reloaded too.
    assert lc.bootwhat(snapshot(n), n).type is BootType.MFS
    free = node(2, allocated=False)
    lc.reload(free, "debian12", now=1.0)
    assert lc.boot_question(snapshot(free), free, Via.IPXE, now=5.0).decision.type \
        is BootType.MFS


def test_done_is_reloaddone_and_the_next_boot_is_the_nodes_own_disk():
    lc, n = coordinator(), node(1)
    lc.reload(n, "debian12", now=1.0)
    lc.boot_question(snapshot(n), n, Via.IPXE, now=5.0)
    progress = lc.reload_reported("pc1", "debian12", "receiving", "10/40 chunks", now=6.0)
    assert [(e.state, e.moves) for e in progress] == [(State.RELOADING, False)]
    assert lc.reload_reported("pc1", "debian12", "receiving", "20/40", now=7.0) == []  # window
    fx = lc.reload_reported("pc1", "debian12", "done", "40/40 chunks", now=9.0)
    assert states(fx) == [State.RELOADDONE]
    assert of(fx, Remember)[0].fields == {"reload_image": ""}
    ans = lc.boot_question(snapshot(n), n, Via.IPXE, now=12.0)
    assert (ans.decision.type, ans.decision.image) == (BootType.PART, DISK)
    assert states(ans.effects) == [State.PXEBOOTING, State.BOOTING]


def test_a_failed_receiver_is_reloadfailed_and_ends_the_reload():
    lc, n = coordinator(), node(1)
    lc.reload(n, "debian12", now=1.0)
    fx = lc.reload_reported("pc1", "debian12", "failed", "written disk SHA-256 mismatch", 3.0)
    assert states(fx) == [State.RELOADFAILED]
    assert lc.boot_question(snapshot(n), n, Via.IPXE, now=4.0).decision.type is BootType.PART


def test_reports_of_an_image_the_node_is_not_reloading_change_nothing():
    lc, n = coordinator(), node(1)
    assert lc.reload_reported("pc1", "debian12", "done", "", now=1.0) == []  # `image receive`
    lc.reload(n, "debian12", now=1.0)
    assert lc.reload_reported("pc1", "other", "done", "", now=2.0) == []
    assert lc.reload_reported("pc2", "debian12", "done", "", now=2.0) == []


@pytest.mark.parametrize("policy", ["ladder", "resend"])
def test_the_watcher_fails_a_reload_that_takes_too_long(policy: str):
    from bootherd.lifecycle import Ladder

    lc, n = coordinator(), node(1)
    if policy == "ladder":
        lc.recovery = Ladder.from_config(CFG)
    lc.reload(n, "debian12", now=0.0)
    lc.boot_question(snapshot(n), n, Via.IPXE, now=10.0)
    assert lc.tick(200.0) == []
    (c,) = lc.tick(311.0)
    assert c == Candidate("pc1", "stuck", State.RELOADING, 10.0)
    fx = lc.resolve([c], {}, snapshot(n), 311.0)
    assert states(fx) == [State.RELOADFAILED]
    assert of(fx, Remember)[0].fields == {"reload_image": ""}


def test_a_restart_remembers_the_reload():
    lc, n = coordinator(), node(1)
    lc.restore([{"node_id": "pc1", "reload_image": "debian12"}])
    assert lc.boot_question(snapshot(n), n, Via.IPXE, now=1.0).decision.image == "debian12"


def test_no_imaging_mfs_configured_refuses_the_reload():
    lc = coordinator(build({}))
    with pytest.raises(ValueError, match="imaging.mfs_kernel"):
        lc.reload(node(1), "debian12", now=1.0)
    assert lc.life.get("pc1") is None or not lc.life["pc1"].reload

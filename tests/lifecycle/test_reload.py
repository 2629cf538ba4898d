"""The reload cycle's rules in the coordinator (issue 20), sans-IO like
test_coordinator.py: plain numbers for time, effects read as data."""

from __future__ import annotations

import dataclasses

import pytest
from memsnap import DISK, node, snapshot

from bootherd.boottype import BootType
from bootherd.config import ConfigError, build
from bootherd.lifecycle import (
    Candidate,
    Coordinator,
    Record,
    RecordState,
    Remember,
    SendOrder,
    StartReload,
    Via,
)
from bootherd.lifecycle.core import heir
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


# -- reload on free (imaging.reload_on_free) ---------------------------------------------

def on_free(**imaging: object) -> Coordinator:
    return coordinator(build({"server": {"public_address": "10.0.0.1"},
                              "imaging": {"mfs_kernel": "mfs/vmlinuz", "reload_on_free": True,
                                          **imaging}}))


def with_disk_image(snap, image: str):  # noqa: ANN001, ANN201
    """The snapshot with the nodes' default OS pointing at disk image `image`."""
    os_images = {**snap.os_images, DISK: dataclasses.replace(snap.os_images[DISK],
                                                             disk_image=image)}
    return dataclasses.replace(snap, os_images=os_images)


def free(lc: Coordinator, i: int, now: float, records=None, old=None, new=None):  # noqa: ANN001, ANN201
    """pc<i> freed from its experiment: the candidates and their resolution's effects."""
    old = old or snapshot(node(i))
    new = new or snapshot(node(i, allocated=False))
    cands = lc.inventory_changed(old, new, now)
    return cands, lc.resolve(cands, records or {}, new, now)


def test_a_freed_node_is_reloaded_with_its_default_oss_disk_image_naming_the_reason():
    lc, n = on_free(), node(1)
    assert n.allocation is not None
    cands, fx = free(lc, 1, 5.0, new=with_disk_image(snapshot(node(1, allocated=False)),
                                                     "ubuntu22"))
    assert [(c.node_id, c.rule) for c in cands] == [("pc1", "free")]
    assert states(fx) == [State.RELOADSETUP]
    (ev,) = [e for e in of(fx, RecordState) if e.moves]
    assert ev.source == "free"
    assert ev.detail == f"ubuntu22 (freed from {n.allocation.pid}/{n.allocation.eid})"
    assert of(fx, Remember)[0].fields == {"reload_image": "ubuntu22"}
    assert of(fx, StartReload) == [StartReload("pc1", "ubuntu22", True)]
    # Its next boot question is the imaging MFS, as after `node reload`.
    free_n = node(1, allocated=False)
    assert lc.boot_question(snapshot(free_n), free_n, Via.IPXE, now=6.0).decision.type \
        is BootType.MFS


def test_imaging_free_image_wins_over_the_oss_and_a_waiting_loader_is_ordered():
    lc = on_free(free_image="clean")
    lc.boot_question(snapshot(node(2)), node(2), Via.BOOTINFO, now=1.0)  # its OS is booting
    freed = node(2, allocated=False)
    lc.boot_question(snapshot(freed), freed, Via.BOOTINFO, now=2.0)  # told WAIT
    _, fx = free(lc, 2, 3.0, new=with_disk_image(snapshot(freed), "ubuntu22"))
    assert of(fx, StartReload) == [StartReload("pc2", "clean", False)]
    assert [(o.kind, o.cause) for o in of(fx, SendOrder)] == [(BootType.AUTO, "reload")]


def test_without_reload_on_free_a_freed_node_is_left_alone():
    lc = coordinator()  # imaging.reload_on_free defaults to false
    cands, fx = free(lc, 1, 5.0, new=with_disk_image(snapshot(node(1, allocated=False)), "u"))
    assert cands == [] and fx == []
    assert "pc1" not in lc.life or not lc.life["pc1"].reload


def test_a_freed_node_another_server_has_out_of_service_or_allocated_again_is_not_reloaded():
    new = with_disk_image(snapshot(node(1, allocated=False)), "ubuntu22")
    lc = on_free()
    assert free(lc, 1, 5.0, {"pc1": Record(State.ISUP, 1.0, "B", True)}, new=new)[1] == []
    assert free(lc, 1, 5.0, {"pc1": Record(State.ISUP, 1.0, "A", True, "broken disk")},
                new=new)[1] == []
    assert free(lc, 1, 5.0, {"pc1": Record(State.ISUP, 1.0, "A", True, "", 4.0)},
                new=new)[1] == []  # an operator powered it off a moment ago
    cands = lc.inventory_changed(snapshot(node(1)), new, 6.0)
    assert lc.resolve(cands, {}, snapshot(node(1)), 6.0) == []  # allocated again meanwhile
    assert not lc.life["pc1"].reload
    # Another server that is gone does not protect it.
    fx = free(lc, 1, 7.0, {"pc1": Record(State.ISUP, 1.0, "B", False)}, new=new)[1]
    assert states(fx) == [State.RELOADSETUP]


def test_a_freed_node_no_live_server_handles_is_reloaded_by_its_heir_only():
    new = with_disk_image(snapshot(node(1, allocated=False)), "ubuntu22")
    for rec in (Record(None, 0.0, "", False, heir="B"), Record(State.ISUP, 1.0, "C", False,
                                                               heir="B")):
        assert free(on_free(), 1, 5.0, {"pc1": rec}, new=new)[1] == []  # B reloads it
        fx = free(on_free(), 1, 5.0, {"pc1": dataclasses.replace(rec, heir="A")}, new=new)[1]
        assert states(fx) == [State.RELOADSETUP]
    # The node's own live server reloads it whatever its heir would be.
    fx = free(on_free(), 1, 5.0, {"pc1": Record(State.ISUP, 1.0, "A", True, heir="B")},
              new=new)[1]
    assert states(fx) == [State.RELOADSETUP]


def test_every_server_names_the_same_heir_and_the_nodes_are_shared_out():
    servers = ["srv0", "srv1", "srv2"]
    heirs = {f"pc{i}": heir(servers, f"pc{i}") for i in range(300)}
    assert heirs == {n: heir(list(reversed(servers)), n) for n in heirs}  # order-free
    assert all(100 - 30 < list(heirs.values()).count(s) < 100 + 30 for s in servers)
    # A server gone moves only its own share.
    after = {n: heir(["srv0", "srv2"], n) for n in heirs}
    assert {n for n in heirs if heirs[n] != after[n]} == {n for n in heirs
                                                          if heirs[n] == "srv1"}


def test_a_freed_node_without_a_disk_image_gets_a_note_and_stays_as_it_is():
    lc = on_free()
    _, fx = free(lc, 1, 5.0)  # the generated OS points at no disk image
    assert states(fx) == [] and not of(fx, StartReload)
    (note,) = of(fx, RecordState)
    assert (note.state, note.moves, note.source) == ("RELOAD_SKIPPED", False, "free")
    assert "no disk image" in note.detail and "freed from" in note.detail


@pytest.mark.parametrize("imaging,message", [
    ({"reload_on_free": True}, "imaging.reload_on_free: needs imaging.mfs_kernel"),
    ({"mfs_kernel": "k", "free_image": "../etc"}, "imaging.free_image: a disk image name"),
    ({"reload_on_free": "yes"}, "imaging.reload_on_free"),
])
def test_reload_on_free_config_is_checked_naming_the_key(imaging: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build({"imaging": imaging})

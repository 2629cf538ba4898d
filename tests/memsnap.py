"""An in-memory inventory for the sans-IO cores' tests: Snapshot and Node dataclasses
built directly, no database.  (To be replaced by the inventory's own builder from
testbed text once it is on main.)"""

from __future__ import annotations

from bootherd.inventory.model import Allocation, Interface, Node, OSImage, Snapshot

IMAGES = {
    "DISK": OSImage("DISK", "part", 1, None, "", "", ""),
    "FRISBEE": OSImage("FRISBEE", "mfs", None, None, "/tftpboot/frisbee", "", "console=ttyS0"),
}


def node(i: int, allocated: bool = True, **kw: object) -> Node:
    """pc<i> at 10.0.0.<i>, allocated to proj/exp unless told otherwise, booting DISK."""
    nid = f"pc{i}"
    ctrl = Interface(f"02:00:00:00:00:{i:02x}", nid, f"10.0.0.{i}", "255.255.255.0", "ctrl",
                     "eth0", 1000, "full", "")
    fields = dict(node_id=nid, type="pc", role="testnode", phys_node_id=None, jailed=False,
                  default_os="DISK", temp_os=None, next_os=None, loaders={}, pxe_loader="",
                  boot_cmdline="", bios_disk=None, privkey=None, ntp_drift=0.0,
                  interfaces=(ctrl,),
                  allocation=Allocation("proj", "exp", nid, "") if allocated else None)
    fields.update(kw)
    return Node(**fields)  # type: ignore[arg-type]


def snapshot(*nodes: Node, generation: int = 1, images: dict | None = None) -> Snapshot:
    return Snapshot(
        generation=generation, nodes={n.node_id: n for n in nodes},
        by_mac={n.control_mac: n for n in nodes if n.control_mac},
        by_ip={n.control_ip: n for n in nodes if n.control_ip},
        by_privkey={n.privkey: n for n in nodes if n.privkey},
        os_images=dict(IMAGES if images is None else images), node_types={}, users={},
        groups={}, experiments={}, experiment_nodes={}, mounts={}, tarballs={}, rpms={},
        routes={}, tunnels={}, trafgens={}, link_delays={}, ntp_servers=())

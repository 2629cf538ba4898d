"""An in-memory inventory for the sans-IO cores' tests (no database): a generated
testbed built by `inventory.memory.snapshot_from_text`, and its nodes varied."""

from __future__ import annotations

import dataclasses

from bootherd.inventory.memory import snapshot_from_text, with_nodes
from bootherd.inventory.model import Node, Snapshot
from bootherd.inventory.testbed import generate

BASE = snapshot_from_text(generate(8, subnet="10.0.0.0/24"))  # pc1 = 10.0.0.2, ...
DISK = "UBUNTU22-64-STD"  # what every generated node boots (partition 1)
MFS = "FRISBEE-MFS"       # an MFS with cmdline console=ttyS0


def node(i: int, allocated: bool = True, **kw: object) -> Node:
    """pc<i> of the testbed, allocated (as generated) unless told otherwise."""
    n = BASE.nodes[f"pc{i}"]
    assert n.allocation is not None and n.default_os == DISK
    return dataclasses.replace(n, allocation=n.allocation if allocated else None, **kw)


def snapshot(*nodes: Node, generation: int = 1) -> Snapshot:
    """The testbed with these nodes as given."""
    return dataclasses.replace(with_nodes(BASE, *nodes), generation=generation)

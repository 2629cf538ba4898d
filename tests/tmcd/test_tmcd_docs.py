"""docs/tmcd.md's command table is the command table: every command, the same rules."""

from __future__ import annotations

import re
from pathlib import Path

from bootherd.tmcd.protocol import (
    ALLOCATED,
    COMMAND_TABLE,
    PHYS,
    REMUDP,
    SECRET,
    TCPONLY,
    TLS,
    VIRT,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "tmcd.md"


def test_docs_table_matches_the_command_table() -> None:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `(\w+)` \| .* \| (\S+) \| (\S+) \| (\S+) \| (\S+) \|$", line)
        if m:
            rows[m.group(1)] = m.groups()[1:]
    assert list(rows) == list(COMMAND_TABLE)
    for name, c in COMMAND_TABLE.items():
        fc = {0: "-", PHYS: "phys", VIRT: "vnode", PHYS | VIRT: "both"}[c.fullconfig]
        free = "nothing" if c.has(ALLOCATED) else "answered"
        udp = "never" if c.flags & (TCPONLY | SECRET) else ("all" if c.has(REMUDP) else "trusted")
        tls = "always" if c.has(TLS) else ("remote" if c.has(SECRET) else "-")
        assert rows[name] == (fc, free, udp, tls), name

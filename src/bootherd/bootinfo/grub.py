"""GRUB configurations per node, generated from the boot decision (TFTP and HTTP).

The Secure Boot chain the distributions sign is shim -> GRUB -> kernel: the DHCP server
hands Secure Boot nodes shim as their UEFI loader (`loader_uefi = "shimx64.efi"` on the
node or its type), shim fetches `grubx64.efi` from its own folder (bootherd.loaders:
Debian's signed GRUB network image unless the root has one), and that GRUB, whose
prefix is `/grub` on the server it came from, reads `grub/grub.cfg`.  bootherd answers
that name and the per-node names below from the inventory, nothing on disk:

    grub/grub.cfg                  the same for everyone: loops over the two below
    grub/grub.cfg-<mac>            the node's own configuration (MAC with colons, as
                                   GRUB's ${net_default_mac})
    grub/grub.cfg-default          for a client no inventory MAC names (MAAS's order)

over TFTP (the resolver of bootherd.tftp.service) and over HTTP (GET /grub/...).  Each
per-node file is one boot question to the lifecycle coordinator, asked as iPXE asks it
(`ask`): the same decision, one-shot next_os, state events and waiting set.  WAIT needs no iPXE: the
node's file says so and sleeps, and the loop in grub.cfg asks again, as iPXE's wait
script does.  Configurations never contain secrets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from ..boottype import BootType
from ..inventory.model import Node, Snapshot, norm_mac
from ..lifecycle import Via
from ..netaddr import connection_local_ip, norm_ip
from ..policy import BootDecision, advertised, url_host

log = logging.getLogger("bootherd.grub")

PREFIX = "grub"  # Debian's GRUB network images look for $prefix/grub.cfg, prefix /grub
MENU = f"{PREFIX}/grub.cfg"
PER_NODE = f"{PREFIX}/grub.cfg-"
DEFAULT = f"{PREFIX}/grub.cfg-default"
WAIT_SECONDS = 5  # how often a waiting GRUB asks again (as iPXE's wait loop)

# Sourced again after every answer that does not boot: a node told WAIT (or whose boot
# failed) asks again, in this one GRUB context (no configfile nesting to run out of).
MENU_TEXT = f"""\
# bootherd: the node's own configuration, else the default (per MAC first, as MAAS)
set timeout=0
while true; do
  if ! source ${{prefix}}/grub.cfg-${{net_default_mac}}; then
    if ! source ${{prefix}}/grub.cfg-default; then
      echo "bootherd: no configuration for ${{net_default_mac}}, asking again"
      sleep {WAIT_SECONDS}
    fi
  fi
done
"""


def _clean(text: str) -> str:
    # One line, no GRUB quoting or expansion: the cmdline goes inside single quotes.
    return " ".join(text.split()).replace("'", "")


def _file(server: str | None, path: str, here: str) -> str:
    """A GRUB path to a boot file: over TFTP, from this server's TFTP root (at `here`,
    the address GRUB reached this server at) or the decision's server.  Debian's signed
    GRUB network images have no HTTP module (and under Secure Boot cannot load one), so
    a kernel GRUB boots must be in the TFTP root: MB and MFS paths are TFTP names in
    Emulab's bootinfo too."""
    return f"(tftp,{url_host(server or here)})/{path.lstrip('/')}"


def render_config(decision: BootDecision, node: Node | None, here: str) -> str:
    """The GRUB script carrying out `decision` (sourced by MENU_TEXT's loop); `here` is
    this server's address as the script names it (the advertised address)."""
    name = node.node_id if node else "unknown node"
    head = [f"# bootherd: {name}: {decision.type.name}"
            + (f" {decision.image}" if decision.image else "")]
    t = decision.type
    if t in (BootType.MB, BootType.MFS):
        kernel = _file(decision.server, decision.path, here)
        lines = [f"echo 'bootherd: {name}: booting {decision.image or decision.path}'",
                 f"linux {kernel} {_clean(decision.cmdline)}".rstrip()]
        if decision.initrd:
            lines.append(f"initrd {_file(decision.server, decision.initrd, here)}")
        lines += ["boot",
                  f"echo 'bootherd: booting {decision.image or decision.path} failed, "
                  "asking again'", f"sleep {WAIT_SECONDS}"]
        return "\n".join(head + lines) + "\n"
    if t in (BootType.PART, BootType.DISKPART, BootType.SYSID):
        # Back to the firmware's boot manager, which goes on to its next entry (the disk).
        return "\n".join(head + [f"echo 'bootherd: {name}: boot from the local disk'",
                                 "exit 1"]) + "\n"
    if t is BootType.WAIT:
        why = _clean(decision.reason or "nothing to boot")
        return "\n".join(head + [f"echo 'bootherd: {name} waits ({why})'",
                                 f"sleep {WAIT_SECONDS}"]) + "\n"
    if t is BootType.REBOOT:
        return "\n".join(head + ["reboot"]) + "\n"
    return "\n".join(head + ["true"]) + "\n"  # AUTO / RESTART: the loop asks again at once


def _mac_of(name: str) -> str | None:
    """The MAC in a per-node name (grub.cfg-52:54:00:..., any separator), or None."""
    try:
        return norm_mac(unquote(name))
    except ValueError:
        return None


class GrubConfigs:
    """Answers the GRUB names above for one process (TFTP and HTTP share it)."""

    def __init__(self, config: Any, live: Any, metrics: Any, lifecycle: Any):
        self.config = config
        self.live = live
        self.counters = metrics.protocol("grub")
        self.lifecycle = lifecycle

    def ask(self, snap: Snapshot, node: Node | None) -> BootDecision:
        """The boot decision for a node's GRUB, asked of the lifecycle coordinator as iPXE
        asks it: one-shot next_os, the state events, and the waiting set (a node waiting
        in GRUB asks again by itself, as one in iPXE does: Via.IPXE)."""
        return self.lifecycle.boot_question(snap, node, Via.IPXE)

    def answer(self, name: str, client_ip: str | None,
               here: Callable[[], str]) -> bytes | None:
        """The text for GRUB name `name` (relative to the TFTP root / HTTP path), or None
        when it is not one of ours (TFTP then looks in the root).  `here()` is the address
        the request arrived on (worked out only for a per-node answer)."""
        if name == MENU:
            self.counters["menu"] += 1
            log.debug("grub: %s asked for %s", client_ip, name)
            return MENU_TEXT.encode()
        if not name.startswith(PER_NODE):
            return None
        snap = self.live.snapshot
        # The source address identifies a node first (a node only ever sees its own
        # configuration); the MAC in the name only where the address is not ours.
        node = snap.by_ip.get(norm_ip(client_ip)) if client_ip else None
        if node is None and name != DEFAULT:
            mac = _mac_of(name[len(PER_NODE):])
            if mac is None:
                return None
            node = snap.by_mac.get(mac)
            if node is None:
                return None  # not ours: GRUB goes on to grub.cfg-default
        self.counters["configs"] += 1
        if node is None:
            self.counters["unknown_nodes"] += 1
        decision = self.ask(snap, node)
        self.counters[f"reply_{decision.type.name.lower()}"] += 1
        log.debug("grub: %s asked for %s: %s %s", client_ip, name,
                  node.node_id if node else "unknown node", decision.type.name)
        return render_config(decision, node, advertised(self.config, here())).encode()


def add_routes(app: Any, configs: GrubConfigs) -> None:
    """GET /grub/{name}: the same answers over HTTP (a GRUB booted by UEFI HTTP boot)."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        text = configs.answer(f"{PREFIX}/{request.match_info['name']}", request.remote,
                              lambda: connection_local_ip(request.transport))
        if text is None:
            return web.Response(status=404, text="not found\n")
        return web.Response(body=text, content_type="text/plain",
                            headers={"Cache-Control": "no-store"})

    app.router.add_get("/grub/{name}", handle)

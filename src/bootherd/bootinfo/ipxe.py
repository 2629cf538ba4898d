"""iPXE boot scripts over HTTP: GET /ipxe.

DHCP hands iPXE the URL `http://<server>:<http.port>/ipxe?mac=${netX/mac:hexhyp}`
(see policy.dhcp_boot): a script, not the iPXE binary, which is what breaks the
chainload loop.  The node is found by the request's source address; `mac=`
only identifies a node whose source address is not in the inventory.  Scripts
never contain secrets, so a wrong `mac=` reveals nothing.

One script per policy decision (render_script); they work in BIOS and UEFI iPXE.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from ..boottype import BootType
from ..inventory.model import Node, norm_mac
from ..lifecycle import Lifecycle, Via
from ..netaddr import connection_local_ip, norm_ip
from ..policy import BootDecision, advertised, http_base, url_host

log = logging.getLogger("bootherd.ipxe")

WAIT_SECONDS = 5  # how often a waiting iPXE asks again


def _clean(text: str) -> str:
    # A newline in a cmdline would start a new script command.
    return " ".join(text.split())


def _file_url(server: str | None, path: str, cfg: Any, here: str) -> str:
    """Files on this server (`here`) come over HTTP (/files/...), others over TFTP."""
    rel = quote(path.lstrip("/"), safe="/-._~")
    if server and server != here:
        return f"tftp://{url_host(server)}/{rel}"
    return f"{http_base(cfg, here)}/files/{rel}"


def _drive(disk: int | None) -> str:
    d = 0 if disk is None else disk
    return f"0x{d if d >= 0x80 else 0x80 + d:02x}"


def render_script(decision: BootDecision, node: Node | None, cfg: Any,
                  self_url: str | None = None, server: str = "") -> str:
    """The iPXE script carrying out `decision`.

    self_url is where this script came from (the WAIT loop and AUTO ask it again);
    server is this server's address as the script names it (default:
    server.public_address)."""
    here = server or cfg.server.public_address or "0.0.0.0"
    self_url = self_url or f"{http_base(cfg, here)}/ipxe"
    name = node.node_id if node else "unknown node"
    head = ["#!ipxe", f"# bootherd: {name}: {decision.type.name}"
            + (f" {decision.image}" if decision.image else "")]
    t = decision.type
    if t in (BootType.MB, BootType.MFS):
        kernel = _file_url(decision.server, decision.path, cfg, here)
        args = _clean(decision.cmdline)
        lines = ["imgfree"]
        if decision.initrd:
            initrd = _file_url(decision.server, decision.initrd, cfg, here)
            # UEFI kernels (EFI stub) find the initrd by name: iPXE names it
            # after the URL's last component.
            args = f"initrd={initrd.rsplit('/', 1)[-1]} {args}".strip()
            lines.append(f"kernel {kernel} {args}".rstrip() + " || goto failed")
            lines.append(f"initrd {initrd} || goto failed")
        else:
            lines.append(f"kernel {kernel} {args}".rstrip() + " || goto failed")
        lines += ["boot || goto failed", "", ":failed",
                  f"echo bootherd: booting {decision.image or decision.path} failed, asking again",
                  f"sleep {WAIT_SECONDS}", f"chain --replace --autofree {self_url}"]
        return "\n".join(head + lines) + "\n"
    if t in (BootType.PART, BootType.DISKPART, BootType.SYSID):
        drive = _drive(decision.disk if t is BootType.DISKPART else None)
        lines = [
            # UEFI iPXE cannot sanboot a local disk: hand back to the firmware's
            # boot manager, which goes on to its next entry (the disk).
            "iseq ${platform} efi && goto uefi ||",
            f"sanboot --no-describe --drive {drive} || goto failed",
            ":uefi",
            "exit 1",
            ":failed",
            "echo bootherd: local disk boot failed",
            f"sleep {WAIT_SECONDS}",
            "exit 1",
        ]
        return "\n".join(head + lines) + "\n"
    if t is BootType.WAIT:
        lines = [
            f"echo bootherd: {name} waits ({decision.reason or 'nothing to boot'})",
            ":wait",
            f"sleep {WAIT_SECONDS}",
            f"chain --replace --autofree {self_url} || goto wait",
        ]
        return "\n".join(head + lines) + "\n"
    if t is BootType.REBOOT:
        lines = []
        if node is not None and node.pxe_loader:
            # iPXE in ROM would come straight back here after a reboot: load
            # the node's loader over TFTP directly, and reboot only if that fails.
            loader = quote(node.pxe_loader.lstrip("/"), safe="/-._~")
            lines.append(f"chain tftp://{url_host(here)}/{loader} ||")
        return "\n".join(head + lines + ["reboot"]) + "\n"
    # AUTO / RESTART: ask again at once.
    return "\n".join(head + [f"chain --replace --autofree {self_url}"]) + "\n"


def _find_node(snap: Any, remote: str | None, mac: str | None) -> Node | None:
    node = snap.by_ip.get(remote) if remote else None
    if node is None and mac:
        try:
            node = snap.by_mac.get(norm_mac(mac))
        except ValueError:
            node = None
    return node


def add_routes(app: Any, config: Any, live: Any, metrics: Any, lifecycle: Lifecycle) -> None:
    """Register GET /ipxe on an aiohttp Application; answers come from the coordinator
    (which also remembers that a node told WAIT here polls by itself)."""
    from aiohttp import web

    counters = metrics.protocol("ipxe")

    async def handle(request: web.Request) -> web.Response:
        counters["requests"] += 1
        snap = live.snapshot
        remote = norm_ip(request.remote or "")
        mac = request.query.get("mac")
        node = _find_node(snap, remote, mac)
        decision = lifecycle.boot_question(snap, node, Via.IPXE)
        here = advertised(config, connection_local_ip(request.transport))
        self_url = _self_url(request, config, here)
        text = render_script(decision, node, config, self_url, here)
        counters[f"reply_{decision.type.name.lower()}"] += 1
        if node is None:
            counters["unknown_nodes"] += 1
        return web.Response(text=text, content_type="text/plain",
                            headers={"Cache-Control": "no-store"})

    app.router.add_get("/ipxe", handle)


def _self_url(request: Any, cfg: Any, here: str) -> str:
    """The script's own URL on the advertised address, keeping a valid mac= only."""
    url = f"{http_base(cfg, here)}/ipxe"
    mac = request.query.get("mac", "")
    try:
        return f"{url}?mac={norm_mac(mac).replace(':', '-')}" if mac else url
    except ValueError:
        return url


"""The actions a node page offers, as a registry: one entry per button.

Each action is POST /ui/nodes/{id}/actions/{name} with the session's CSRF token and,
for actions that take one, a `value` picked from `choices`.  The page asks the
operator to confirm (`confirm`, with {node} filled in) and shows the result line or
the refusal.  Another package adds its own with `register(Action(...))` at import; the console
needs no other change.  `choices` runs in a thread (it may read the database).

Wake is an order through the lifecycle coordinator; reboot goes through its recovery
ladder, as `POST /api/reboot` does (a soft step first, then a BMC power cycle); power
on, off and cycle and the power status go to the power controller, as `POST /api/power`
does (the same caps: one operation per BMC at a time, the power-on ramp), recorded as
the node's events with source `ui`.  Reload writes a disk image through the coordinator's reload
cycle after the image check of `POST /api/reload` (RELOADSETUP, source `ui`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ...inventory import ops
from ...inventory.edit import Origin, check_boot_files
from ...power.core import ErrorKind, PowerOp
from .backend import Backend, Unavailable


class ActionRefused(Exception):
    """An action that cannot be done: `status` is the HTTP answer (400, 404, 409, 502, 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


Run = Callable[[Backend, str, str], Awaitable[str]]


@dataclass(frozen=True)
class Action:
    name: str                    # URL segment and form id: lower case, digits, '-'
    label: str                   # the button
    confirm: str                 # the question asked first; {node} is the node id
    run: Run                     # (backend, node_id, value) -> one result line
    choices: Callable[[Backend, Any], list[tuple[str, str]]] | None = None  # (value, label)
    choice_label: str = ""
    no_choices: str = ""         # why not offered when `choices` gives none
    available: Callable[[Backend], str | None] = lambda b: None  # why not here, or None
    # Why the node's page does not offer it, from the node as `ops.show_node` shows it
    # (None: offered).  The action itself still refuses what it cannot do.
    for_node: Callable[[dict[str, Any]], str | None] = lambda shown: None
    danger: bool = False         # shown in red: it interrupts what the node runs
    order: int = 100             # place on the page


ACTIONS: dict[str, Action] = {}


def register(action: Action) -> Action:
    if not action.name.replace("-", "").isalnum() or action.name != action.name.lower():
        raise ValueError(f"action name {action.name!r}: lower-case letters, digits and '-'")
    ACTIONS[action.name] = action
    return action


def listed() -> list[Action]:
    return sorted(ACTIONS.values(), key=lambda a: (a.order, a.name))


async def _order(b: Backend, node_id: str, kind: str | None) -> str:
    try:
        return await b.order(node_id, kind)
    except Unavailable as e:
        raise ActionRefused(503, str(e)) from None
    except (LookupError, ValueError) as e:
        raise ActionRefused(409, str(e.args[0] if e.args else e)) from None
    except OSError as e:  # no bootinfo transport in this process
        raise ActionRefused(503, f"cannot send the order: {e}") from None


async def _wake(b: Backend, node_id: str, value: str) -> str:
    return await _order(b, node_id, None)


async def _reboot(b: Backend, node_id: str, value: str) -> str:
    try:
        res = await b.reboot(node_id)
    except Unavailable as e:
        raise ActionRefused(503, str(e)) from None
    if not res["ok"]:
        raise ActionRefused(409, res["error"])
    return f"reboot: {res['step'].replace('_', ' ')}: {res['detail']}"


def _os_choices(b: Backend, node: Any) -> list[tuple[str, str]]:
    imgs = sorted(b.snapshot.os_images)
    return [("", "(none: clear next_os)")] + [(n, n) for n in imgs]


async def _set_next_os(b: Backend, node_id: str, value: str) -> str:
    try:  # the CLI's and the API's check: an unknown OS, a kernel file http.root lacks
        await asyncio.to_thread(check_boot_files, b.config, b.live.engine, {"next_os": value})
    except (ops.NotFound, ops.Conflict) as e:
        raise ActionRefused(400 if isinstance(e, ops.NotFound) else 409,
                            f"{e}: {e.hint}" if e.hint else str(e)) from None
    try:  # audited as a console change (inventory.edit), not as the server's own login
        await b.db(ops.set_node, node_id, origin=Origin("ui", "console"), next_os=value)
    except ops.NotFound as e:
        raise ActionRefused(404, str(e)) from None
    except ValueError as e:  # import's rules refused it (ops.Conflict, TestbedError)
        raise ActionRefused(409, str(e)) from None
    return f"next_os set to {value}: the node boots it once, at its next boot" if value \
        else "next_os cleared"


def _disk_image_choices(b: Backend, node: Any) -> list[tuple[str, str]]:
    """Recorded disk images whose file is here (read in a thread: the database)."""
    return [(i["name"], f"{i['name']} ({i['disk_size'] / 2**30:.1f} GiB disk)")
            for i in b.disk_images().list() if i["present"]]


def _reload_here(b: Backend) -> str | None:
    return None if b.lifecycle is not None else "no lifecycle coordinator in this server"


async def _reload(b: Backend, node_id: str, value: str) -> str:
    from ...imaging.store import ImageNotFound, ImageUnusable, check_name  # noqa: PLC0415

    if not value:
        raise ActionRefused(400, "pick the disk image to write")
    try:
        check_name(value)
    except ValueError as e:
        raise ActionRefused(400, str(e)) from None
    try:
        return await b.reload(node_id, value)
    except Unavailable as e:
        raise ActionRefused(503, str(e)) from None
    except ImageUnusable as e:
        raise ActionRefused(409, str(e)) from None
    except ImageNotFound as e:
        raise ActionRefused(404, str(e)) from None
    except ValueError as e:  # no imaging MFS configured
        raise ActionRefused(409, str(e)) from None
    except KeyError as e:
        raise ActionRefused(404, str(e.args[0] if e.args else e)) from None
    except OSError as e:  # its AUTO order could not be sent
        raise ActionRefused(503, f"cannot send the order: {e}") from None


# Why a power operation failed -> the console's answer: the inventory lacks what it
# needs (409), the BMC failed or refused (502), the batch was stopped (503).
_POWER_STATUS = {ErrorKind.CONFIG: 409, ErrorKind.UNSUPPORTED: 409,
                 ErrorKind.CANCELLED: 503}


def _power_here(b: Backend) -> str | None:
    return None if b.power is not None else "power control is not running in this server"


def _has_power(shown: dict[str, Any]) -> str | None:
    return None if shown.get("power") else "no power driver in the inventory ([nodes.power])"


def _power(op: PowerOp) -> Run:
    async def run(b: Backend, node_id: str, value: str) -> str:
        if b.power is None:
            raise ActionRefused(503, "power control is not running in this server")
        (res,) = await b.power.run(op, [node_id], source="ui")
        if not res.ok:
            raise ActionRefused(_POWER_STATUS.get(res.error, 502),
                                f"power {op} failed ({res.error}): {res.message}")
        state = f"; power is {res.power}" if res.power else ""
        return f"power {op}: {res.message or 'done'}{state} ({res.driver}, {res.elapsed:.1f} s)"
    return run


register(Action("wake", "Wake", "Send a wake-up order (AUTO) to {node}'s waiting loader?",
                _wake, order=10))
register(Action("reboot", "Reboot", "Reboot {node}? A soft reboot first (an order to its "
                "loader, or an IPOD when its OS is up), then a power cycle if it stays down.",
                _reboot, danger=True, order=20))
register(Action("next-os", "Set next_os", "Set next_os of {node}?", _set_next_os,
                choices=_os_choices, choice_label="OS image booted once", order=30))
register(Action("reload", "Reload", "Reload {node} with the chosen disk image? Its disk is "
                "overwritten; it power-cycles unless its loader is waiting.", _reload,
                choices=_disk_image_choices, choice_label="Disk image written",
                no_choices="no disk image in the inventory (bootherd image create)",
                available=_reload_here, danger=True, order=35))
register(Action("power-status", "Power status", "Ask {node}'s BMC whether it is on?",
                _power(PowerOp.STATUS), available=_power_here, for_node=_has_power, order=40))
register(Action("power-on", "Power on", "Power {node} on?", _power(PowerOp.ON),
                available=_power_here, for_node=_has_power, order=41))
register(Action("power-off", "Power off",
                "Power {node} off now? It is cut off hard, with no OS shutdown.",
                _power(PowerOp.OFF), available=_power_here, for_node=_has_power, danger=True,
                order=42))
register(Action("power-cycle", "Power cycle",
                "Power-cycle {node} now? It is cut off and powered on again.",
                _power(PowerOp.CYCLE), available=_power_here, for_node=_has_power, danger=True,
                order=43))

"""The node boot states and the transitions a healthy boot makes.

States are plain strings on the wire and in the database (node_states,
node_events); this module names them and lists the expected transitions.
What moves a node between them, and what is done with a node that stays too
long in one, is the lifecycle coordinator's (bootherd.lifecycle).

Transitions (old -> new) that a healthy boot makes:

    (any)       -> PXEBOOTING           the node (re)started and asked bootinfo/iPXE
    PXEBOOTING  -> BOOTING | PXEWAIT | REBOOTING | PXEFAILED
    PXEWAIT     -> PXEWAKEUP | PXEBOOTING
    PXEWAKEUP   -> PXEWAKEUP (order re-sent) | PXEBOOTING | PXEFAILED
    REBOOTING   -> PXEBOOTING | SHUTDOWN
    BOOTING     -> TBSETUP | ISUP | BOOTFAILED | SHUTDOWN | REBOOTING
    TBSETUP     -> ISUP | BOOTFAILED | SHUTDOWN | REBOOTING
    ISUP        -> TBSETUP | SHUTDOWN | REBOOTING
    SHUTDOWN    -> BOOTING | TBSETUP
    PXEFAILED, BOOTFAILED -> SHUTDOWN | REBOOTING

The reload cycle (docs/imaging.md; Emulab's RELOAD op mode):

    (any)        -> RELOADSETUP         an operator ordered a reload (the image is named)
    RELOADSETUP  -> PXEBOOTING -> RELOADING   the node asked and was given the imaging MFS
    RELOADING    -> RELOADDONE | RELOADFAILED the MFS reports its disk written, or not
    RELOADDONE   -> PXEBOOTING -> BOOTING ... ISUP   it boots the written disk

Nodes report what they report: an unexpected transition is still recorded
(a lost packet can skip a state); `allowed()` lets callers flag it.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    PXEBOOTING = "PXEBOOTING"
    BOOTING = "BOOTING"
    PXEWAIT = "PXEWAIT"
    PXEWAKEUP = "PXEWAKEUP"
    REBOOTING = "REBOOTING"
    TBSETUP = "TBSETUP"
    ISUP = "ISUP"
    SHUTDOWN = "SHUTDOWN"
    PXEFAILED = "PXEFAILED"
    BOOTFAILED = "BOOTFAILED"
    RELOADSETUP = "RELOADSETUP"
    RELOADING = "RELOADING"
    RELOADDONE = "RELOADDONE"
    RELOADFAILED = "RELOADFAILED"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.PXEBOOTING: frozenset({S.BOOTING, S.PXEWAIT, S.REBOOTING, S.PXEFAILED}),
    S.PXEWAIT: frozenset({S.PXEWAKEUP}),
    S.PXEWAKEUP: frozenset({S.PXEWAKEUP, S.PXEFAILED}),
    S.REBOOTING: frozenset({S.SHUTDOWN}),
    S.BOOTING: frozenset({S.TBSETUP, S.ISUP, S.BOOTFAILED, S.SHUTDOWN, S.REBOOTING}),
    S.TBSETUP: frozenset({S.ISUP, S.BOOTFAILED, S.SHUTDOWN, S.REBOOTING}),
    S.ISUP: frozenset({S.TBSETUP, S.SHUTDOWN, S.REBOOTING}),
    S.SHUTDOWN: frozenset({S.BOOTING, S.TBSETUP}),
    S.PXEFAILED: frozenset({S.SHUTDOWN, S.REBOOTING}),
    S.BOOTFAILED: frozenset({S.SHUTDOWN, S.REBOOTING}),
    S.RELOADSETUP: frozenset({S.RELOADFAILED, S.SHUTDOWN, S.REBOOTING}),
    S.RELOADING: frozenset({S.RELOADDONE, S.RELOADFAILED}),
    S.RELOADDONE: frozenset({S.SHUTDOWN, S.REBOOTING}),
    S.RELOADFAILED: frozenset({S.SHUTDOWN, S.REBOOTING}),
}
FAILED = frozenset({S.PXEFAILED, S.BOOTFAILED, S.RELOADFAILED})


def allowed(old: str | None, new: str) -> bool:
    """Is old -> new an expected transition?  Anything may go to PXEBOOTING (a
    restart) or RELOADSETUP (an operator's reload)."""
    if new in (S.PXEBOOTING, S.RELOADSETUP) or old is None:
        return True
    try:
        return State(new) in TRANSITIONS.get(State(old), frozenset())
    except ValueError:
        return False

"""The node boot state machine, its dedupe rule and the watcher of stuck nodes.

States are plain strings on the wire and in the database (node_states,
node_events); this module names them, lists the expected transitions, and
acts on nodes that stay too long in a transient state.

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

Nodes report what they report: an unexpected transition is still recorded
(a lost packet can skip a state); `allowed()` lets callers flag it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

log = logging.getLogger("bootherd.states")


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
}
FAILED = frozenset({S.PXEFAILED, S.BOOTFAILED})
# States the watcher times out.
TRANSIENT = frozenset({S.PXEWAKEUP, S.BOOTING, S.TBSETUP})


def allowed(old: str | None, new: str) -> bool:
    """Is old -> new an expected transition?  Anything may go to PXEBOOTING."""
    if new == S.PXEBOOTING or old is None:
        return True
    try:
        return State(new) in TRANSITIONS.get(State(old), frozenset())
    except ValueError:
        return False


def reply_state(boot_type: Any) -> State:
    """The state a bootinfo/iPXE answer moves the node to."""
    from .policy import BootType

    if boot_type == BootType.WAIT:
        return S.PXEWAIT
    if boot_type == BootType.REBOOT:
        return S.REBOOTING
    if boot_type in (BootType.AUTO, BootType.RESTART):
        return S.PXEBOOTING
    return S.BOOTING


class BootStateRecorder:
    """Records PXEBOOTING + the reply state for each boot question, once per
    `window` seconds per client address (loaders retry; a storm of retries
    must not become a storm of events).  A repeat is recorded anyway when the
    node's state has moved on meanwhile (e.g. a woken node asking again)."""

    def __init__(self, live: Any, source: str, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.live = live
        self.source = source
        self.window = window
        self.clock = clock
        self._seen: dict[str, tuple[float, str]] = {}  # addr -> (when, reply state)

    def answered(self, node_id: str, addr: str, state: State, detail: str = "") -> bool:
        """Record the question and answer; False if it was a repeat."""
        now = self.clock()
        prev = self._seen.get(addr)
        current = self.live.state_of(node_id)
        if prev and now - prev[0] < self.window and prev[1] == state \
                and current is not None and current[0] == state:
            return False
        if len(self._seen) > 4096:  # keep the table small: drop expired entries
            self._seen = {a: v for a, v in self._seen.items() if now - v[0] < self.window}
        self._seen[addr] = (now, state)
        self.live.record_state(node_id, S.PXEBOOTING, self.source)
        self.live.record_state(node_id, state, self.source, detail)
        return True


class Watcher:
    """Acts on nodes stuck in a transient state.

    Every `states.check_interval` seconds: PXEWAKEUP longer than
    `pxewakeup_timeout` -> re-send the last order (through ctx.shared["bootinfo"])
    up to `pxewakeup_retries` times, then PXEFAILED; BOOTING or TBSETUP longer
    than `booting_timeout` -> BOOTFAILED.  `clock` (wall clock, as the recorded
    `since` values) is injectable; tests call `check_once()` directly.
    """

    def __init__(self, ctx: Any, clock: Callable[[], float] = time.time):
        self.ctx = ctx
        self.clock = clock
        self.cfg = ctx.config.states
        self.retries: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()
        ctx.live.on_state(self._on_state)

    def _on_state(self, ev: Any) -> None:
        # A node that moved on (asked again, booted) starts a fresh retry budget.
        if ev.state != S.PXEWAKEUP:
            self.retries.pop(ev.node_id, None)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="states-watcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for t in list(self._pending):
            t.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.check_interval)
            try:
                await self.check_once()
            except Exception:  # the watcher must keep watching
                log.exception("state watcher pass failed")

    async def check_once(self) -> list[tuple[str, str]]:
        """One pass; returns the actions taken as (node_id, action)."""
        now = self.clock()
        live = self.ctx.live
        actions: list[tuple[str, str]] = []
        for node_id, (state, since) in list(live.states.items()):
            age = now - since
            if state == S.PXEWAKEUP and age > self.cfg.pxewakeup_timeout:
                done = self.retries.get(node_id, 0)
                if done < self.cfg.pxewakeup_retries:
                    server = self.ctx.shared.get("bootinfo")
                    if server is None:
                        continue
                    self.retries[node_id] = done + 1
                    try:
                        await server.send_order(node_id, resend=True)
                        actions.append((node_id, "resend"))
                    except (KeyError, ValueError, OSError) as e:
                        log.warning("re-sending order to %s failed: %s", node_id, e)
                else:
                    self.retries.pop(node_id, None)
                    live.record_state(node_id, S.PXEFAILED, "watcher",
                                      f"no answer to {done + 1} orders")
                    actions.append((node_id, "failed"))
            elif state in (S.BOOTING, S.TBSETUP) and age > self.cfg.booting_timeout:
                live.record_state(node_id, S.BOOTFAILED, "watcher",
                                  f"{state} for {int(age)} s")
                actions.append((node_id, "failed"))
        return actions


def ensure_watcher(ctx: Any) -> Watcher:
    """The process's one Watcher (created on first call, kept in ctx.shared)."""
    w = ctx.shared.get("states_watcher")
    if w is None:
        w = ctx.shared["states_watcher"] = Watcher(ctx)
    return w

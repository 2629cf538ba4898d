"""The recovery ladder: what bootherd does with a stuck node, or one an operator reboots.

A recovery policy of the coordinator (`core.RecoveryPolicy`), sans-IO like it:
every method takes `now` and returns effects; the power cycles and IPODs it asks
for are effect types of its own (`PowerCycle`, `SendIpod`) that
`lifecycle.actors.RecoveryActors` carries out and reports back
(`power_done`, `ipod_done`).  Emulab's `node_reboot` (ping, soft reboot, IPOD,
power cycle) is the model; the steps, for one episode (it ends when the node is
ISUP again, or an operator starts afresh):

1. the soft step, once per episode:
   - the node waits in a bootinfo loader (an operator's reboot): a REBOOT order;
     stuck in PXEWAKEUP, the last order is re-sent `states.pxewakeup_retries`
     times first, as ever;
   - its OS is up (ISUP, TBSETUP): if it answers a ping, its IPOD
     (`recovery.ipod`); a node that does not answer goes straight on;
2. a BMC power cycle with a one-time PXE boot (a BMC that refuses the boot device
   is cycled anyway: the node's boot order is the site's), in the power
   controller's priority lane, `recovery.power_cycles` times at most;
3. then the node is marked PXEFAILED (the episode began in the loader) or
   BOOTFAILED, with the reason, and taken out of service: an out-of-service flag
   in the inventory (`node_lifecycle.out_of_service`), until an operator clears it
   (`bootherd node service in NODE`).

After a step the node is REBOOTING (or PXEWAKEUP for an order); if it shows no
boot contact within `recovery.reboot_timeout`, the next step comes.  A hung
kernel (BOOTING past `states.booting_timeout`) gets the power cycle at once.

The BMC's answer decides what follows a cycle: done; auth, config or unsupported
(a wrong password, no BMC in the inventory, Wake-on-LAN) are final and give up
at once; unreachable, timeout and the rest are tried again after
`recovery.bmc_retry_interval`, `recovery.bmc_retries` times, without counting as
a cycle.  Every step and its outcome is a line in the node's history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..boottype import BootType
from ..inventory.model import Node
from ..power.core import BMC_DRIVERS
from ..states import State
from .core import Coordinator, Effect, Remember, Stuck, Via

SOURCE = "ladder"  # node_events.source of the ladder's steps and power actions
LOADER_STATES = frozenset({State.PXEWAKEUP, State.PXEWAIT, State.PXEBOOTING})
OS_UP = frozenset({State.ISUP, State.TBSETUP})
# BMC errors that no retry will mend (power.core.ErrorKind values).
FINAL_ERRORS = frozenset({"auth", "config", "unsupported"})


@dataclass(frozen=True, slots=True)
class PowerCycle:
    """Power-cycle the node through its BMC, one-time PXE boot first (priority lane)."""

    node_id: str
    reason: str
    attempt: int
    fail_state: str  # recorded if the ladder gives up on this cycle's answer


@dataclass(frozen=True, slots=True)
class SendIpod:
    """Ping the node; if it answers, send its IPOD (a soft reboot)."""

    node_id: str
    ip: str
    reason: str


@dataclass(frozen=True)
class LadderSettings:
    pxewakeup_timeout: float = 20.0
    pxewakeup_retries: int = 2
    booting_timeout: float = 600.0
    reboot_timeout: float = 300.0
    power_cycles: int = 3
    bmc_retries: int = 5
    bmc_retry_interval: float = 60.0
    ipod: bool = True
    power_timeout: float = 20.0  # power.timeout: how long a cycle may be in flight
    reload_timeout: float = 1800.0  # states.reload_timeout: RELOADSETUP/RELOADING at most

    @classmethod
    def from_config(cls, cfg: Any) -> LadderSettings:
        st, r = cfg.states, cfg.recovery
        return cls(st.pxewakeup_timeout, st.pxewakeup_retries, st.booting_timeout,
                   r.reboot_timeout, r.power_cycles, r.bmc_retries, r.bmc_retry_interval,
                   r.ipod, cfg.power.timeout, st.reload_timeout)


class Ladder:
    """The recovery ladder as a `RecoveryPolicy` (see the module doc)."""

    retry_states = frozenset({State.PXEWAKEUP, State.REBOOTING})

    def __init__(self, settings: LadderSettings):
        self.s = settings
        self.timeouts = {State.PXEWAKEUP: settings.pxewakeup_timeout,
                         State.BOOTING: settings.booting_timeout,
                         State.TBSETUP: settings.booting_timeout,
                         State.REBOOTING: settings.reboot_timeout,
                         State.RELOADSETUP: settings.reload_timeout,
                         State.RELOADING: settings.reload_timeout}

    @classmethod
    def from_config(cls, cfg: Any) -> Ladder:
        return cls(LadderSettings.from_config(cfg))

    # -- entries --------------------------------------------------------------------

    def recover(self, stuck: Stuck, lc: Coordinator, now: float) -> list[Effect]:
        """The watcher found the node too long in a state (or a retry is due)."""
        nid, node, state, life = stuck.node_id, stuck.node, stuck.state, stuck.life
        if not life.started_in:
            life.started_in = state
        if stuck.recheck:
            return self._power(nid, "trying the power cycle again", lc, now)
        age = int(stuck.age)
        if state in (State.RELOADSETUP, State.RELOADING):
            # The reload is given up (which ends it); the operator orders it again.
            return lc.record(nid, State.RELOADFAILED, "watcher", f"{state} for {age} s", now)
        if state == State.PXEWAKEUP:
            if life.tries < self.s.pxewakeup_retries and lc.orders_up and node is not None \
                    and node.control_ip:
                return lc.order(node, None, now, resend=True, cause="recovery")
            return self._power(nid, f"no answer to {life.tries + 1} orders", lc, now)
        if state == State.REBOOTING:
            return self._power(nid, f"no boot contact {age} s after the reboot", lc, now)
        if state == State.TBSETUP and node is not None:
            soft = self._ipod(node, f"in TBSETUP for {age} s", lc, now)
            if soft:
                return soft
        return self._power(nid, f"in {state} for {age} s", lc, now)

    def reboot(self, node: Node, lc: Coordinator, now: float, source: str) -> list[Effect]:
        """An operator's (or an actor's) reboot: the softest step the node allows."""
        nid = node.node_id
        cur = lc.states.get(nid)
        state = cur[0] if cur else ""
        life = lc.life_of(nid)
        life.started_in = state or State.BOOTING
        why = f"reboot asked by {source}"
        if lc.waiting.get(nid) is Via.BOOTINFO and lc.orders_up and node.control_ip:
            life.soft_tried = True
            return lc.order(node, BootType.REBOOT, now, cause="operator")
        if state in OS_UP:
            soft = self._ipod(node, why, lc, now)
            if soft:
                return soft
        if life.bmc is not None and life.bmc not in BMC_DRIVERS:
            # Nothing to do but give up, and an operator's reboot must not take a
            # node out of service for what its inventory lacks: refused, unchanged.
            how = f"its power driver {life.bmc} cannot" if life.bmc else "no BMC in the inventory to"
            raise ValueError(f"cannot reboot {nid}: no soft step possible ({state or 'no state'})"
                             f" and {how} power-cycle it")
        return self._power(nid, why, lc, now)

    # -- outcomes the actors report -------------------------------------------------

    def ipod_done(self, e: SendIpod, answered: bool, sent: str, lc: Coordinator,
                  now: float) -> list[Effect]:
        """The node answered the ping and got its IPOD (`sent` says so), or it did not
        answer (or the IPOD could not be sent): then the power cycle comes now."""
        lc.life_of(e.node_id).deferred_until = 0.0
        if answered and sent:
            return [lc.note(e.node_id, "IPOD", SOURCE, f"{sent}: {e.reason}", now),
                    *lc.record(e.node_id, State.REBOOTING, SOURCE,
                               f"IPOD sent ({e.reason})", now)]
        why = sent or "it does not answer a ping"
        return [lc.note(e.node_id, "IPOD", SOURCE, f"no IPOD: {why}", now),
                *self._power(e.node_id, f"{e.reason}; {why}", lc, now)]

    def power_done(self, e: PowerCycle, ok: bool, error: str, message: str,
                   lc: Coordinator, now: float) -> list[Effect]:
        """The BMC's answer to a cycle (the controller recorded the POWER_CYCLE
        event with it).  Done: the node is REBOOTING since the cycle.  Final errors
        give up; the others retry later without counting as a cycle."""
        nid = e.node_id
        life = lc.life_of(nid)
        life.deferred_until = 0.0
        if ok:
            life.bmc_failures = 0
            return []
        if error in FINAL_ERRORS:
            return self._give_up(nid, e.fail_state, f"cannot power-cycle it ({error}): {message}",
                                 lc, now)
        life.cycles = max(0, life.cycles - 1)  # that cycle did not happen
        life.bmc_failures += 1
        if life.bmc_failures > self.s.bmc_retries:
            return self._give_up(nid, e.fail_state, f"its BMC failed {life.bmc_failures} times "
                                                    f"in a row ({error}): {message}", lc, now)
        lc.recheck(nid, now + self.s.bmc_retry_interval)
        life.deferred_until = now + self.s.bmc_retry_interval  # no timeout acts before the retry
        return [lc.note(nid, "POWER_RETRY", SOURCE,
                        f"BMC {error}: power cycle tried again in {self.s.bmc_retry_interval:g} s "
                        f"({life.bmc_failures} of {self.s.bmc_retries})", now),
                Remember(nid, {"power_cycles": life.cycles}, now)]

    # -- steps ------------------------------------------------------------------------

    def _ipod(self, node: Node, reason: str, lc: Coordinator, now: float) -> list[Effect]:
        life = lc.life_of(node.node_id)
        if not self.s.ipod or life.soft_tried or not node.control_ip:
            return []
        life.soft_tried = True
        life.deferred_until = now + 30.0  # the ping and the IPOD take seconds; ipod_done clears it
        return [SendIpod(node.node_id, node.control_ip, reason)]

    def _fail_state(self, started_in: str) -> str:
        return State.PXEFAILED if started_in in LOADER_STATES else State.BOOTFAILED

    def _power(self, nid: str, reason: str, lc: Coordinator, now: float) -> list[Effect]:
        life = lc.life_of(nid)
        fail_state = self._fail_state(life.started_in)
        if life.bmc is not None and life.bmc not in BMC_DRIVERS:
            how = f"its power driver {life.bmc} cannot" if life.bmc else "no BMC in the inventory to"
            return self._give_up(nid, fail_state, f"{reason}; {how} power-cycle it", lc, now)
        if life.cycles >= self.s.power_cycles:
            n = life.cycles
            return self._give_up(nid, fail_state, f"{reason}; {n} power cycle"
                                                  f"{'s' if n != 1 else ''} did not bring it up",
                                 lc, now)
        life.cycles += 1
        detail = f"power cycle {life.cycles} of {self.s.power_cycles}: {reason}"
        # Not a candidate while the cycle is queued or in flight (the BMC answers
        # within power.timeout; power_done clears this).
        life.deferred_until = now + 2 * self.s.power_timeout + 5.0
        return [*lc.record(nid, State.REBOOTING, SOURCE, detail, now),
                Remember(nid, {"power_cycles": life.cycles}, now),
                PowerCycle(nid, detail, life.cycles, fail_state)]

    def _give_up(self, nid: str, fail_state: str, reason: str, lc: Coordinator,
                 now: float) -> list[Effect]:
        lc.life_of(nid).deferred_until = 0.0
        return [*lc.record(nid, fail_state, SOURCE, f"{reason}; taken out of service", now),
                *lc.set_service(nid, reason, now, SOURCE)]

"""The power controller: runs one operation on many nodes, within the building's limits.

    results = await controller.run(PowerOp.ON, ["pc1", "pc2"], source="cli")

- at most ``power.max_concurrent`` BMC conversations at once (a BMC slot is
  freed only when its driver has really let go, even after a timeout);
- power-ons (on, cycle) start at least 1/``power.power_on_rate`` seconds apart,
  in the order asked, through one Ramp shared by every caller of this controller;
- a priority lane: a caller passing ``priority=True`` (the recovery ladder, an
  operator's reboot) is let into the ramp and onto a BMC slot before every
  waiting normal operation, so a recovery never waits behind a bulk power-on;
- one operation per node at a time (an operator's off and a batch's cycle never
  interleave on one BMC);
- every node gets a result within ``power.timeout`` (never a hang), and one
  node's failure never stops another's;
- every action (not a status query) is an event in the node's history, stamped
  with the moment its command went out: the ramp can be read back from events.

The controller knows no CLI, HTTP or database: it is built with its settings,
a function that loads BMC targets, a function that records events, its drivers
and its clocks, so the lifecycle coordinator can drive it as one more actor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .core import (
    EVENT_STATE,
    POWERS_ON,
    BmcTarget,
    ErrorKind,
    PowerError,
    PowerOp,
    PowerResult,
    Ramp,
    failed,
)
from .drivers import Driver

log = logging.getLogger("bootherd.power")

# (node_id, state, source, ts, detail): the event sink the controller writes to.
RecordEvent = Callable[[str, str, str, float, str], None]
LoadTargets = Callable[[list[str]], Awaitable[Mapping[str, BmcTarget]]]
OnResult = Callable[[PowerResult], None]


@dataclass(frozen=True, slots=True)
class _How:
    """How one batch runs: boot device, lane, and the caller named in events."""

    pxe: bool
    pxe_optional: bool
    priority: bool
    source: str


@dataclass(frozen=True)
class PowerSettings:
    timeout: float = 20.0
    max_concurrent: int = 64
    power_on_rate: float = 20.0
    ipmitool: str = "ipmitool"
    ipmi_cipher_suite: int = 3
    redfish_verify_tls: bool = True
    wol_address: str = "255.255.255.255"

    @classmethod
    def from_config(cls, config: Any) -> PowerSettings:
        p = config.power
        return cls(p.timeout, p.max_concurrent, p.power_on_rate, p.ipmitool, p.ipmi_cipher_suite,
                   p.redfish_verify_tls, p.wol_address)


class Lanes:
    """A semaphore with two FIFO queues: a waiter of the priority lane is let in
    before every waiter of the normal lane.  (asyncio.Semaphore has one queue.)"""

    def __init__(self, value: int):
        self._free = value
        self._queues: tuple[deque[asyncio.Future], deque[asyncio.Future]] = (deque(), deque())

    def waiting(self) -> int:
        return sum(1 for q in self._queues for f in q if not f.done())

    async def acquire(self, priority: bool = False) -> None:
        if self._free > 0 and not self.waiting():
            self._free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        queue = self._queues[0 if priority else 1]
        queue.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed over just as we were cancelled: pass it on
            else:
                queue.remove(fut)
            raise

    def release(self) -> None:
        for queue in self._queues:
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_result(None)
                    return
        self._free += 1


class PowerController:
    def __init__(self, settings: PowerSettings, load_targets: LoadTargets,
                 record_event: RecordEvent, drivers: Mapping[str, Driver],
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 counters: Counter | None = None):
        self.settings = settings
        self.load_targets = load_targets
        self.record_event = record_event
        self.drivers = drivers
        self.clock = clock
        self.monotonic = monotonic
        self.sleep = sleep
        self.counters: Counter = counters if counters is not None else Counter()
        self.ramp = Ramp(settings.power_on_rate)
        self._ramp_turn = Lanes(1)
        self._slots = Lanes(max(1, settings.max_concurrent))
        self._node_locks: dict[str, asyncio.Lock] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def run(self, op: PowerOp, node_ids: Iterable[str], *, pxe: bool = False,
                  pxe_optional: bool = False, priority: bool = False, source: str = "api",
                  on_result: OnResult | None = None) -> list[PowerResult]:
        """Run `op` on every node; one result per node, in the order given.

        `pxe_optional`: a BMC that refuses the one-time PXE boot is powered anyway
        (the message says so).  `priority`: the priority lane (see the module doc).
        Cancelling run() stops the nodes that have not started; commands already
        sent to a BMC finish and are recorded."""
        op = PowerOp(op)
        if pxe and op not in (PowerOp.ON, PowerOp.CYCLE, PowerOp.RESET):
            raise ValueError(f"a one-time PXE boot goes with on, cycle or reset, not {op}")
        ids = list(dict.fromkeys(node_ids))
        targets = await self.load_targets(ids)
        how = _How(pxe, pxe_optional, priority, source)
        tasks = [asyncio.ensure_future(self._one(op, nid, targets.get(nid), how, on_result))
                 for nid in ids]
        try:
            return list(await asyncio.gather(*tasks))
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            raise

    async def _one(self, op: PowerOp, node_id: str, target: BmcTarget | None, how: _How,
                   on_result: OnResult | None) -> PowerResult:
        source = how.source
        if target is None:
            res = failed(node_id, op, PowerError(
                ErrorKind.CONFIG, f"{node_id} has no power driver in the inventory "
                                  "(testbed file: [nodes.power])"), started=self.clock())
            self._finish(res, source, None, on_result)
            return res
        driver = self.drivers.get(target.driver)
        if driver is None:
            res = failed(node_id, op, PowerError(
                ErrorKind.CONFIG, f"{node_id}: unknown power driver {target.driver!r}"),
                target.driver, self.clock())
            self._finish(res, source, target, on_result)
            return res
        async with self._node_locks.setdefault(node_id, asyncio.Lock()):
            if op in POWERS_ON:
                # Power-ons queue for the ramp in the order asked (priority lane first)
                # and take a BMC slot only at its head: a long ramp holds one slot, not
                # max_concurrent of them, so status, off and reset are not stuck behind it.
                await self._ramp_turn.acquire(how.priority)
                try:
                    await self._slots.acquire(how.priority)
                    try:
                        while (wait := self.ramp.delay(self.monotonic())) > 0:
                            await self.sleep(wait)
                    except BaseException:
                        self._slots.release()
                        raise
                    self.ramp.start(self.monotonic())
                finally:
                    self._ramp_turn.release()
            else:
                await self._slots.acquire(how.priority)
            started = self.clock()
            # From here the command goes out: it finishes, and is recorded, even if
            # the batch is cancelled meanwhile.
            issue = asyncio.ensure_future(self._issue(op, target, driver, how, on_result,
                                                      started))
            return await asyncio.shield(issue)

    async def _issue(self, op: PowerOp, target: BmcTarget, driver: Driver, how: _How,
                     on_result: OnResult | None, started: float) -> PowerResult:
        res = await self._call(op, target, driver, how, started)
        self._finish(res, how.source, target, on_result)
        return res

    async def _call(self, op: PowerOp, target: BmcTarget, driver: Driver, how: _How,
                    started: float) -> PowerResult:
        timeout = self.settings.timeout
        t0 = self.monotonic()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        work = asyncio.ensure_future(driver.run(op, target, pxe=how.pxe, timeout=timeout,
                                                pxe_optional=how.pxe_optional))

        def let_go(_: object) -> None:  # the BMC slot is free once the driver has let go
            self.in_flight -= 1
            self._slots.release()
            if not work.cancelled() and work.exception() is not None \
                    and not isinstance(work.exception(), PowerError):
                log.warning("power driver %s failed on %s: %r", target.driver, target.node_id,
                            work.exception())

        work.add_done_callback(let_go)
        try:
            ans = await asyncio.wait_for(asyncio.shield(work), timeout)
        except TimeoutError:
            err = PowerError(ErrorKind.TIMEOUT, f"no answer from {target.where()} within "
                                                f"{timeout:g} s (power.timeout)")
            return failed(target.node_id, op, err, target.driver, started, self.monotonic() - t0)
        except PowerError as e:
            return failed(target.node_id, op, e, target.driver, started, self.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - a driver bug is one node's error, not the batch's
            err = PowerError(ErrorKind.PROTOCOL, f"{target.where()}: unexpected "
                                                 f"{type(e).__name__}: {str(e)[:200]}")
            return failed(target.node_id, op, err, target.driver, started, self.monotonic() - t0)
        return PowerResult(target.node_id, op, True, ans.power, ans.message, "", target.driver,
                           started, self.monotonic() - t0)

    def _finish(self, res: PowerResult, source: str, target: BmcTarget | None,
                on_result: OnResult | None) -> None:
        self.counters[f"{res.op}_{'ok' if res.ok else res.error}"] += 1
        if res.op in EVENT_STATE:
            where = f" ({target.where()}, {res.elapsed:.2f} s)" if target else ""
            detail = (res.message if res.ok else f"failed ({res.error}): {res.message}") + where
            try:
                self.record_event(res.node_id, EVENT_STATE[res.op], source[:16], res.started,
                                  detail[:1000])
            except Exception:  # noqa: BLE001 - the operation happened; say so in the log
                log.exception("recording the power event of %s failed", res.node_id)
        if on_result is not None:
            on_result(res)

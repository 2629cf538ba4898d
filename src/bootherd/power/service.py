"""How `bootherd serve` (and the CLI without a server) builds the power actors.

Everything is passed in: the configuration, the engine the targets are read
from, the event sink, the counters.  The lifecycle coordinator gets the same
controller as the API, so its power cycles share the building's caps.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from sqlalchemy import Engine

from .console import ConsoleService
from .controller import PowerController, PowerSettings, RecordEvent
from .drivers import make_drivers
from .targets import console_targets, load_targets


def build_controller(config: Any, engine: Engine, record_event: RecordEvent,
                     counters: Counter | None = None) -> tuple[PowerController, ThreadPoolExecutor]:
    """The controller and the thread pool of its blocking drivers (shut it down at exit).

    The pool has one thread per allowed BMC operation: a driver stuck past its
    timeout holds a thread, so it can never let more than max_concurrent
    conversations reach BMCs."""
    settings = PowerSettings.from_config(config)
    pool = ThreadPoolExecutor(max_workers=max(1, settings.max_concurrent),
                              thread_name_prefix="bootherd-power")

    async def targets(ids: list[str]) -> Any:
        return await asyncio.to_thread(load_targets, engine, ids)

    ctl = PowerController(settings, targets, record_event, make_drivers(settings, pool),
                          counters=counters)
    return ctl, pool


def build_consoles(config: Any, live: Any) -> ConsoleService:
    """The console capture service (service name "console")."""
    return ConsoleService(config, partial(console_targets, live.engine), live.on_change)

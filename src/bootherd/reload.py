"""SIGHUP: re-read the configuration, apply what can change live, say what needs a
restart; SIGUSR1: the process's state in the log.

Keys that can change in a running server are listed in LIVE with the function
that applies them; every other changed key is logged as needing a restart (its
old value stays in force: a half-applied configuration is worse than none).  A
configuration that no longer validates is refused as a whole, naming the key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import SCHEMA, Config, ConfigError, load
from .logs import reopen_log_files, setup_logging

log = logging.getLogger("bootherd.reload")


def _relog(cfg: Config) -> None:
    setup_logging(cfg.log.level, cfg.log.format, str(cfg.path(cfg.log.file))
                  if cfg.log.file else "")


# key -> what applies it (given the new configuration).  Logging is re-set up as a
# whole, so the three log keys share one applier.
LIVE: dict[str, Callable[[Config], None]] = {
    "log.level": _relog,
    "log.format": _relog,
    "log.file": _relog,
}


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted names of the keys whose values differ, in schema order."""
    out = []
    a, b = old.as_dict(), new.as_dict()
    for sec, (_, keys) in SCHEMA.items():
        for k in keys:
            if a[sec][k.name] != b[sec][k.name]:
                out.append(f"{sec}.{k.name}")
    return out


@dataclass
class Reloader:
    """What a running server re-reads on SIGHUP: the same file and --set overrides."""

    path: Any  # what -c named (None: found the same way as at start)
    overrides: list[str]
    current: Config
    # Extra appliers a service registers (key -> function of the new configuration).
    appliers: dict[str, Callable[[Config], None]] = field(default_factory=dict)

    def reload(self) -> dict[str, list[str]]:
        """Re-read and apply; returns {"applied": [...], "restart": [...]} (also logged)."""
        files = reopen_log_files()
        try:
            new = load(self.path, self.overrides)
        except ConfigError as e:
            log.error("SIGHUP: configuration not reloaded, it is refused: %s "
                      "(the running configuration stays)", e)
            return {"applied": [], "restart": [], "error": [str(e)]}
        keys = changed_keys(self.current, new)
        appliers = {**LIVE, **self.appliers}
        applied = [k for k in keys if k in appliers]
        restart = [k for k in keys if k not in appliers]
        done: set[int] = set()
        for k in applied:
            fn = appliers[k]
            if id(fn) not in done:  # one call per applier however many of its keys changed
                done.add(id(fn))
                fn(new)
        if applied:
            # Only the applied keys move to the new value: the others keep the start's.
            merged = {s: dict(v) for s, v in self.current.as_dict().items()}
            fresh = new.as_dict()
            for k in applied:
                sec, name = k.split(".", 1)
                merged[sec][name] = fresh[sec][name]
            from .config import Section
            self.current.sections.update({s: Section(s, v) for s, v in merged.items()})
        log.info("SIGHUP: configuration re-read from %s; applied: %s; need a restart: %s%s",
                 self.current.source or "built-in defaults", ", ".join(applied) or "none",
                 ", ".join(restart) or "none",
                 f"; reopened {', '.join(files)}" if files else "")
        return {"applied": applied, "restart": restart}


def dump_state(services: list[str], metrics: Any, live: Any) -> None:
    """SIGUSR1: a few log lines: the inventory, each protocol's counters, nodes by state."""
    from collections import Counter

    snap = live.snapshot
    log.info("SIGUSR1: state: services=%s nodes=%d generation=%s write_queue=%d",
             ",".join(services), len(snap.nodes), snap.generation, live.writer.q.qsize())
    for name, counters in sorted(metrics.counters.items()):
        items = " ".join(f"{k}={v}" for k, v in sorted(counters.items()) if v)
        log.info("SIGUSR1: %s %s", name, items or "(no traffic)")
    states = Counter(st for st, _ in live.states.values())
    log.info("SIGUSR1: nodes by state %s",
             " ".join(f"{k}={v}" for k, v in sorted(states.items())) or "(none recorded)")

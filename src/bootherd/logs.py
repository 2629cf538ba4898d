"""Structured log lines: one event per line, as logfmt text or JSON objects.

Every line carries `ts` (ISO 8601 with the zone offset), `level`, `logger` and
`msg`, then the event's own fields.  Code that has fields to report passes them
with `event(log, level, msg, key=value, ...)` (or `extra={"fields": {...}}`);
in JSON they are keys of the object, in text they are `key=value` pairs, never
prose inside `msg`.  A traceback stays on the event's line (`exc=...`, newlines
escaped), so one line is always one event.

`RateLimited` is for bad input from the network: a flood of malformed packets
from one source is counted by the caller and logged at most once per interval
per source, with the number of lines it held back.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

# Attributes every LogRecord has; anything else in a record came from `extra`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "fields"}


def event(logger: logging.Logger, level: int, msg: str, exc_info: Any = None,
          **fields: Any) -> None:
    """Log `msg` with structured fields (checked against the level before anything is built)."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, exc_info=exc_info, extra={"fields": fields})


def iso_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    out = dict(getattr(record, "fields", None) or {})
    for k, v in record.__dict__.items():
        if k not in _STANDARD and not k.startswith("_"):
            out.setdefault(k, v)
    return out


def _logfmt_value(v: Any) -> str:
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple, set, frozenset)):
        v = ",".join(str(x) for x in v)
    s = str(v)
    if s and not any(c in s for c in ' ="\\') and s.isprintable():
        return s
    return json.dumps(s)  # quoted, with newlines and quotes escaped


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": iso_time(record.created),
                               "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        for k, v in record_fields(record).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={iso_time(record.created)}", f"level={record.levelname.lower()}",
                 f"logger={record.name}", f"msg={_logfmt_value(record.getMessage())}"]
        parts += [f"{k}={_logfmt_value(v)}" for k, v in record_fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(level: str = "info", fmt: str = "text", file: str = "") -> None:
    """Log at `level` in `fmt` to standard error, or to `file` (reopened by
    reopen_log_files, which SIGHUP calls after logrotate moved it)."""
    handler: logging.Handler = logging.FileHandler(file, encoding="utf-8") if file \
        else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)


def reopen_log_files() -> list[str]:
    """Close and reopen every log file (the same path, a new file after rotation);
    returns their paths."""
    paths = []
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.acquire()
            try:
                if h.stream is not None:
                    h.stream.close()
                h.stream = h._open()
            finally:
                h.release()
            paths.append(h.baseFilename)
    return paths


class RateLimited:
    """Logs at most one line per `interval` seconds per key (a source address).

    The caller counts every occurrence in its metrics; this only bounds the log.
    A line that follows held-back ones says how many (`suppressed=N`).  The table
    of keys is bounded: past `max_keys` sources, expired entries are dropped, and
    when none has expired, new sources share one key.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0,
                 level: int = logging.WARNING, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = interval
        self.level = level
        self.max_keys = max_keys
        self.clock = clock
        self._last: dict[Any, float] = {}
        self._held: dict[Any, int] = {}

    def __call__(self, key: Any, msg: str, **fields: Any) -> bool:
        """Log unless `key` logged within the interval; True if a line was written."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= self.max_keys:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
            self._held = {k: n for k, n in self._held.items() if k in self._last}
            if len(self._last) >= self.max_keys:
                key = "(other sources)"
                if now - self._last.get(key, -self.interval) < self.interval:
                    self._held[key] = self._held.get(key, 0) + 1
                    return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            fields["suppressed"] = held
        event(self.logger, self.level, msg, **fields)
        return True

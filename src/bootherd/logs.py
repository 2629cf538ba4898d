"""Structured log lines: `ts level logger message key=value ...` or JSON objects."""

from __future__ import annotations

import json
import logging
import sys
import time


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        line = f"{ts}.{int(record.msecs):03d} {record.levelname.lower():7s} {record.name}: " \
               f"{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "text", file: str = "") -> None:
    """Log at `level` in `fmt` to standard error, or to `file` (reopened by
    reopen_log_files, which SIGHUP calls after logrotate moved it)."""
    handler: logging.Handler = logging.FileHandler(file, encoding="utf-8") if file \
        else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
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

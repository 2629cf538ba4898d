"""TFTP: the sans-IO core (:mod:`.core`), the request layer (:mod:`.sessions`), the file
store (:mod:`.store`) and the asyncio transport (:mod:`.server`) with its native data path
(:mod:`.native`).

``from bootherd.tftp import core`` loads the core alone: the transport, its sockets and
the C extensions are imported only when one of the names below is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TFTPServer": ".server",
    "Counters": ".sessions",
    "TransferStats": ".sessions",
    "FileCache": ".store",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value

"""N concurrent HTTP downloads of one file from any host: bench/http's load generator."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_http_run",
                                               Path(__file__).parents[1] / "http" / "run.py")
_http = importlib.util.module_from_spec(_spec)
sys.modules["bench_http_run"] = _http  # dataclasses look their module up there
_spec.loader.exec_module(_http)  # type: ignore[union-attr]


async def storm(host: str, port: int, path: str, size: int, n: int, deadline: float) -> dict:
    load, seconds = await _http.storm(port, path, size, n, deadline, host=host)
    return {"done": load.done, "seconds": seconds, "n503": load.n503, "errors": load.errors}

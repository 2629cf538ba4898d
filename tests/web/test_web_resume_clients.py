"""The exact client commands docs/http.md gives nodes, run against a busy server."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

import pytest
from web_helpers import (
    LARGE,
    Server,
    make_file,
    server_fixture,  # noqa: F401 - fixtures
)

# Keep these identical to docs/http.md.
CURL_CMD = ["curl", "-fsS", "--retry", "30", "--retry-delay", "2", "--retry-all-errors",
            "-C", "-", "-o", "{file}", "{url}"]
WGET_LOOP = "until busybox wget -q -c -O {file} {url}; do sleep 2; done"


def fill(cmd: list[str], file: Path, url: str) -> list[str]:
    return [c.format(file=file, url=url) for c in cmd]


async def busy_for(server: Server, seconds: float) -> int:
    """Hold every large-transfer slot for a while, as a storm would."""
    st = server.svc.state
    st.admission.queue_timeout = 0.3  # a short wait in line, then 503
    held = 0
    while st.admission.try_acquire():
        held += 1
    await asyncio.sleep(seconds)
    for _ in range(held):
        st.admission.release()
    return held


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_documented_curl_waits_out_503_and_resumes(server: Server, tmp_path: Path) -> None:
    data = make_file(server.root / "img.ndz", 4 * LARGE + 77, seed=11)
    url = f"{server.url}/files/img.ndz"
    out = tmp_path / "img.ndz"
    out.write_bytes(data[:LARGE])  # left over from an interrupted attempt
    busy = asyncio.create_task(busy_for(server, 2.5))
    await asyncio.sleep(0.1)
    p = await asyncio.create_subprocess_exec(*fill(CURL_CMD, out, url),
                                             stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(p.communicate(), 60)
    assert await busy == 4
    assert p.returncode == 0, err
    assert server.ctx.metrics.protocol("http")["refused_503"] >= 1
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox (busybox-static) not installed")
async def test_documented_busybox_wget_loop(server: Server, tmp_path: Path) -> None:
    data = make_file(server.root / "initrd.img", 3 * LARGE + 5, seed=13)
    url = f"{server.url}/files/initrd.img"
    out = tmp_path / "initrd.img"
    out.write_bytes(data[:1000])
    busy = asyncio.create_task(busy_for(server, 2.5))
    await asyncio.sleep(0.1)
    p = await asyncio.create_subprocess_shell(WGET_LOOP.format(file=out, url=url),
                                              stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(p.communicate(), 60)
    await busy
    assert p.returncode == 0, err
    assert b"503" in err  # it was told to come back at least once
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()

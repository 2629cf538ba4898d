"""1,000 concurrent transfers of a 1 MiB file, each client from its own loopback address."""

import asyncio
import os

import pytest

from bootherd.tftp import TFTPServer
from bootherd.tftp.client import fetch

from .conftest import sha

pytestmark = pytest.mark.usefixtures("datapath")  # native data path and Python


def client_ip(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


@pytest.mark.slow
async def test_thousand_concurrent_transfers(tmp_path, datapath):
    data = os.urandom(2**20)
    (tmp_path / "f1m").write_bytes(data)
    want = sha(data)
    done = []
    async with TFTPServer("127.0.0.1", 0, str(tmp_path), **datapath, on_transfer_done=done.append) as srv:
        results = await asyncio.gather(
            *[
                fetch("127.0.0.1", srv.port, "f1m", keep=False, timeout=2.0, retries=5,
                      options={"blksize": 1468, "windowsize": 8, "tsize": 0},
                      local_addr=(client_ip(i), 0))  # fmt: skip
                for i in range(1000)
            ],
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        assert all(r.sha256 == want for r in results)
        for _ in range(200):
            if len(done) == 1000:
                break
            await asyncio.sleep(0.05)
        c = srv.counters
        assert c.transfers_ok == 1000 and c.transfers_failed == 0 and c.busy_rejections == 0
        assert all(s.ok for s in done) and c.active_transfers == 0

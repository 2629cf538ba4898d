import hashlib
import os

import pytest

from bootherd.tftp import TFTPServer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "small.txt").write_bytes(b"hello\nworld\r\n")
    (r / "f1m").write_bytes(os.urandom(2**20))
    (r / "sub" / "inner.bin").write_bytes(os.urandom(5000))
    (r / "empty").write_bytes(b"")
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the root")
    (r / "escape").symlink_to(secret)
    (r / "sub" / "up").symlink_to("../../secret")
    (r / "inside-link").symlink_to("sub/inner.bin")
    return r


@pytest.fixture
async def server(root):
    srv = TFTPServer("127.0.0.1", 0, str(root), default_timeout=0.2, retries=4)
    await srv.start()
    yield srv
    await srv.stop()

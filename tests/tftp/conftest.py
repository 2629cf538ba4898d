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
async def server(root, datapath):
    srv = TFTPServer("127.0.0.1", 0, str(root), **datapath, default_timeout=0.2, retries=4)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture(params=["native", "python"])
def datapath(request):
    """Established reads in the native data path, or in Python: the TFTPServer keywords
    (``tftp.native_data_path``) a test passes on."""
    from bootherd.tftp import native

    if request.param == "native" and not native.available:
        if os.environ.get("CI"):
            pytest.fail("bootherd._tftpdata was not built")
        pytest.skip("native data path not built")
    return {"native_data_path": request.param == "native"}


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


class NativeRead:
    """A read transfer as the server runs it with the native data path: the Python core
    until its OACK is out (or, with ``at_oack`` false or no options, its first window),
    then the C machine (``bootherd._tftpdata.ReadMachine``, the code the Pump runs),
    handed over as the server hands transfers to the Pump.

    It answers the events and attributes of :class:`~bootherd.tftp.core.ReadTransfer`, so
    the core's event vectors run against the C rules too; the attributes are what the
    server sees once it has adopted the machine's outcome."""

    def __init__(self, source, at_oack=True, **kw):
        from bootherd.tftp.core import ReadTransfer

        self.py = ReadTransfer(source, **kw)
        self.c = None
        self.now = 0.0
        self.at_oack = at_oack

    def _hand_over(self, result, now):
        from bootherd import _tftpdata

        py = self.py
        if self.c is None and not py.done and (py.sent > 0 or self.at_oack and py.oack_pending):
            buffer, file_fd = py.source.native_source()
            self.c = _tftpdata.ReadMachine(now, source=buffer, file_fd=file_fd,
                                           **py.handover(now).as_kwargs())  # fmt: skip
        return result

    def start(self, now):
        self.now = now
        return self._hand_over(self.py.start(now), now)

    def on_packet(self, data, now):
        from bootherd.tftp.core import MalformedPacket

        self.now = now
        if self.c is None:
            return self._hand_over(self.py.on_packet(data, now), now)
        try:
            return self.c.on_packet(data, now)
        except ValueError:
            raise MalformedPacket("malformed (native)") from None

    def on_timer(self, now):
        self.now = now
        if self.c is None:
            return self._hand_over(self.py.on_timer(now), now)
        return self.c.on_timer(now)

    def __getattr__(self, name):
        if self.c is None:
            return getattr(self.py, name)
        if name == "deadline":
            return self.c.deadline
        import copy

        from bootherd.tftp import native

        seen = copy.copy(self.py)
        seen.adopt(native.progress(self.c.outcome(self.now), self.now))
        return getattr(seen, name)


@pytest.fixture(params=["python", "native", "native_after_window"])
def make(request):
    """``make(data, **options)``: a read transfer of ``data`` in the Python core, or as the
    native data path runs it (:class:`NativeRead`): from its OACK on (a file the store
    has ready), or from its first window (one first read at ACK 0)."""
    from bootherd.tftp import core, native

    if request.param == "python":
        return lambda data, **kw: core.ReadTransfer(core.BytesSource(data), **kw)
    if not native.available:
        if os.environ.get("CI"):
            pytest.fail("bootherd._tftpdata was not built")
        pytest.skip("native data path not built")
    at_oack = request.param == "native"
    return lambda data, **kw: NativeRead(core.BytesSource(data), at_oack=at_oack, **kw)

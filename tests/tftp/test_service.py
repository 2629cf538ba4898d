"""The TFTP service builds its server from the configuration: every tftp key reaches it."""

from types import SimpleNamespace

from bootherd.config import build
from bootherd.metrics import Metrics
from bootherd.tftp.service import TFTPService


async def test_config_keys_reach_the_server(tmp_path):
    cfg = build({"tftp": {"port": 0, "root": str(tmp_path / "root")}},
                ["tftp.native_send=false", "tftp.udp_gso=false", "tftp.native_data_path=false",
                 "tftp.max_windowsize=16", "tftp.queue_wait=0.5", "tftp.max_upload=1000",
                 "tftp.timeout=2.5"], base_dir=tmp_path)  # fmt: skip
    svc = TFTPService(SimpleNamespace(config=cfg, metrics=Metrics()), None)  # no transfers
    srv = svc.server
    assert (srv.native_send, srv.udp_gso, srv.native_data_path) == (False, False, False)
    lim = srv.requests.limits
    assert (lim.max_windowsize, lim.queue_wait, lim.max_upload, lim.default_timeout) == (
        16, 0.5, 1000, 2.5)
    await svc.start()
    try:
        assert srv.sender is None and srv.pump is None
    finally:
        await svc.stop()

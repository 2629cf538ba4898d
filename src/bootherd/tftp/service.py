"""TFTP as a bootherd service: configuration, per-node files (iPXE's, GRUB's), the
distribution's loaders where the root lacks them, loader fetches reported to the
lifecycle coordinator."""

from __future__ import annotations

import logging
from typing import Any

from .. import policy
from ..bootinfo.grub import GrubConfigs
from ..loaders import SystemLoaders
from ..netaddr import local_address
from .server import TFTPServer, TransferStats

log = logging.getLogger("bootherd.tftp")


class TFTPService:
    name = "tftp"

    def __init__(self, ctx: Any, lifecycle: Any, grub: GrubConfigs | None = None):
        self.ctx = ctx
        self.lifecycle = lifecycle
        cfg = ctx.config.tftp
        root = ctx.config.path(cfg.root)
        root.mkdir(parents=True, exist_ok=True)
        upload = str(ctx.config.path(cfg.upload_dir)) if cfg.upload_dir else None
        self.grub = grub  # GRUB's per-node configurations (bootherd.service.wire hands one)
        self.system_loaders = SystemLoaders(root, cfg.system_loaders)
        self.server = TFTPServer(
            cfg.address, cfg.port, str(root), upload_dir=upload, max_blksize=cfg.max_blksize,
            max_windowsize=cfg.max_windowsize, default_timeout=cfg.timeout,
            retries=cfg.retries, max_transfers=cfg.max_transfers,
            max_per_client=cfg.max_per_client, queue_wait=cfg.queue_wait,
            cache_bytes=cfg.cache_bytes, max_upload=cfg.max_upload,
            native_send=cfg.native_send, udp_gso=cfg.udp_gso,
            native_data_path=cfg.native_data_path, listen_rcvbuf=cfg.rcvbuf,
            resolver=self._resolve, on_transfer_done=self._done,
            log_requests="tftp" in ctx.config.log.requests,
            bad_input_interval=ctx.config.log.bad_input_interval)
        # Counted in the same family as every other service's events (labels, not names).
        ctx.metrics.count_fields("tftp", self.server.counters, gauges=("active_transfers",))
        ctx.metrics.count("tftp", "listen_drops", self.server.listen_drops)

    def _resolve(self, client_ip: str, path: str) -> bytes | None:
        """Per-node files (iPXE's, GRUB's), else a system loader the root lacks."""
        cfg = self.ctx.config

        def here() -> str:  # the address the request arrived on (a route lookup)
            return local_address(cfg.tftp.address, client_ip)

        data = None
        if path.lstrip("/") == policy.TFTP_NODE_SCRIPT:
            data = policy.tftp_node_file(self.ctx.live.snapshot, client_ip, path, cfg,
                                         policy.advertised(cfg, here()))
        if data is None and self.grub is not None:
            data = self.grub.answer(path, client_ip, here)
        if data is None:
            data = self.system_loaders.read(path)
            if data is not None:
                log.debug("tftp: %s asked for %s: the system's %s", client_ip, path,
                          self.system_loaders.path(path))
        return data

    def _done(self, st: TransferStats) -> None:
        log.debug("tftp: %s %s %s: %s, %d bytes in %d blocks, options %s", st.client_ip,
                  st.direction, st.path, "probe" if st.probe else "ok" if st.ok else st.error,
                  st.bytes, st.blocks, st.options)
        if not st.ok or st.probe or st.direction != "read":
            return
        node = self.ctx.live.snapshot.by_ip.get(st.client_ip)
        if node is not None:
            self.lifecycle.loader_fetched(node.node_id, st.path, st.bytes)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

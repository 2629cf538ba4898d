"""TFTP server: sans-IO core (:mod:`.core`) and asyncio transport (:mod:`.server`)."""

from .server import Counters, FileCache, TFTPServer, TransferStats

__all__ = ["Counters", "FileCache", "TFTPServer", "TransferStats"]

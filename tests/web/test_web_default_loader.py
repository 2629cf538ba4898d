"""The default UEFI HTTP boot loader URL answers on a fresh install: with nothing in the
TFTP root, GET /boot/ipxe.efi (what DHCP hands an HTTPClient with no loader named) is
Debian's ipxe.efi, over the real HTTP server; a name no package provides is still 404."""

from __future__ import annotations

import aiohttp
from web_helpers import Server, server_fixture  # noqa: F401

from bootherd.firmware import DEFAULT_LOADERS
from bootherd.loaders import SystemLoaders


async def test_default_http_loader_url_is_served_from_the_package(server: Server) -> None:
    assert not any(server.boot.iterdir())  # a fresh install's empty root
    name = DEFAULT_LOADERS["http"]
    assert name == "ipxe.efi"
    package = SystemLoaders(server.boot, True).read(name)
    assert package is not None, "setup.sh installs Debian's ipxe"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/boot/{name}") as r:
            assert r.status == 200
            assert await r.read() == package
        async with http.get(f"{server.url}/boot/no-such-loader.efi") as r:
            assert r.status == 404

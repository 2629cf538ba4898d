"""The console's reload action and its next_os check, over HTTP against a real server:
a signed-in POST reloads a node with a disk image the inventory records (RELOADSETUP,
source `ui`, in its events and on its page; its next boot question is the imaging
MFS); without a session or with a bad CSRF token nothing happens and a clear page
says why; an unknown, missing or unpicked image is refused with a sentence, as is a
next_os that is unknown or whose kernel file the server lacks."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_ui_http import client, no_traceback, sign_in
from web_helpers import make_file, start_server, stop_server

from bootherd.imaging.store import ImageStore
from bootherd.inventory import ops


async def test_reload_from_the_node_page_and_its_refusals(tmp_path: Path) -> None:
    s = await start_server(tmp_path, extra={
        "imaging": {"mfs_kernel": "mfs/vmlinuz", "root": str(tmp_path / "images")}})
    live = s.ctx.live
    try:
        raw = tmp_path / "disk.raw"
        make_file(raw, 3 << 20)
        store = ImageStore(s.ctx.config.path(s.ctx.config.imaging.root), live.engine)
        store.create(str(raw), "img1", chunk_size=1 << 20)
        store.create(str(raw), "gone1", chunk_size=1 << 20)
        store.path("gone1").unlink()
        url = s.url + "/ui/nodes/{}/actions/reload"
        async with client() as c:
            csrf = await sign_in(c, s)
            page = await (await c.get(s.url + "/ui/nodes/pc1")).text()
            assert 'id="action-reload"' in page and '<option value="img1"' in page
            assert '<option value="gone1"' not in page  # its file is not here

            # Refused before anything happens: no session, a bad or missing CSRF token.
            async with client() as anon:
                r = await anon.post(url.format("pc1"), data={"csrf": csrf, "value": "img1",
                                                             "confirmed": "1"})
                text = await r.text()
                assert r.status == 401 and 'type="password"' in text and "not signed in" in text
                no_traceback(text)
            for form in ({"value": "img1", "confirmed": "1"},
                         {"csrf": "forged", "value": "img1", "confirmed": "1"}):
                r = await c.post(url.format("pc1"), data=form)
                text = await r.text()
                assert r.status == 403 and "CSRF token" in text, form
                no_traceback(text)
            assert live.state_of("pc1") is None  # nothing recorded: nothing done

            j = {"Accept": "application/json", "X-CSRF-Token": csrf}
            for value, status, words in (("", 400, "pick the disk image"),
                                         ("nosuch", 404, "no disk image 'nosuch'"),
                                         ("gone1", 409, "image gone1: file missing"),
                                         ("../x", 400, "an image name is")):
                r = await c.post(url.format("pc1"), data={"value": value, "confirmed": "1"},
                                 headers=j)
                assert r.status == status and words in (await r.json())["error"], value
            assert live.state_of("pc1") is None

            # Signed in, the page's token, confirmed: the reload starts.
            r = await c.post(url.format("pc1"), data={"csrf": csrf, "value": "img1",
                                                      "confirmed": "1"})
            text = await r.text()
            assert r.status == 200 and "reload img1" in text, text[-600:]
            assert live.state_of("pc1")[0] == "RELOADSETUP"
            assert s.wiring.lifecycle.core.life["pc1"].reload == "img1"
            for _ in range(50):
                rows = await asyncio.to_thread(ops.node_events, live.engine, "pc1", 20)
                if any(e["state"] == "RELOADSETUP" and e["source"] == "ui" for e in rows):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"no RELOADSETUP event from the console: {rows}")
            page = await (await c.get(s.url + "/ui/nodes/pc1")).text()
            assert "RELOADSETUP" in page
            mac = live.snapshot.nodes["pc1"].interfaces[0].mac.replace(":", "-")
            script = await (await c.get(f"{s.url}/ipxe?mac={mac}")).text()
            assert "bootherd.image=img1" in script, script
    finally:
        await stop_server(s)


async def test_next_os_refuses_an_unknown_os_and_a_missing_kernel(tmp_path: Path) -> None:
    s = await start_server(tmp_path)
    try:
        url = s.url + "/ui/nodes/pc2/actions/next-os"
        async with client() as c:
            csrf = await sign_in(c, s)
            form = {"csrf": csrf, "confirmed": "1"}
            r = await c.post(url, data={**form, "value": "NOPE-OS"})
            text = await r.text()
            assert r.status == 400 and "no os &#39;NOPE-OS&#39;" in text
            no_traceback(text)
            # LINUX-NETBOOT is a kernel image: kernels/vmlinuz is not under http.root yet.
            r = await c.post(url, data={**form, "value": "LINUX-NETBOOT"},
                             headers={"Accept": "application/json"})
            err = (await r.json())["error"]
            assert r.status == 409 and "missing" in err and "vmlinuz" in err, err
            assert ops.show_node(s.ctx.live.engine, "pc2")["next_os"] is None
            make_file(s.root / "kernels" / "vmlinuz", 1024)
            make_file(s.root / "kernels" / "initrd.img", 1024)
            r = await c.post(url, data={**form, "value": "LINUX-NETBOOT"})
            assert r.status == 200 and "next_os set to LINUX-NETBOOT" in await r.text()
            assert ops.show_node(s.ctx.live.engine, "pc2")["next_os"] == "LINUX-NETBOOT"
    finally:
        await stop_server(s)

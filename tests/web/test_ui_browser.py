"""The console in a real browser: headless Chromium (Debian's, driven by Selenium and
Debian's chromedriver) against a real `bootherd serve`, with the storm simulator booting
200 nodes while the page watches.

One server and one browser for the module, in this order: sign in; the overview follows a
200-node storm to 200 ISUP without a reload (a screenshot mid-storm); a node page with its
events (a screenshot); a waiting node whose wake order was lost is woken from its page and
boots; a node behind a real BMC (OpenIPMI's ipmi_sim) is power-cycled from its page
while its serial console (a shell behind a console server's TCP port) is followed live;
an action without a session, and one posted from another site, are refused.
Screenshots are written to the test's folder and copied to /tmp/bootherd-ui-*.png.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bootherd.bootinfo import codec
from bootherd.imaging.store import ImageStore
from bootherd.inventory import ops
from bootherd.inventory.db import make_engine
from bootherd.inventory.snapshot import load as load_snapshot
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.policy import BootType
from bootherd.procs import free_port, terminate
from bootherd.web.ui.nodes import natural_order

sys.path.insert(0, str(Path(__file__).parents[1] / "multi"))
sys.path.insert(0, str(Path(__file__).parents[1] / "power"))
from bmc_helpers import PASSWORD, USER, need_ipmi_sim, start_ipmi_sim  # noqa: E402
from multi_helpers import deploy, storm  # noqa: E402
from test_power_console import start_console_server  # noqa: E402
from web_helpers import make_file, with_power  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
NODES = 200
NET = 141                      # nodes on 127.141.x, the server on 127.142.0.1
SHOTS = Path("/tmp")

pytestmark = pytest.mark.slow

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
                allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):  # noqa: ANN201
    work = tmp_path_factory.mktemp("ui")
    db = f"sqlite:///{work}/inventory.db"
    # Long enough that the watcher does not re-send the lost order of the wake test itself.
    dep = deploy(work, db, servers=1, nodes=NODES, net=NET,
                 extra="[ui]\nupdate_interval = 0.25\n[console]\nenabled = true\n"
                       "reconnect_max = 1.0\nrescan_interval = 1.0\n")
    text = dep.configs[0].read_text().replace("pxewakeup_timeout = 3.0", "pxewakeup_timeout = 60.0")
    # A disk image to reload a node with (the reload test).
    text = text.replace("[imaging]\n", f'[imaging]\nmfs_kernel = "mfs/vmlinuz"\n'
                                        f'root = "{work / "images"}"\n')
    dep.configs[0].write_text(text)
    make_file(work / "disk.raw", 1 << 20)
    # The last node, outside the storm, has a BMC and a serial console (as deploy's file,
    # with its [nodes.power]).
    need_ipmi_sim()
    engine = make_engine(db)
    ImageStore(work / "images", engine).create(str(work / "disk.raw"), "img1",
                                               chunk_size=1 << 20)
    powered = natural_order(load_snapshot(engine))[-1]
    bmc = start_ipmi_sim(work / "bmc")
    console_port = free_port()
    console = start_console_server(console_port)
    import_testbed(engine, with_power(generate(NODES + 20, subnet=f"127.{NET}.0.0/16", seed=3), {
        powered: {"driver": "ipmi", "address": "127.0.0.1", "port": bmc.port, "user": USER,
                  "password": PASSWORD, "console": f"tcp:127.0.0.1:{console_port}"}}))
    engine.dispose()
    try:
        dep.start(0)
        token = (dep.configs[0].parent / "admin-token").read_text().strip()
        yield {"dep": dep, "db": db, "token": token, "work": work, "bmc": bmc,
               "powered": powered, "url": f"http://{dep.hosts[0]}:{dep.ports['http']}"}
    finally:
        dep.stop()
        terminate(console, 5)
        bmc.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):  # noqa: ANN201
    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(a)
    drv = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def shot(drv, tmp_path: Path, name: str) -> Path:  # noqa: ANN001
    p = tmp_path / f"{name}.png"
    drv.save_screenshot(str(p))
    shutil.copy(p, SHOTS / f"bootherd-ui-{name}.png")
    return p


def wait(drv, cond, timeout: float = 30.0, what: str = ""):  # noqa: ANN001, ANN201
    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.1).until(lambda d: cond(d))
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what or cond}: {drv.current_url}\n"
                             + drv.find_element(By.TAG_NAME, "body").text[:2000]) from None


def phase_count(drv, phase: str) -> int:  # noqa: ANN001
    cell = drv.find_element(By.CSS_SELECTOR, f'#phases tr[data-key="{phase}"] td')
    return int(cell.text or 0)


def _attr(drv, css: str, name: str) -> str | None:  # noqa: ANN001
    """An attribute of an element the page may be replacing meanwhile (None: try again)."""
    try:
        return drv.find_element(By.CSS_SELECTOR, css).get_attribute(name)
    except (StaleElementReferenceException, NoSuchElementException):
        return None


def take_action(drv, name: str, nid: str, asks: str, done: str) -> str:  # noqa: ANN001
    """Click an action's button, accept its confirmation (naming the node and `asks`),
    wait for its result line containing `done`; returns that line."""
    drv.find_element(By.CSS_SELECTOR, f"#action-{name} button").click()
    alert = wait(drv, lambda d: d.switch_to.alert, 5, "the confirmation")
    assert nid in alert.text and asks in alert.text, alert.text
    alert.accept()
    wait(drv, lambda d: done in d.find_element(By.ID, "action-result").text, 30,
         f"the result of {name}")
    return drv.find_element(By.ID, "action-result").text


def sign_in(drv, served: dict, path: str = "/ui/") -> None:  # noqa: ANN001
    drv.get(served["url"] + path)
    wait(drv, lambda d: d.find_elements(By.ID, "token"), what="the sign-in form")
    assert "/ui/login" in drv.current_url and "token" not in drv.current_url.split("?")[-1]
    drv.find_element(By.ID, "token").send_keys(served["token"])
    drv.find_element(By.ID, "signin").click()
    # The sign-in page's own address ends with ?next=<path>: wait until it is left.
    wait(drv, lambda d: "/ui/login" not in d.current_url and d.current_url.endswith(path),
         what=f"{path} after sign-in")


def test_sign_in_and_watch_a_200_node_storm(served, browser, tmp_path):  # noqa: ANN001
    drv = browser
    drv.get(served["url"] + "/ui/login")
    drv.find_element(By.ID, "token").send_keys("not-the-token")
    drv.find_element(By.ID, "signin").click()
    # The refusal is the page the form's POST returns: wait for it, the click does not.
    message = wait(drv, lambda d: d.find_elements(By.ID, "login-message"), what="the refusal")
    assert "not the admin token" in message[0].text
    sign_in(drv, served)
    cookie = drv.get_cookie("bootherd_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui/"
    assert drv.execute_script("return document.cookie") == ""  # HttpOnly: no script sees it
    wait(drv, lambda d: d.execute_script("return window.bootherdConsole.hello") >= 1,
         what="the update stream")
    drv.execute_script("window.notReloaded = true")
    assert phase_count(drv, "up") == 0

    result: dict = {}
    t = threading.Thread(target=lambda: result.update(
        zip(("raw", "summary", "started"), storm(served["dep"], NODES, NET, seed=7, spread=3.0),
            strict=True)))
    t.start()
    try:
        def mid_storm(d) -> bool:  # noqa: ANN001
            booting = sum(phase_count(d, p) for p in ("dhcp", "tftp", "loader", "waiting", "os",
                                                        "setup"))
            samples = d.execute_script("return window.bootherdConsole.samples")
            return booting > 0 and samples >= 3 and 0 < phase_count(d, "up") < NODES
        wait(drv, mid_storm, 90, "the storm in progress")
        shot(drv, tmp_path, "overview-mid-storm")
        wait(drv, lambda d: phase_count(d, "up") == NODES, 120, f"{NODES} nodes up")
    finally:
        t.join(200)
    assert result["summary"]["reached_isup"] == NODES, result["summary"]["failure_reasons"]
    assert drv.execute_script("return window.notReloaded") is True
    isup = drv.find_element(By.CSS_SELECTOR, '#states tr[data-key="ISUP"] td').text
    assert int(isup) == NODES, drv.find_element(By.ID, "states").text
    assert drv.execute_script("return window.bootherdConsole.updates") >= 3
    pct = drv.find_element(By.ID, "percentiles").text
    assert "p99" in pct and " s" in pct
    booted = drv.find_element(By.CSS_SELECTOR, '#percentiles [data-k="up"]').text
    assert int(booted) == NODES, pct
    servers = drv.find_element(By.ID, "servers").text
    assert "srv0" in servers and "ago" in servers
    shot(drv, tmp_path, "overview-after-storm")
    drv.get(served["url"] + "/ui/storm")
    wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "#hist rect"), what="the histogram")
    shot(drv, tmp_path, "storm")


def test_node_page_shows_events_decision_and_config(served, browser, tmp_path):  # noqa: ANN001
    drv = browser
    drv.get(served["url"] + "/ui/nodes?q=" + "pc17")
    wait(drv, lambda d: d.find_elements(By.CSS_SELECTOR, '#nodes tr[data-node="pc17"]'),
         what="pc17 in the table")
    href = wait(drv, lambda d: _attr(d, '#nodes a[href="/ui/nodes/pc17"]', "href"),
                what="the link to pc17")
    drv.get(href)
    wait(drv, lambda d: d.find_elements(By.ID, "events"), what="the node page")
    events = drv.find_element(By.ID, "events").text
    for state in ("PXEBOOTING", "BOOTING", "TBSETUP", "ISUP"):
        assert state in events, events
    assert drv.find_element(By.ID, "node-state").text == "ISUP"
    decision = drv.find_element(By.ID, "decision").text
    assert "because" in decision
    assert "TMCD configuration" in drv.find_element(By.ID, "tmcd").text
    assert drv.find_elements(By.CSS_SELECTOR, "#tmcd details")
    shot(drv, tmp_path, "node-page")
    drv.get(served["url"] + "/ui/nodes?sort=since&per_page=25")
    shot(drv, tmp_path, "nodes")


def _loader(served: dict, node_ip: str) -> socket.socket:
    """A node's loader: its socket on the node's address at bootinfo's client port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((node_ip, served["dep"].ports["client"]))
    s.settimeout(10)
    return s


def _ask(served: dict, s: socket.socket) -> codec.BootWhat:
    s.sendto(codec.request(), (served["dep"].hosts[0], served["dep"].ports["bootinfo"]))
    while True:
        data, _addr = s.recvfrom(1024)
        pkt = codec.decode(data)
        if pkt.opcode == codec.Opcode.REPLY:
            return pkt.boot_what()


def _order(s: socket.socket, timeout: float) -> codec.BootWhat | None:
    s.settimeout(timeout)
    try:
        while True:
            data, _addr = s.recvfrom(1024)
            pkt = codec.decode(data)
            if pkt.opcode == codec.Opcode.ORDER:
                return pkt.boot_what()
    except TimeoutError:
        return None


def _tmcc(served: dict, node_ip: str, *cmd: str) -> None:
    dep = served["dep"]
    subprocess.run([sys.executable, "-m", "bootherd.tmcd.client", "-s", dep.hosts[0],
                    "-p", str(dep.ports["tmcd"]), "-P", "0", "-l", node_ip, *cmd],
                   check=True, capture_output=True, timeout=30)


def test_wake_a_waiting_node_and_watch_it_boot(served, browser, tmp_path):  # noqa: ANN001
    """The node's wake order after its swap-in is lost (its loader did not hear it); the
    operator sees it stuck waiting and wakes it from its page."""
    drv = browser
    engine = make_engine(served["db"])
    snap = load_snapshot(engine)
    storm_nodes = set(natural_order(snap)[:NODES])
    nid = next(n for n in natural_order(snap) if n not in storm_nodes
               and snap.nodes[n].allocation is None and snap.nodes[n].control_ip)
    ip = snap.nodes[nid].control_ip
    loader = _loader(served, ip)
    try:
        assert _ask(served, loader).type == BootType.WAIT
        ops.allocate(engine, "storm", "storm", nid, nid)
        lost = _order(loader, 15)  # the server's own wake-up: this loader "misses" it
        assert lost is not None and lost.type == BootType.AUTO
        drv.get(served["url"] + f"/ui/nodes/{nid}")
        wait(drv, lambda d: d.find_element(By.ID, "node-state").text == "PXEWAKEUP",
             what="the node waiting for its wake-up")
        wait(drv, lambda d: "PART" in d.find_element(By.ID, "decision").text
             or "MFS" in d.find_element(By.ID, "decision").text
             or "MB" in d.find_element(By.ID, "decision").text, what="a boot decision")
        drv.execute_script("window.notReloaded = true")
        take_action(drv, "wake", nid, "", "Done: sent AUTO order")
        order = _order(loader, 10)
        assert order is not None and order.type == BootType.AUTO
        answer = _ask(served, loader)
        assert answer.type != BootType.WAIT
        wait(drv, lambda d: d.find_element(By.ID, "node-state").text == "BOOTING",
             what="BOOTING pushed to the page")
        _tmcc(served, ip, "state", "TBSETUP")
        _tmcc(served, ip, "state", "ISUP")
        wait(drv, lambda d: d.find_element(By.ID, "node-state").text == "ISUP",
             what="ISUP pushed to the page")
        rows = [r.text for r in drv.find_elements(By.CSS_SELECTOR, "#events tbody tr")]
        assert rows[0].split()[2] == "ISUP", rows[:5]
        # The lost wake-up and the operator's, each once (the page merged what the database
        # had, what it did not have yet, and what came while the page loaded).
        assert sum("PXEWAKEUP" in r for r in rows) == 2, rows
        assert len(rows) == len(set(rows)), rows
        assert drv.execute_script("return window.notReloaded") is True
        shot(drv, tmp_path, "node-woken")
    finally:
        loader.close()
        engine.dispose()


async def _type_on_console(served: dict, node: str, line: bytes) -> None:
    """An operator at `bootherd node console`: the admin API's websocket, as the writer."""
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{served['url']}/api/nodes/{node}/console?write=1",
            headers={"Authorization": f"Bearer {served['token']}"}) as ws:
        assert (await ws.receive_json(timeout=10))["write"] is True
        await ws.send_bytes(line)
        await asyncio.sleep(0.5)


def test_power_cycle_a_node_while_following_its_console(served, browser, tmp_path):  # noqa: ANN001
    drv = browser
    nid, bmc = served["powered"], served["bmc"]
    drv.get(served["url"] + f"/ui/nodes/{nid}")
    if "/ui/login" in drv.current_url:  # run alone (-k): sign in first
        sign_in(drv, served, f"/ui/nodes/{nid}")
    wait(drv, lambda d: "connected, live" in d.find_element(By.ID, "console-status").text,
         30, "the console followed live")
    assert f"ipmi 127.0.0.1:{bmc.port}" in drv.find_element(By.ID, "node-power").text
    drv.execute_script("window.notReloaded = true")
    asyncio.run(_type_on_console(served, nid, b"printf '\\033[1;32mBIOS\\033[0m POST ok\\r\\n'\n"))
    wait(drv, lambda d: "BIOS POST ok" in d.find_element(By.ID, "console-text").text,
         15, "the console's output on the page")
    assert "\x1b" not in drv.find_element(By.ID, "console-text").text
    t0 = time.time()
    assert "power is on" in take_action(drv, "power-cycle", nid, "Power-cycle",
                                        "Done: power cycle")
    assert bmc.power() == "on"
    assert [v for ts, what, v in bmc.commands() if what == "power" and ts >= t0 - 1][-1] == "1"
    # The power cycle is in the node's events as it happens, and the page did not reload.
    wait(drv, lambda d: "POWER_CYCLE" in d.find_element(By.ID, "events").text, 15,
         "POWER_CYCLE in the events")
    assert drv.find_element(By.ID, "node-state").text != "POWER_CYCLE"
    assert drv.execute_script("return window.notReloaded") is True
    shot(drv, tmp_path, "node-power")
    drv.execute_script("document.getElementById('console').scrollIntoView()")
    shot(drv, tmp_path, "node-console")


def test_reload_a_node_from_its_page(served, browser):  # noqa: ANN001
    drv = browser
    engine = make_engine(served["db"])
    nid = natural_order(load_snapshot(engine))[-2]  # outside the storm, not the BMC's node
    engine.dispose()
    drv.get(served["url"] + f"/ui/nodes/{nid}")
    if "/ui/login" in drv.current_url:  # run alone (-k): sign in first
        sign_in(drv, served, f"/ui/nodes/{nid}")
    wait(drv, lambda d: d.find_elements(By.ID, "action-reload"), what="the node page")
    drv.find_element(By.CSS_SELECTOR, '#action-reload option[value="img1"]').click()
    take_action(drv, "reload", nid, "disk image", "Done: reload img1")
    wait(drv, lambda d: d.find_element(By.ID, "node-state").text == "RELOADSETUP", 15,
         "RELOADSETUP pushed to the page")


def test_action_refused_without_a_session(served, browser):  # noqa: ANN001
    drv = browser
    nid = "pc3"
    drv.get(served["url"] + f"/ui/nodes/{nid}")
    wait(drv, lambda d: d.find_elements(By.ID, "action-reboot"), what="the node page")
    before = len(ops.node_events(make_engine(served["db"]), nid, limit=1000))
    drv.delete_all_cookies()
    drv.find_element(By.CSS_SELECTOR, "#action-reboot button").click()
    wait(drv, lambda d: d.switch_to.alert, 5, "the confirmation").accept()
    out = wait(drv, lambda d: "Refused (401)" in d.find_element(By.ID, "action-result").text
               and d.find_element(By.ID, "action-result"), what="the refusal")
    assert "Sign in again" in out.text
    time.sleep(0.5)
    assert len(ops.node_events(make_engine(served["db"]), nid, limit=1000)) == before
    # Without a cookie every page leads to the sign-in form.
    drv.get(served["url"] + f"/ui/nodes/{nid}")
    wait(drv, lambda d: "/ui/login" in d.current_url, what="the sign-in form")


def test_cross_site_post_and_unknown_node_and_sign_out(served, browser, tmp_path):  # noqa: ANN001
    """Another site's page posting to the console is refused even when signed in; an
    unknown node is a clear 404 page; after signing out the old session is refused."""
    drv = browser
    sign_in(drv, served, "/ui/nodes/pc4")
    csrf = drv.find_element(By.TAG_NAME, "body").get_attribute("data-csrf")
    evil = tmp_path / "evil.html"
    evil.write_text(f'<form method="post" action="{served["url"]}/ui/nodes/pc4/actions/reboot">'
                    f'<input name="csrf" value="{csrf}"><input name="confirmed" value="1">'
                    '<button id="go">free prizes</button></form>')
    site = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.9",
                             "--directory", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = site.stdout.readline()  # "Serving HTTP on 127.0.0.9 port N ..."
        port = int(line.split(" port ")[1].split()[0])
        drv.get(f"http://127.0.0.9:{port}/evil.html")
        drv.find_element(By.ID, "go").click()
        wait(drv, lambda d: d.find_elements(By.ID, "problem-title"), what="the refusal page")
        assert drv.find_element(By.ID, "problem-title").text == "Refused"
        assert "another site" in drv.find_element(By.ID, "problem-message").text
    finally:
        site.terminate()
        site.wait(10)
    drv.get(served["url"] + "/ui/nodes/no-such-node")
    shot(drv, tmp_path, "unknown-node")
    assert drv.find_element(By.ID, "problem-title").text == "No such node"
    assert "no-such-node" in drv.find_element(By.ID, "problem-message").text
    old = drv.get_cookie("bootherd_console")
    drv.get(served["url"] + "/ui/")
    drv.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait(drv, lambda d: "/ui/login" in d.current_url, what="the sign-in form after sign-out")
    drv.add_cookie({k: old[k] for k in ("name", "value", "path")})
    drv.get(served["url"] + "/ui/")
    assert "session has ended" in drv.find_element(By.ID, "login-message").text

"""The TMCD core as a decision table: (who asks, how, which command) -> exact reply.

In memory: no sockets (TmcdCore.handle takes the request's bytes and source
address), no database (the snapshot is built from the testbed's text).  The
testbed is tests/tmcd/awkward.py: quotes of both kinds in names, keys and
commands, a user in several groups, a shaped link, manual and static routing,
traffic generators, vnodes, a free node and a node off the trusted ranges.
Exact replies are tmcd's formats at protocol 40; the CLIENT patterns below
are what Emulab's client scripts require of each line (anchored, position by
position), and every line of every reply here must satisfy them.
"""

from __future__ import annotations

import gzip
import re
import ssl

import pytest
from awkward import ALICE_KEY, ALICE_NAME, REMOTE_IP, STARTUP, SUBNET, TESTBED, TRUSTED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootherd.inventory.memory import snapshot_from_text
from bootherd.tmcd.protocol import (
    COMMAND_TABLE,
    FULLCONFIG_SECTIONS,
    VNODE_SECTIONS,
    split_fullconfig,
)
from bootherd.tmcd.server import TmcdCore
from bootherd.tmcd.tls import TlsSession
from bootherd.tmcd.views import Views, ViewSettings

PC1, PC2, FREE, V1 = f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.4", f"{SUBNET}.11"


@pytest.fixture(scope="module")
def snap():  # noqa: ANN201
    return snapshot_from_text(TESTBED)


@pytest.fixture
def core() -> TmcdCore:
    views = Views(ViewSettings(server_address="10.0.0.1", file_server="boss.example.org",
                               domain="example.org", ipod_secret=b"k",
                               root_pubkey="ssh-rsa AAAAroot root@boss"))
    return TmcdCore(views, trusted=TRUSTED)


def ask(core: TmcdCore, snap, src: str, line: str, udp: bool = False,  # noqa: ANN001
        tls: bool = False, cn: str | None = None) -> str:
    out = core.handle(f"VERSION=40 {line} ".encode(), src, snap, udp=udp, tls=tls, cert_cn=cn)
    return out.reply.decode()


IFC = ("INTERFACE IFACETYPE=any INET=10.1.1.1 MASK=255.255.255.0 MAC=020000000101 "
       "SPEED=1000Mbps DUPLEX=full IFACE= RTABID=0 LAN=lan0\n"
       "INTERFACE IFACETYPE=any INET=10.1.2.1 MASK=255.255.255.0 MAC=020000000102 "
       "SPEED=10000Mbps DUPLEX=full IFACE= RTABID=0 LAN=lan1\n"
       # the shaped (delay) interfaces carry no address
       "INTERFACE IFACETYPE=any INET= MASK= MAC=020000000103 SPEED=1000Mbps DUPLEX=full "
       "IFACE= RTABID= LAN=\n"
       "INTERFACE IFACETYPE=any INET= MASK= MAC=020000000104 SPEED=1000Mbps DUPLEX=full "
       "IFACE= RTABID= LAN=\n")
GROUPS = "ADDGROUP NAME=proj1 GID=6001\nADDGROUP NAME=proj1-ops GID=7001\n"
ALICE = (f'ADDUSER LOGIN=alice PSWD=$6$salt$hash UID=20001 GID=6001 ROOT=1 NAME="{ALICE_NAME}" '
         'HOMEDIR=/users/alice GLIST="7001" SERIAL=7 EMAIL="alice@example.org" SHELL=bash\n')
BOB = ('ADDUSER LOGIN=bob PSWD=* UID=20002 GID=6001 ROOT=0 NAME="Bob" HOMEDIR=/users/bob '
       'GLIST="" SERIAL=1 EMAIL="bob@example.org" SHELL=tcsh\n')
# carol is in proj1-ops but not in proj1: that group becomes her GID
CAROL = ('ADDUSER LOGIN=carol PSWD=* UID=20003 GID=7001 ROOT=0 NAME="Carol" '
         'HOMEDIR=/users/carol GLIST="" SERIAL=1 EMAIL="carol@example.org" SHELL=zsh\n')
DELAY = ("DELAY INT0=020000000103 INT1=020000000104 PIPE0=130 DELAY0=12.50 BW0=10000 "
         "PLR0=0.05000000 PIPE1=131 DELAY1=0.00 BW1=100000 PLR1=0.00000000 LINKNAME=link0 "
         "RED0=1 RED1=1 LIMIT0=50 MAXTHRESH0=15 MINTHRESH0=5 WEIGHT0=0.002 LINTERM0=10 "
         "QINBYTES0=0 BYTES0=0 MEANPSIZE0=1000 WAIT0=0 SETBIT0=0 DROPTAIL0=0 GENTLE0=0 "
         "LIMIT1=100 MAXTHRESH1=0 MINTHRESH1=0 WEIGHT1=0.0001 LINTERM1=0 QINBYTES1=0 "
         "BYTES1=0 MEANPSIZE1=0 WAIT1=0 SETBIT1=0 DROPTAIL1=0 GENTLE1=1 VNODE0=n1 VNODE1=n2 "
         "NOSHAPING=0 BACKFILL0=500 BACKFILL1=0\n")
HOSTS = ("NAME=v1-lan0 IP=10.1.1.11 ALIASES='v1-0 v1'\n"
         "NAME=n3-lan1 IP=10.1.2.3 ALIASES='n3-0 n3'\n"
         "NAME=n2-lan0 IP=10.1.1.2 ALIASES='n2-0 n2'\n"
         "NAME=n1-lan1 IP=10.1.2.1 ALIASES='n1-1  '\n"
         "NAME=n1-lan0 IP=10.1.1.1 ALIASES='n1-0 n1'\n")
ROUTES = ("ROUTE DEST=10.9.0.0 DESTTYPE=net DESTMASK=255.255.0.0 NEXTHOP=10.1.1.2 COST=2 "
          "SRC=10.1.1.1\n"
          "ROUTE DEST=10.1.2.3 DESTTYPE=host DESTMASK=255.255.255.255 NEXTHOP=10.1.2.3 COST=1 "
          "SRC=10.1.2.1\n")
WATCHDOG_LOCAL = ("INTERVAL=1800 ISALIVE=180 NTPDRIFT=14400 CVSUP=0 RUSAGE=1800 "
                  "HOSTKEYS=59999940 DHCPDCONF=300 SETROOTPSWD=0\n")

# Every command the table has, as pc1 (allocated, physical, trusted, plain TCP) gets it.
PC1_REPLIES = {
    "reboot": "", "state": "", "ready": "", "reset": "", "hostkeys": "", "hostinfo": "",
    "bootlog": "", "sfshostid": "",
    "nodeid": "pc1\n",
    "status": "ALLOCATED=proj1/exp1 NICKNAME=n1\n",
    "ifconfig": IFC,
    # /users is on NFS (nfsmounts emulabdefault): a local node reads its keys there
    "accounts": GROUPS + ALICE + BOB + CAROL,
    "delay": DELAY,
    "hostnames": HOSTS,
    "rpms": "SERVER=boss.example.org USEWEB=1 RPM=rpms/agent-1.0-1.x86_64.rpm\n",
    "tarballs": "SERVER=boss.example.org USEWEB=1 DIR=/usr/local "
                "TARBALL=/proj/proj1/tarfiles/tools.tar.gz\n",
    "startupcmd": f"CMD='{STARTUP}' UID=bob\n",
    "readycount": "READY=0 TOTAL=4\n",
    "mounts": "FSTYPE=NFS\nREMOTE=fs:/proj/proj1 LOCAL=/proj/proj1\n"
              "REMOTE=fs:/users/alice LOCAL=/users/alice\n",
    "routing": "ROUTERTYPE=manual\n" + ROUTES,
    "routelist": "ROUTERTYPE=manual\n" + "".join(
        "ROUTE NODE=n1 SRC={3} DEST={0} DESTTYPE={1} DESTMASK={2} NEXTHOP={4} COST={5}\n".format(
            *re.findall(r"=(\S+)", r)[:3], re.findall(r"SRC=(\S+)", r)[0],
            *re.findall(r"NEXTHOP=(\S+) COST=(\S+)", r)[0]) for r in ROUTES.splitlines()),
    "trafgens": "TRAFGEN=cbr0 MYNAME=10.1.1.1 MYPORT=6000 PEERNAME=10.1.1.2 PEERPORT=6001 "
                "PROTO=udp ROLE=source GENERATOR=TG\n",
    "nseconfigs": "set ns [new Simulator]\n",
    "creator": "CREATOR=alice SWAPPER=bob\n",
    "tunnels": "TUNNEL=tun0 MEMBER=n2 KEY='tunnel_style' VALUE='gre'\n",
    "vnodelist": "VNODEID=pc1v1 JAILED=1\n",  # pc1v2 is not allocated
    "isalive": "UPDATE=0\n",
    "ntpinfo": "SERVER=ntp1.example.org\nPEER=ntp2.example.org\nDRIFT=-1.25\n",
    "sdparams": "reg=300 agg=5 load=1 expt=5 ctl=1000\n",
    "syncserver": "SYNCSERVER SERVER='n1.exp1.proj1.example.org' ISSERVER=1\n",
    "keyhash": "KEYHASH HASH='0123456789abcdef0123456789abcdef01234567'\n",
    "eventkey": "EVENTKEY KEY='fedcba9876543210fedcba9876543210'\n",
    "role": "virthost\n",
    "watchdoginfo": WATCHDOG_LOCAL,
    "tmcctest": "tmcctest disabled\n",
    "firewallinfo": "TYPE=none\n",
    "localization": "ROOTPUBKEY='ssh-rsa AAAAroot root@boss'\n",
    "bootwhat": "STATUS=failed\n",  # no boot policy in this core
    "serviceinfo": "TFTP=10.0.0.1 DHCP=10.0.0.1 FRISBEE=10.0.0.1 PUBSUB=10.0.0.1\n",
}
# Known, answered with nothing: bootherd has no data of that kind (tmcd answers the same
# for a node without it), or the command only reports (and has no argument here).
EMPTY = {"manifest", "bridges", "linkdelay", "deltas", "blobs", "startstatus", "startstat",
         "storageconfig", "loadinfo", "subnodelist", "jailconfig", "plabconfig", "subconfig",
         "programs", "emulabconfig", "eplabconfig", "rootpswd", "booterrno", "battery",
         "userenv", "tiptunnels", "traceinfo", "ltmap", "ltpmap", "elvindport",
         "plabeventkeys", "intfcmap", "motelog", "portregister", "tpmblob", "tpmpubkey",
         "dhcpdconf", "securestate", "quoteprep", "nodeattributes", "disks", "hwinfo",
         "tiplineinfo", "imageinfo", "imagesize", "pnetnodeattrs", "ntpdrift", "rusage",
         "arpinfo"}  # arpinfo: TLS only


@pytest.mark.parametrize("cmd", [c for c in COMMAND_TABLE
                                 if c not in ("fullconfig", "nodeuuid", "ipodinfo", "topomap")])
def test_every_command_for_an_allocated_node(core, snap, cmd: str) -> None:  # noqa: ANN001
    want = "" if cmd in EMPTY else PC1_REPLIES[cmd]
    assert ask(core, snap, PC1, cmd) == want


def test_table_is_covered() -> None:
    assert set(COMMAND_TABLE) - {"fullconfig", "nodeuuid", "ipodinfo", "topomap"} \
        == set(PC1_REPLIES) | EMPTY


def test_uuid_and_ipod_hash_are_stable(core, snap) -> None:  # noqa: ANN001
    u = ask(core, snap, PC1, "nodeuuid")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}\n", u)
    assert ask(core, snap, PC1, "nodeuuid") == u != ask(core, snap, PC2, "nodeuuid")
    h = ask(core, snap, PC1, "ipodinfo")
    assert re.fullmatch(r"HOST=10\.0\.0\.1 MASK=255\.255\.255\.255 HASH=[0-9a-f]{32}\n", h)
    assert ask(core, snap, PC1, "ipodinfo") == h != ask(core, snap, PC2, "ipodinfo")


# (who, request, transport, reply): what changes with the asker and the way it asks.
ROWS = [
    # a free node: status and the commands that need no allocation
    ("free", FREE, "status", "tcp", "FREE\n"),
    ("free", FREE, "nodeid", "tcp", "pc4\n"),
    ("free", FREE, "watchdoginfo", "tcp", WATCHDOG_LOCAL),
    ("free", FREE, "ntpinfo", "tcp", "SERVER=ntp1.example.org\nPEER=ntp2.example.org\nDRIFT=0\n"),
    ("free", FREE, "isalive", "udp", "UPDATE=0\n"),
    *[("free", FREE, c, "tcp", "") for c in (
        "accounts", "ifconfig", "mounts", "hostnames", "routing", "tarballs", "rpms",
        "startupcmd", "delay", "creator", "role", "keyhash", "fullconfig", "topomap",
        "readycount")],
    # over UDP: only what tmcd answers there; never a secret
    ("udp", PC1, "status", "udp", "ALLOCATED=proj1/exp1 NICKNAME=n1\n"),
    ("udp", PC1, "watchdoginfo", "udp", WATCHDOG_LOCAL),
    ("udp", PC1, "rusage LA1=0.1 LA5=0.2 LA15=0.3 DUSED=10", "udp", "UPDATE=0\n"),
    ("udp", PC1, "battery CAPACITY=50 VOLTAGE=12", "udp", "OK\n"),
    *[("udp", PC1, c, "udp", "") for c in (
        "accounts", "ipodinfo", "keyhash", "eventkey", "ntpinfo", "nseconfigs", "rootpswd")],
    # a vnode asking for itself through the host's proxy (PROXYFOR): plain interfaces,
    # no tunnels, vnode watchdog intervals
    ("proxy", PC1, "PROXYFOR=pc1v1 status", "tcp", "ALLOCATED=proj1/exp1 NICKNAME=v1\n"),
    ("proxy", PC1, "PROXYFOR=pc1v1 nodeid", "tcp", "pc1v1\n"),
    ("proxy", PC1, "PROXYFOR=pc1v1 ifconfig", "tcp",
     "INTERFACE IFACETYPE=any INET=10.1.1.11 MASK=255.255.255.0 MAC=020000001101 "
     "SPEED=100Mbps DUPLEX=full IFACE= RTABID= LAN=lan0\n"),
    ("proxy", PC1, "PROXYFOR=pc1v1 tunnels", "tcp", ""),
    ("proxy", PC1, "PROXYFOR=pc1v1 watchdoginfo", "tcp",
     "INTERVAL=1800 ISALIVE=300 NTPDRIFT=0 CVSUP=0 RUSAGE=1800 HOSTKEYS=0 DHCPDCONF=300 "
     "SETROOTPSWD=0\n"),
    ("proxy", PC1, "PROXYFOR=pc1v1 role", "tcp", "node\n"),
    ("proxy", PC1, "PROXYFOR=pc1v1 syncserver", "tcp",
     "SYNCSERVER SERVER='n1.exp1.proj1.example.org' ISSERVER=0\n"),
    ("proxy", PC1, "PROXYFOR=pc1v1 startupcmd", "tcp", f"CMD='{STARTUP}' UID=bob\n"),
    ("proxy", PC1, "PROXYFOR=pc1v1 hostnames", "tcp",
     HOSTS.replace("'n1-1  '", "'n1-1  '")),
    # the host asking about its vnode (VNODEID): the vnode's virtual interfaces
    ("host", PC1, "VNODEID=pc1v1 ifconfig", "tcp",
     "INTERFACE IFACETYPE=veth INET=10.1.1.11 MASK=255.255.255.0 ID=1 VMAC=020000001101 "
     "PMAC=none RTABID=0 ENCAPSULATE=1 LAN=lan0 VTAG=0\n"),
    ("host", PC1, "VNODEID=pc1v1 tunnels", "tcp", ""),
    ("host", PC1, "VNODEID=pc1v2 status", "tcp", "FREE\n"),
    # a vnode with an address of its own asks as itself
    ("own", V1, "status", "tcp", "ALLOCATED=proj1/exp1 NICKNAME=v1\n"),
    ("own", V1, "ifconfig", "tcp",
     "INTERFACE IFACETYPE=any INET=10.1.1.11 MASK=255.255.255.0 MAC=020000001101 "
     "SPEED=100Mbps DUPLEX=full IFACE= RTABID= LAN=lan0\n"),
    # ... and not as another host's vnode
    ("foreign", PC2, "PROXYFOR=pc1v1 status", "tcp", ""),
    ("foreign", PC2, "VNODEID=pc1v1 accounts", "tcp", ""),
    # per-node replies: n3's own startup command, n2's own tarball
    ("n3", f"{SUBNET}.3", "startupcmd", "tcp", "CMD='/bin/own' UID=bob\n"),
    ("n2", PC2, "tarballs", "tcp",
     "SERVER=boss.example.org USEWEB=1 DIR=/usr/local TARBALL=/proj/proj1/tarfiles/tools.tar.gz\n"
     "SERVER=boss.example.org USEWEB=1 DIR=/opt TARBALL=tarballs/n2-only.tgz\n"),
    ("n2", PC2, "rpms", "tcp", ""),
    # keys are sent when asked for (or when /users is not shared)
    ("keys", PC1, "accounts pubkeys", "tcp",
     GROUPS + ALICE + f'PUBKEY LOGIN=alice KEY="{ALICE_KEY}"\n' + BOB
     + 'PUBKEY LOGIN=bob KEY="ssh-rsa AAAAB3bob bob@ops"\n' + CAROL),
    # a node off the trusted ranges: the plain port keeps working, secrets need TLS
    ("remote", REMOTE_IP, "status", "tcp", "ALLOCATED=other/wide NICKNAME=far\n"),
    ("remote", REMOTE_IP, "routing", "tcp", "ROUTERTYPE=static\n"),  # routes come from topomap
    ("remote", REMOTE_IP, "mounts", "tcp", ""),
    ("remote", REMOTE_IP, "accounts", "tcp", ""),
    ("remote", REMOTE_IP, "ipodinfo", "tcp", ""),
    ("remote", REMOTE_IP, "watchdoginfo", "udp",
     "INTERVAL=1800 ISALIVE=60 NTPDRIFT=0 CVSUP=43200 RUSAGE=1800 HOSTKEYS=59999940 "
     "DHCPDCONF=300 SETROOTPSWD=0\n"),
    ("remote", REMOTE_IP, "status", "udp", ""),  # not a command remote nodes may send by UDP
    ("remote", REMOTE_IP, "accounts", "tls",
     "ADDGROUP NAME=other GID=6002\n"
     f'ADDUSER LOGIN=alice PSWD=* UID=20001 GID=6002 ROOT=0 NAME="{ALICE_NAME}" '
     'HOMEDIR=/users/alice GLIST="" SERIAL=7 EMAIL="alice@example.org" SHELL=bash\n'
     f'PUBKEY LOGIN=alice KEY="{ALICE_KEY}"\n'
     'ADDUSER LOGIN=carol PSWD=* UID=20003 GID=6002 ROOT=0 NAME="Carol" '
     'HOMEDIR=/users/carol GLIST="" SERIAL=1 EMAIL="carol@example.org" SHELL=zsh\n'),
    ("arp", PC1, "arpinfo", "tls", "ARPTYPE=none\n"),
    # reports are checked as tmcd checks them
    ("report", PC1, "ntpdrift -3.5", "tcp", ""),
    ("report", PC1, "rusage garbage", "udp", ""),
    ("report", PC1, "battery CAPACITY=500 VOLTAGE=12", "tcp", ""),
    ("report", PC1, "tmcctest noreply", "tcp", ""),
]


@pytest.mark.parametrize("who,src,line,how,want", ROWS,
                         ids=[f"{r[0]}-{r[2].split()[-1] if '=' in r[2].split()[-1] else r[2]}"
                              f"-{r[3]}" for r in ROWS])
def test_decision_table(core, snap, who: str, src: str, line: str, how: str,  # noqa: ANN001
                        want: str) -> None:
    assert ask(core, snap, src, line, udp=how == "udp", tls=how == "tls") == want


def test_refusals_are_counted(core, snap) -> None:  # noqa: ANN001
    ask(core, snap, REMOTE_IP, "accounts")
    ask(core, snap, REMOTE_IP, "status", udp=True)
    ask(core, snap, PC1, "accounts", udp=True)
    ask(core, snap, FREE, "mounts")
    ask(core, snap, PC2, "PROXYFOR=pc1v1 status")
    ask(core, snap, PC1, "frobnicate")
    ask(core, snap, PC1, "accounts", tls=True, cn="pc2")  # a certificate of another node
    c = core.c
    assert (c["tls_required"], c["udp_remote_refused"], c["udp_secret_refused"],
            c["not_allocated"], c["vnode_refused"], c["unknown_command"],
            c["cert_mismatch"]) == (1, 1, 1, 1, 1, 1, 1)
    assert ask(core, snap, PC1, "accounts", tls=True, cn="pc1").startswith(GROUPS)
    assert ask(core, snap, PC1, "PROXYFOR=pc1v1 accounts", tls=True, cn="pc1") \
        .startswith(GROUPS)  # a vnode's request through its host carries the host's cert


def test_ready_and_readycount(core, snap) -> None:  # noqa: ANN001
    for src in (PC1, PC2):
        assert ask(core, snap, src, "ready") == ""
    assert ask(core, snap, f"{SUBNET}.3", "readycount") == "READY=2 TOTAL=4\n"
    assert ask(core, snap, PC1, "PROXYFOR=pc1v1 readycount") == ""  # not for vnodes


def test_topomap_for_static_routing(core, snap) -> None:  # noqa: ANN001
    out = core.handle(b"VERSION=40 topomap ", PC1, snap).reply
    assert gzip.decompress(out).decode() == (
        "# nodes: vname,links\n"
        "n1,lan0:10.1.1.1 lan1:10.1.2.1\nn2,lan0:10.1.1.2\nn3,lan1:10.1.2.3\nv1,lan0:10.1.1.11\n"
        "# lans: vname,mask,cost\nlan0,255.255.255.0,1\nlan1,255.255.255.0,1\n")
    assert core.handle(b"VERSION=40 topomap ", PC1, snap).reply == out  # stable bytes


def _sections(text: str) -> list[str]:
    return re.findall(r"^\*\*\* (\S+)$", text, re.M)[::2]


def test_fullconfig_sections_and_splitting(core, snap) -> None:  # noqa: ANN001
    text = ask(core, snap, PC1, "fullconfig")
    assert _sections(text) == list(FULLCONFIG_SECTIONS)
    secs = split_fullconfig(text)
    for name in FULLCONFIG_SECTIONS:
        assert secs[name] == ask(core, snap, PC1, name), name
    assert "hostnames" not in secs and "status" not in secs  # always asked live
    vtext = ask(core, snap, PC1, "PROXYFOR=pc1v1 fullconfig")
    assert _sections(vtext) == list(VNODE_SECTIONS)
    assert "ntpinfo" not in VNODE_SECTIONS and "jailconfig" in VNODE_SECTIONS
    for name, body in split_fullconfig(vtext).items():
        assert body == ask(core, snap, PC1, f"PROXYFOR=pc1v1 {name}"), name


def test_fullconfig_without_secrets(core, snap) -> None:  # noqa: ANN001
    # Off the trusted ranges on the plain port: secret sections left out, markers and all.
    text = ask(core, snap, REMOTE_IP, "fullconfig")
    names = _sections(text)
    assert "accounts" not in names and "keyhash" not in names and "ipodinfo" not in names
    assert "ifconfig" in names
    full = ask(core, snap, REMOTE_IP, "fullconfig", tls=True)
    assert {"accounts", "keyhash", "ipodinfo"} <= set(_sections(full))
    # Over UDP (trusted): every marker, secret and TCP-only sections empty.
    udp = split_fullconfig(ask(core, snap, PC1, "fullconfig", udp=True))
    assert list(udp) == list(FULLCONFIG_SECTIONS)
    assert udp["accounts"] == udp["ipodinfo"] == udp["ntpinfo"] == udp["keyhash"] == ""
    assert udp["ifconfig"] == IFC


def test_isalive_says_update_after_a_change(core, snap) -> None:  # noqa: ANN001
    """The digest a node fetched is the lifecycle coordinator's; here the test carries
    the outcome's digest to it, as the transport does."""
    import dataclasses

    from bootherd.config import build
    from bootherd.lifecycle import Coordinator

    lc = core.configs = Coordinator(build({}), "test")

    def asked(s, line: str, udp: bool = False) -> str:  # noqa: ANN001
        out = core.handle(f"VERSION=40 {line} ".encode(), PC1, s, udp=udp)
        if out.digest is not None:
            lc.config_seen(out.node_id, out.digest, 0.0, fetched=out.event == "fullconfig")
        return out.reply.decode()

    asked(snap, "fullconfig")
    assert asked(snap, "isalive", udp=True) == "UPDATE=0\n"
    u = snap.users["bob"]
    changed = dataclasses.replace(snap, generation=snap.generation + 1,
                                  users={**snap.users, "bob": dataclasses.replace(u, serial=2)})
    assert asked(changed, "isalive", udp=True) == "UPDATE=1\n"
    asked(changed, "fullconfig")
    assert asked(changed, "isalive", udp=True) == "UPDATE=0\n"


# What Emulab's client scripts require of each line (anchored, position by position).
CLIENT = {
    "status": r"FREE|ALLOCATED=[-@\w]*/[-@\w]* NICKNAME=[-@\w]*",
    "nodeid": r"[-\w]+", "role": r"\w+",
    "ifconfig": (r"INTERFACE IFACETYPE=\w* INET=[0-9.]* MASK=[0-9.]* MAC=\w* SPEED=\w* "
                 r"DUPLEX=\w* IFACE=\w* RTABID=\d* LAN=[-\w()]*"
                 r"|INTERFACE IFACETYPE=\w* INET=[0-9.]* MASK=[0-9.]* ID=\d* VMAC=\w* PMAC=\w* "
                 r"RTABID=\d* ENCAPSULATE=\d* LAN=[-\w()]* VTAG=\d*"),
    "accounts": (r"ADDGROUP NAME=[-\w]+ GID=[0-9]+"
                 r'|ADDUSER LOGIN=[-\w]+ PSWD=[^:]+ UID=\d+ GID=.* ROOT=\d NAME="(.*)" '
                 r'HOMEDIR=.* GLIST="(.*)" SERIAL=\d+ EMAIL="[-\w@.+]+" SHELL=[-\w]*'
                 r'|PUBKEY LOGIN=[-\w]+ KEY="(.*)"'),
    "mounts": (r"FSTYPE=[-\w]+.*|REMOTE=[-:@\w./]+ LOCAL=[-@\w./]+|LOCAL=[-@\w./]+"),
    "hostnames": r"NAME=[-\w.]+ IP=[0-9.]* ALIASES='[-\w. ]*'",
    "routing": (r"ROUTERTYPE=.+|ROUTE DEST=[0-9.]* DESTTYPE=\w* DESTMASK=[0-9.]* "
                r"NEXTHOP=[0-9.]* COST=[0-9]* SRC=[0-9.]*"),
    "tarballs": r"SERVER=[-\w.]+ USEWEB=\d DIR=(.+) TARBALL=[-\w./+]+",
    "rpms": r"SERVER=[-\w.]+ USEWEB=\d RPM=[-\w./+]+",
    "startupcmd": r"CMD='(.*)' UID=(.*)",
    "delay": (r"DELAY INT0=[\d\w]+ INT1=[\d\w]+ PIPE0=\d+ DELAY0=[\d.]+ BW0=\d+ PLR0=[\d.]+ "
              r"PIPE1=\d+ DELAY1=[\d.]+ BW1=\d+ PLR1=[\d.]+ LINKNAME=[-\d\w]+ "
              r"RED0=\d RED1=\d LIMIT0=\d+ MAXTHRESH0=\d+ MINTHRESH0=\d+ WEIGHT0=[\d.]+ "
              r"LINTERM0=\d+ QINBYTES0=\d+ BYTES0=\d+ MEANPSIZE0=\d+ WAIT0=\d+ SETBIT0=\d+ "
              r"DROPTAIL0=\d+ GENTLE0=\d+ LIMIT1=\d+ MAXTHRESH1=\d+ MINTHRESH1=\d+ "
              r"WEIGHT1=[\d.]+ LINTERM1=\d+ QINBYTES1=\d+ BYTES1=\d+ MEANPSIZE1=\d+ WAIT1=\d+ "
              r"SETBIT1=\d+ DROPTAIL1=\d+ GENTLE1=\d+ VNODE0=[-\d\w]+ VNODE1=[-\d\w]+ "
              r"NOSHAPING=\d+ BACKFILL0=\d+ BACKFILL1=\d+"),
    "keyhash": r"KEYHASH HASH='\w*'",
    "syncserver": r"SYNCSERVER SERVER='[-\w.]*' ISSERVER=\d",
    "creator": r"CREATOR=[-\w]* SWAPPER=[-\w]*",
    "watchdoginfo": r"(\w+=-?\d+ )*\w+=-?\d+",
}
ASKERS = [(PC1, ""), (PC1, "PROXYFOR=pc1v1 "), (PC1, "VNODEID=pc1v1 "), (PC2, ""),
          (REMOTE_IP, "")]


@pytest.mark.parametrize("cmd", sorted(CLIENT))
def test_replies_satisfy_the_client_scripts(core, snap, cmd: str) -> None:  # noqa: ANN001
    seen = 0
    for src, pre in ASKERS:
        for extra in ("", "pubkeys") if cmd == "accounts" else ("",):
            for line in ask(core, snap, src, f"{pre}{cmd} {extra}", tls=True).splitlines():
                assert re.fullmatch(CLIENT[cmd], line), (src, pre, line)
                seen += 1
    assert seen


def test_awkward_values_reach_the_client_verbatim(core, snap) -> None:  # noqa: ANN001
    # What the client's capture groups hand the scripts: the stored value, unchanged.
    acct = ask(core, snap, PC1, "accounts pubkeys")
    adduser = re.compile(CLIENT["accounts"].split("|")[1])
    names = [m.group(1) for line in acct.splitlines() if (m := adduser.fullmatch(line))]
    keys = re.findall(r'^PUBKEY LOGIN=[-\w]+ KEY="(.*)"$', acct, re.M)
    assert ALICE_NAME in names and ALICE_KEY in keys
    cmd = re.fullmatch(CLIENT["startupcmd"], ask(core, snap, PC1, "startupcmd").strip())
    assert cmd and cmd.group(1) == STARTUP


COMMANDS_AND_ARGS = st.tuples(
    st.sampled_from(["", "VNODEID=pc1v1 ", "PROXYFOR=pc1v1 ", "VNODEID=pc1v2 ", "REDIRECT=x "]),
    st.sampled_from(list(COMMAND_TABLE) + ["geni_x", "frob"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))


@given(COMMANDS_AND_ARGS, st.sampled_from([PC1, PC2, FREE, V1, REMOTE_IP, "10.9.9.9"]),
       st.sampled_from(["tcp", "udp", "tls"]), st.sampled_from([None, "pc1", "pc9"]))
@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_core_never_raises_and_never_leaks(core, snap, req, src, how, cn) -> None:  # noqa: ANN001
    pre, cmd, args = req
    out = core.handle(f"VERSION=40 {pre}{cmd} {args}".encode(), src, snap,
                      udp=how == "udp", tls=how == "tls", cert_cn=cn)
    text = out.reply.decode("latin1")
    if how == "udp":
        assert "ADDUSER" not in text and "KEYHASH" not in text and "HASH=" not in text
    if src == REMOTE_IP and how != "tls":
        assert "ADDUSER" not in text and "KEYHASH" not in text
    if src in (FREE, "10.9.9.9"):
        assert "ADDUSER" not in text and "proj1" not in text


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_tls_session_survives_garbage(data: bytes) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: every handshake fails
    s = TlsSession(ctx)
    try:
        assert s.feed(data) == b""
    except ssl.SSLError:
        pass
    s.pending()

# ruff: noqa: E501 - TOML rows read best one per line
"""A small, hand-written testbed with everything awkward a real site has.

Quotes of both kinds in names, keys and commands; a user in several groups
of the project (and in another project); a subgroup; a shaped link with RED
and gentle RED; manual and static routing; traffic generators; tunnels;
vnodes (one allocated, one not); a free node; a node off the trusted ranges.
Exact replies in test_tmcd_core.py are written against this file.
"""

from __future__ import annotations

import json

q = json.dumps  # a TOML basic string: JSON's escapes are TOML's

SUBNET = "127.88.0"
REMOTE_IP = "127.99.0.5"  # tests trust 127.88.0.0/24 only: this node is "remote"
TRUSTED = [f"{SUBNET}.0/24"]

ALICE_NAME = "Alice \"Al\" O'Hara"
ALICE_KEY = "ssh-ed25519 AAAAC3Nza1 \"alice\" o'laptop"
STARTUP = """/proj/proj1/go.sh --say "it's up" 'and "more"'"""

TESTBED = f'''
ntp_servers = [{{ host = "ntp1.example.org" }}, {{ host = "ntp2.example.org", kind = "peer" }}]
node_types = [{{ name = "pc" }}, {{ name = "vm", class = "pcvm" }}]
os_images = [{{ name = "STD", kind = "part", partition = 1, sysid = 131 }}]

groups = [
    {{ name = "proj1", gid = 6001 }},
    {{ name = "proj1-ops", gid = 7001, project = "proj1" }},
    {{ name = "other", gid = 6002 }},
]

[[users]]
login = "alice"
uid = 20001
gid = 6001
name = {q(ALICE_NAME)}
email = "alice@example.org"
shell = "/bin/bash"
password_hash = "$6$salt$hash"
serial = 7
groups = ["proj1", "proj1-ops", "other"]
keys = [{q(ALICE_KEY)}]

[[users]]
login = "bob"
uid = 20002
gid = 6001
name = "Bob"
email = "bob@example.org"
shell = "/bin/tcsh"
groups = ["proj1"]
keys = ["ssh-rsa AAAAB3bob bob@ops"]

[[users]]
login = "carol"
uid = 20003
gid = 6002
name = "Carol"
email = "carol@example.org"
shell = "/usr/bin/zsh"
groups = ["other", "proj1-ops"]

[[nodes]]
node_id = "pc1"
type = "pc"
default_os = "STD"
ntp_drift = -1.25
interfaces = [
    {{ mac = "02:00:00:00:01:00", ip = "{SUBNET}.1", mask = "255.255.255.0", role = "ctrl", iface = "eth0" }},
    {{ mac = "02:00:00:00:01:01", ip = "10.1.1.1", mask = "255.255.255.0", iface = "eth1", lan = "lan0" }},
    {{ mac = "02:00:00:00:01:02", ip = "10.1.2.1", mask = "255.255.255.0", iface = "eth2", speed = 10000, lan = "lan1" }},
    {{ mac = "02:00:00:00:01:03", iface = "eth3" }},
    {{ mac = "02:00:00:00:01:04", iface = "eth4" }},
]
routes = [{{ dest = "10.9.9.9", destmask = "255.255.0.0", nexthop = "10.1.1.2", cost = 2, src = "10.1.1.1" }},
          {{ dest = "10.1.2.3", desttype = "host", destmask = "255.255.255.255", nexthop = "10.1.2.3", src = "10.1.2.1" }}]
tunnels = [{{ lan = "tun0", member = "n2", key = "tunnel_style", value = "gre" }}]
trafgens = [{{ name = "cbr0", myname = "10.1.1.1", myport = 6000, peername = "10.1.1.2", peerport = 6001 }}]
link_delays = [{{ linkname = "link0", int0 = "02:00:00:00:01:03", int1 = "02:00:00:00:01:04", pipe0 = 130, delay0 = 12.5, bw0 = 10000, plr0 = 0.05, pipe1 = 131, delay1 = 0.0, bw1 = 100000, plr1 = 0.0, red0 = 1, limit0 = 50, maxthresh0 = 15, minthresh0 = 5, weight0 = 0.002, linterm0 = 10, meanpsize0 = 1000, gentle1 = 1, red1 = 1, limit1 = 100, weight1 = 0.0001, vnode0 = "n1", vnode1 = "n2", backfill0 = 500 }}]

[[nodes]]
node_id = "pc2"
type = "pc"
interfaces = [
    {{ mac = "02:00:00:00:02:00", ip = "{SUBNET}.2", mask = "255.255.255.0", role = "ctrl", iface = "eth0" }},
    {{ mac = "02:00:00:00:02:01", ip = "10.1.1.2", mask = "255.255.255.0", iface = "eth1", lan = "lan0" }},
]

[[nodes]]
node_id = "pc3"
type = "pc"
interfaces = [
    {{ mac = "02:00:00:00:03:00", ip = "{SUBNET}.3", mask = "255.255.255.0", role = "ctrl", iface = "eth0" }},
    {{ mac = "02:00:00:00:03:01", ip = "10.1.2.3", mask = "255.255.255.0", iface = "eth1", lan = "lan1" }},
]

[[nodes]]
node_id = "pc4"
type = "pc"
interfaces = [{{ mac = "02:00:00:00:04:00", ip = "{SUBNET}.4", mask = "255.255.255.0", role = "ctrl", iface = "eth0" }}]

[[nodes]]
node_id = "pc5"
type = "pc"
interfaces = [
    {{ mac = "02:00:00:00:05:00", ip = "{REMOTE_IP}", mask = "255.255.255.0", role = "ctrl", iface = "eth0" }},
    {{ mac = "02:00:00:00:05:01", ip = "10.2.0.5", mask = "255.255.255.0", iface = "eth1", lan = "wan0" }},
]

[[nodes]]
node_id = "pc1v1"
type = "vm"
phys_node_id = "pc1"
jailed = true
interfaces = [
    {{ mac = "02:00:00:00:11:00", ip = "{SUBNET}.11", mask = "255.255.255.0", role = "ctrl", iface = "eth0" }},
    {{ mac = "02:00:00:00:11:01", ip = "10.1.1.11", mask = "255.255.255.0", iface = "eth1", lan = "lan0" }},
]

[[nodes]]
node_id = "pc1v2"
type = "vm"
phys_node_id = "pc1"

[[experiments]]
pid = "proj1"
eid = "exp1"
creator = "alice"
swapper = "bob"
gid = "proj1"
routertype = "manual"
startupcmd = {q(STARTUP)}
keyhash = "0123456789abcdef0123456789abcdef01234567"
eventkey = "fedcba9876543210fedcba9876543210"
syncserver = "n1"
nseconfig = "set ns [new Simulator]"
members = [{{ login = "alice", root = true }}, {{ login = "bob" }}, {{ login = "carol" }}]
nodes = [{{ node_id = "pc1", vname = "n1", erole = "virthost" }}, {{ node_id = "pc2", vname = "n2" }},
         {{ node_id = "pc3", vname = "n3", startupcmd = "/bin/own" }},
         {{ node_id = "pc1v1", vname = "v1" }}]
mounts = [{{ remote = "fs:/proj/proj1", local = "/proj/proj1" }},
          {{ remote = "fs:/users/alice", local = "/users/alice" }}]
tarballs = [{{ dir = "/usr/local", path = "/proj/proj1/tarfiles/tools.tar.gz" }},
            {{ vname = "n2", dir = "/opt", path = "tarballs/n2-only.tgz" }}]
rpms = [{{ vname = "n1", path = "rpms/agent-1.0-1.x86_64.rpm" }}]

[[experiments]]
pid = "other"
eid = "wide"
creator = "carol"
swapper = "carol"
gid = "other"
routertype = "static"
nfsmounts = "none"
members = [{{ login = "carol" }}, {{ login = "alice" }}]
nodes = [{{ node_id = "pc5", vname = "far" }}]
mounts = [{{ remote = "fs:/proj/other", local = "/proj/other" }}]
'''

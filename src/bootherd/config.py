"""bootherd configuration: one TOML file, every key with a documented default.

The schema below is the single description of the configuration: loading,
validation, `--set` overrides and `bootherd config example` all read it, so a
key cannot exist in one place and be missing in another.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message always names the offending key."""


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    doc: str
    kind: str = ""  # "", "address", "port", "path", "url", "fraction", "list", "networks",
    #                 "services"
    bounds: tuple[float, float] | None = None  # smallest and largest number accepted
    secret: bool = False  # never printed: `config check` and logs show it masked

    @property
    def type(self) -> type:
        return type(self.default)


# section -> (section doc, keys).  Defaults bind everything to loopback on high
# ports so that the embedded demo never touches the host's real network.
SCHEMA: dict[str, tuple[str, list[Key]]] = {
    "database": ("Node inventory: the single source of truth.", [
        Key("url", "sqlite:///var/bootherd.db",
            "SQLAlchemy URL. SQLite (embedded, WAL) by default; "
            "postgresql+psycopg://user:pw@host/db for several servers.", "url"),
        Key("poll_interval", 0.2,
            "Seconds between checks for changes made by other processes "
            "(SQLite); PostgreSQL is notified at once and polls as a fallback."),
        Key("write_batch_interval", 0.0,
            "Seconds the background writer gathers state events before one committing "
            "transaction; 0: group commit (what queued while the last commit ran is the "
            "next batch), so a `state` a node waits for is not held back."),
    ]),
    "server": ("Identity of this boot server.", [
        Key("name", "",
            "Server name shown by `bootherd status`; empty: the name kept in name_file "
            "(the host name, made unique among live servers, at first start)."),
        Key("name_file", "var/server-name",
            "Where the default server name is kept, so it survives restarts.", "path"),
        Key("forget_after", 86400.0,
            "Seconds after its last heartbeat a dead server's row is pruned from "
            "`bootherd status` (0 keeps them)."),
        Key("user", "",
            "Drop privileges to this user (and its groups) once every port is bound; "
            "files bootherd created before are handed to it. Empty: keep the user "
            "bootherd started as."),
        Key("public_address", "",
            "Address nodes use to reach this server (next-server, URLs, bootinfo). Empty: "
            "each reply advertises the address its request arrived on, as dnsmasq does; "
            "set it only when nodes reach this server at another address (NAT, a VIP). On "
            "an IPv6-only network, its IPv6 address (and dhcp.enabled = false). bootherd "
            "serve refuses an address no service listens on.", "address"),
        Key("public_address6", "",
            "IPv6 address nodes reach this server at, for DHCPv6 boot file URLs on a "
            "dual-stack network; empty: public_address if it is IPv6, else dhcp6.address."),
    ]),
    "log": ("Logging.", [
        Key("level", "info", "debug, info, warning or error."),
        Key("format", "text",
            "text (logfmt: ts=... level=... logger=... msg=... and the event's key=value "
            "fields) or json (one object per line, the same fields as keys)."),
        Key("file", "",
            "Log to this file instead of standard error; SIGHUP reopens it (after "
            "logrotate moved it).", "path"),
        Key("requests", [],
            "Services whose every request is logged at info, one line each (as dnsmasq's "
            "log-dhcp): any of dhcp, dhcp6, tftp, bootinfo, tmcd, http. Empty: requests are only "
            "counted in /metrics.", "services"),
        Key("bad_input_interval", 60.0,
            "Seconds between two log lines about bad input (malformed packets, broken "
            "uploads, refused connections) from one source; every occurrence is counted "
            "in /metrics.", bounds=(0, 86400)),
    ]),
    "dhcp": ("DHCP and PXE.", [
        Key("enabled", True, "Run the DHCP server."),
        Key("address", "127.0.0.1", "Listening address.", "address"),
        Key("port", 6767, "Listening port (67 in production).", "port"),
        Key("mode", "authoritative",
            "authoritative (addresses and boot file in one offer) or proxy "
            "(boot information only, beside the site's own DHCP)."),
        Key("proxy_port", 4011, "proxyDHCP boot-server port (4011 in production).", "port"),
        Key("client_port", 68, "Port replies go to when sent to a client directly.", "port"),
        Key("relay_port", 67, "Port replies to relay agents (giaddr) go to.", "port"),
        Key("interface", "",
            "Bind the DHCP sockets to this interface (SO_BINDTODEVICE); broadcast replies "
            "leave through it, and with a unicast address a second socket on "
            "255.255.255.255:port receives broadcast DISCOVERs."),
        Key("lease_time", 86400, "Lease time in seconds for inventory addresses."),
        Key("unknown_clients", "ignore",
            "ignore, or pool: lease from dynamic_pool and boot the new-node image."),
        Key("dynamic_pool", "", "Range for unknown clients, e.g. 10.1.255.10-10.1.255.250."),
        Key("dynamic_lease_time", 600, "Lease time in seconds for the dynamic pool."),
        Key("newnode_type", "",
            "Node type whose loaders unknown (pool) clients get; empty uses "
            "undionly.kpxe / snponly.efi / ipxe.efi."),
        Key("routers", [], "Default routers handed out (option 3).", "list"),
        Key("dns_servers", [], "DNS servers handed out (option 6).", "list"),
        Key("domain", "", "Domain name handed out (option 15)."),
        Key("native_send", True,
            "Send replies from the native sending thread (bootherd._udpsend) where it is "
            "built; false sends from the event loop."),
        Key("rcvbuf", 32 * 2**20,
            "Receive buffer of each DHCP socket, in bytes: room for a power-on burst "
            "(10,000 DISCOVERs take 12 MiB on loopback, 1,280 bytes each). Root gets it whole "
            "(SO_RCVBUFFORCE); others get at most net.core.rmem_max, with a warning.",
            bounds=(4096, 2**31 - 1)),
        Key("discover_deadline", 3.0,
            "Seconds a DISCOVER may wait in the backlog under overload; older ones are "
            "dropped, not answered after the firmware's next retry (4 s). 0: never.",
            bounds=(0, 3600)),
    ]),
    "dhcp6": ("DHCPv6 (RFC 8415) with PXE and HTTP boot over IPv6 (RFC 5970); docs/ipv6.md.", [
        Key("enabled", False, "Run the DHCPv6 server."),
        Key("address", "::1", "Listening address (a unicast address, or :: for all).", "address"),
        Key("port", 5547, "Listening port (547 in production).", "port"),
        Key("interface", "",
            "Interface whose All_DHCP_Relay_Agents_and_Servers group (ff02::1:2) the server "
            "joins: clients on the link send there. Empty: relayed and unicast messages only."),
        Key("lease_time", 86400, "Valid lifetime in seconds of inventory addresses (ip6)."),
        Key("unknown_clients", "ignore",
            "ignore, or pool: addresses from dhcp6.pool, and the new-node boot path."),
        Key("pool", "", "Range for unknown clients, e.g. fd00::1000-fd00::1fff."),
        Key("dynamic_lease_time", 600, "Valid lifetime in seconds of pool addresses."),
        Key("dns_servers", [], "DNS servers handed out (option 23).", "list"),
        Key("preference", 255, "Preference option (7) in ADVERTISE; 255: clients take it at once."),
        Key("rapid_commit", True,
            "Answer a SOLICIT carrying rapid commit (14) with a REPLY at once (RFC 8415 18.3.1)."),
        Key("rcvbuf", 32 * 2**20,
            "Receive buffer of each DHCPv6 socket, in bytes, for a power-on burst (as "
            "dhcp.rcvbuf). Root gets it whole (SO_RCVBUFFORCE); others get at most "
            "net.core.rmem_max, with a warning.", bounds=(4096, 2**31 - 1)),
    ]),
    "tftp": ("TFTP.", [
        Key("enabled", True, "Run the TFTP server."),
        Key("address", "127.0.0.1", "Listening address.", "address"),
        Key("port", 1069, "Listening port (69 in production).", "port"),
        Key("root", "var/tftpboot", "Folder served; nothing outside it is ever served.", "path"),
        Key("upload_dir", "", "Folder for write requests; empty refuses all writes.", "path"),
        Key("max_blksize", 1468, "Largest block size granted (path MTU minus headers).",
            bounds=(8, 65464)),
        Key("max_windowsize", 64,
            "Largest windowsize granted (RFC 7440); reads with windows over 64 blocks stay "
            "off the native data path.", bounds=(1, 65535)),
        Key("timeout", 1.0,
            "Retransmission timeout in seconds when the client asks for none.",
            bounds=(0.01, 255)),
        Key("retries", 5, "Retransmissions before a transfer is abandoned."),
        Key("max_transfers", 12288,
            "Concurrent transfers at most (one socket each: the server raises its open-file "
            "limit to this + 512, within the hard limit). 10,000 loaders at once need about "
            "that many: with 4,096, transfers of nodes that had given up held the slots and "
            "the rest were told \"server busy\".", bounds=(1, 2**24)),
        Key("max_per_client", 8, "Concurrent transfers per client address at most.",
            bounds=(1, 2**24)),
        Key("queue_wait", 4.0,
            "Seconds a request over a cap waits for a slot before ERROR 0 \"server busy, "
            "retry\" (its client's retransmissions meanwhile are recognised and ignored; "
            "firmware gives up after about 11 s, and many treat the ERROR as a failed boot)."),
        Key("cache_bytes", 256 * 2**20, "Memory cache for hot files, in bytes."),
        Key("max_upload", 64 * 2**20, "Largest upload accepted, in bytes (ERROR 3 above)."),
        Key("native_send", True,
            "Send DATA from the native sending thread (bootherd._udpsend) where it is built; "
            "false sends from the event loop."),
        Key("udp_gso", True,
            "Send a window of DATA as one UDP GSO buffer (native sender and data path); "
            "false sends it datagram by datagram."),
        Key("native_data_path", True,
            "Serve reads from their OACK (or first window) on from the native data path "
            "(bootherd._tftpdata) where it is built; false keeps every transfer in Python."),
        Key("system_loaders", True,
            "Answer undionly.kpxe, snponly.efi, ipxe.efi, shimx64.efi, mmx64.efi and "
            "grubx64.efi (and their arm64 names) from the files Debian's ipxe, shim-signed "
            "and grub-efi-*-signed packages install when the root has no file of that "
            "name, over TFTP and HTTP /boot/ (docs/firmware.md)."),
        Key("rcvbuf", 32 * 2**20,
            "Receive buffer of the listening socket, in bytes, for a power-on burst of "
            "requests. Root gets it whole (SO_RCVBUFFORCE); others get at most "
            "net.core.rmem_max, with a warning.", bounds=(4096, 2**31 - 1)),
    ]),
    "bootinfo": ("bootinfo: what should I boot? (Emulab UDP protocol)", [
        Key("enabled", True, "Run the bootinfo server."),
        Key("address", "127.0.0.1", "Listening address.", "address"),
        Key("port", 6969, "Listening port.", "port"),
        Key("client_port", 9696, "Port loaders listen on for replies.", "port"),
        Key("order_port", 6970, "Source port of unsolicited orders.", "port"),
        Key("rcvbuf", 8 * 2**20,
            "Receive buffer of the listening socket, in bytes: a storm's loaders ask within "
            "seconds of each other. Root gets it whole (SO_RCVBUFFORCE); others get at most "
            "net.core.rmem_max, with a warning.", bounds=(4096, 2**31 - 1)),
        Key("loader", "pxeboot.emu", "The loader that asks bootinfo; other loaders get REBOOT."),
        Key("newnode_mfs", "", "MFS booted by unknown nodes (ip:/path), for enrollment."),
    ]),
    "tmcd": ("TMCD: node configuration (Emulab wire protocol).", [
        Key("enabled", True, "Run the TMCD server."),
        Key("address", "127.0.0.1", "Listening address.", "address"),
        Key("port", 7777, "Listening port (TCP and UDP).", "port"),
        Key("fallback_port", 14447, "Second port, same service (0 disables).", "port"),
        Key("max_connections", 2048, "Concurrent TCP connections at most."),
        Key("read_timeout", 5.0, "Seconds a client has to send its request line."),
        Key("max_request", 4096, "Longest request line in bytes."),
        Key("native_front", True,
            "Accept, read, answer and close TCP connections on a native thread "
            "(bootherd._tmcdfront) where it is built; false: the Python transport."),
        Key("trusted_ranges",
            ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128",
             "fc00::/7"],
            "Control-network address ranges (CIDR). Nodes asking from elsewhere are "
            "remote, as tmcd's wide-area nodes: secret sections (accounts, keyhash, "
            "eventkey, ipodinfo) only over TLS, UDP only for isalive, rusage, "
            "watchdoginfo and battery, PSWD=*, no NFS mounts.", "networks"),
        Key("tls_cert", "",
            "PEM server certificate for TMCD over TLS (a client sends ISPEAKSSL_TMCDV10, "
            "then the handshake); empty: TLS is refused.", "path"),
        Key("tls_key", "", "PEM private key of tls_cert.", "path"),
        Key("tls_client_ca", "",
            "PEM CA bundle that signs the nodes' client certificates.", "path"),
        Key("tls_client_certs", "optional",
            "none (not asked for), optional or required. A presented certificate must "
            "be valid for tls_client_ca and its common name must be the asking node's id "
            "(its physical host's for a vnode)."),
        Key("file_server", "",
            "SERVER= of rpms and tarballs: the host nodes fetch USEWEB files from "
            "(https://SERVER/spewrpmtar.php3); empty: server.public_address, else the "
            "address the node's request arrived on."),
        Key("domain", "", "Domain of experiment host names (syncserver)."),
        Key("root_pubkey", "", "SSH key handed out as ROOTPUBKEY (localization); empty: none."),
        Key("watchdog_interval", 1800, "watchdoginfo INTERVAL: seconds between watchdog "
            "checks for new intervals (0 = never)."),
        Key("watchdog_isalive_local", 180, "ISALIVE for nodes on the trusted ranges."),
        Key("watchdog_isalive_vnode", 300, "ISALIVE for vnodes on the trusted ranges."),
        Key("watchdog_isalive_remote", 60, "ISALIVE for nodes off the trusted ranges."),
        Key("watchdog_ntpdrift", 14400, "NTPDRIFT: seconds between drift reports."),
        Key("watchdog_cvsup", 43200, "CVSUP: software update checks (remote nodes)."),
        Key("watchdog_rusage", 1800, "RUSAGE: seconds between resource usage reports."),
        Key("watchdog_hostkeys", 59999940, "HOSTKEYS: host key reports (59999940 = once)."),
        Key("watchdog_dhcpdconf", 300, "DHCPDCONF: seconds between dhcpd updates."),
        Key("watchdog_setrootpswd", 0, "SETROOTPSWD: root password changes (0 = never)."),
        Key("ipod_secret_file", "var/ipod-secret",
            "Secret the nodes' IPOD hashes are derived from (generated at first start, "
            "mode 0600). Kept across restarts so a node's configuration digest does not "
            "change with them; servers sharing a database should share this file.", "path"),
    ]),
    "http": ("HTTP: iPXE scripts, files, node logs, admin API, metrics.", [
        Key("enabled", True, "Run the HTTP server."),
        Key("address", "127.0.0.1", "Listening address.", "address"),
        Key("port", 8080, "Listening port.", "port"),
        Key("root", "var/www", "Folder of files served under /files/.", "path"),
        Key("log_dir", "var/nodelogs", "Where node boot logs are stored.", "path"),
        Key("max_log_bytes", 4 * 2**20, "Largest node log upload."),
        Key("logs_per_node", 10, "Boot logs kept per node."),
        Key("max_large_transfers", 256, "Concurrent large downloads before 503 + Retry-After."),
        Key("large_file_bytes", 4 * 2**20, "Files at least this big count as large."),
        Key("retry_after", 2, "Retry-After seconds sent with 503."),
        Key("max_queued_transfers", 4096, "Large downloads that may wait in line for a slot."),
        Key("queue_timeout", 30.0,
            "Seconds a large download waits in line before 503 + Retry-After (long "
            "enough for a storm the server keeps up with: a line that moves is no "
            "reason to turn a client away)."),
        Key("stall_timeout", 60.0,
            "Seconds a download may make no progress before its connection is dropped "
            "(the client resumes)."),
        Key("tls_port", 0,
            "Also serve HTTPS on this port (443 for Emulab's install-tarfile and "
            "install-rpm, which fetch https://SERVER/spewrpmtar.php3); 0: no HTTPS.", "port"),
        Key("tls_cert", "", "PEM certificate for HTTPS (required with tls_port).", "path"),
        Key("tls_key", "", "PEM private key of tls_cert.", "path"),
        Key("header_timeout", 15.0,
            "Seconds a client has to send a complete request head; also how long an idle "
            "connection is kept between requests.", bounds=(0.1, 3600)),
        Key("body_timeout", 30.0,
            "Seconds a client has to send a whole request body (a node log upload, an admin "
            "API request); a slower one is cut off.", bounds=(0.1, 3600)),
        Key("max_connections", 4096,
            "Open HTTP connections at most; further ones are closed at once.",
            bounds=(1, 2**20)),
        Key("max_uploads", 64, "Node log uploads in progress at most (503 + Retry-After above).",
            bounds=(1, 2**20)),
        Key("max_uploads_per_node", 2, "Log uploads in progress at most per node.",
            bounds=(1, 2**20)),
        Key("max_api_body", 4 * 2**20, "Largest admin API request body in bytes (413 above).",
            bounds=(1024, 2**30)),
        Key("admin_token", "", "Token for the admin API; empty generates one at start.",
            secret=True),
        Key("admin_token_file", "var/admin-token", "Where a generated token is written.", "path"),
    ]),
    "power": ("Out-of-band power: IPMI, Redfish, Wake-on-LAN (docs/power.md).", [
        Key("timeout", 20.0,
            "Seconds one BMC operation may take before its node is reported as timed out."),
        Key("max_concurrent", 64, "BMC operations in flight at once, over all callers."),
        Key("power_on_rate", 20.0,
            "Power-ons (on, cycle) started per second at most, evenly spaced, so a "
            "rack's breakers see a ramp; 0 means no cap."),
        Key("ipmitool", "ipmitool", "The ipmitool program for the ipmitool driver."),
        Key("ipmi_cipher_suite", 3,
            "RMCP+ cipher suite ipmitool asks for (3: SHA-1; 17: SHA-256 for BMCs "
            "that refuse SHA-1)."),
        Key("redfish_verify_tls", True,
            "Check Redfish BMCs' TLS certificates (false for self-signed ones)."),
        Key("wol_address", "255.255.255.255",
            "Where Wake-on-LAN packets go when a node's power address is empty "
            "(its LAN's broadcast address).", "address"),
    ]),
    "console": ("Serial console capture (IPMI serial-over-LAN or a console server's TCP port).", [
        Key("enabled", False,
            "Capture every node console the inventory names; enable it on one server "
            "only, since a BMC serves one serial-over-LAN session."),
        Key("log_bytes", 4 * 2**20, "A console log is rotated when it reaches this size."),
        Key("logs_kept", 5, "Rotated console logs kept per node, besides the current one."),
        Key("reconnect_max", 30.0,
            "Longest wait in seconds between attempts to reach a console that is down."),
        Key("rescan_interval", 30.0,
            "Seconds between looks at the inventory for consoles added or removed."),
    ]),
    "imaging": ("Disk images and their multicast distribution (docs/imaging.md).", [
        Key("enabled", True, "Run the multicast imaging server."),
        Key("root", "var/images", "Folder of disk images (NAME.bhimg).", "path"),
        Key("address", "127.0.0.1", "Listening address of the control port (JOIN, REQUEST).",
            "address"),
        Key("port", 7979, "Control port (UDP).", "port"),
        Key("multicast_group", "239.195.66.1",
            "The deployment's multicast group; every session sends to it.", "address"),
        Key("multicast_ports", "42000-42063",
            "Port range for sessions, one port per concurrent session (FIRST-LAST)."),
        Key("interface_address", "",
            "Address of the interface multicast leaves from; empty uses imaging.address."),
        Key("ttl", 1, "Multicast TTL (1: the control LAN only)."),
        Key("loopback", True, "Deliver multicast to receivers on this host too."),
        Key("rate_mbps", 500.0,
            "Megabits per second for all sessions together, so DHCP, TFTP and TMCD keep "
            "their share of the control network (0: unpaced)."),
        Key("burst_bytes", 262144, "Token bucket depth: bytes sent at once after a pause."),
        Key("adapt_rate", True,
            "Slow a session below imaging.rate_mbps while a receiver reports its socket "
            "buffer filling or datagrams lost in runs, and speed it up again once they keep "
            "up (docs/imaging.md, Pacing)."),
        Key("min_receivers", 1,
            "A new session waits for this many receivers (at most imaging.gather_timeout "
            "seconds) before it sends, like udp-sender --min-receivers (1: start at once)."),
        Key("fec_proactive", 0.03,
            "Repair symbols sent with every whole chunk, as a fraction of its blocks.", "fraction"),
        Key("idle_timeout", 10.0, "Seconds without a request before a session ends."),
        Key("receiver_timeout", 15.0, "Seconds a silent receiver is still counted in its session."),
        Key("max_sessions", 16, "Concurrent sessions (images being sent) at most."),
        Key("chunk_size", 1 << 20, "Chunk size of new images, in bytes (a multiple of 512)."),
        Key("compression_level", 3, "zstd level of new images (1-19)."),
        Key("mfs_kernel", "",
            "The imaging MFS kernel a reloading node boots (a path under http.root, like an "
            "OS image's; empty: `node reload` is refused)."),
        Key("mfs_initrd", "", "The imaging MFS initramfs (runs bhimg-recv; docs/imaging.md)."),
        Key("mfs_cmdline", "console=ttyS0",
            "Kernel command line of the imaging MFS, before the bootherd.* arguments."),
        Key("reload_disk", "/dev/sda", "The disk the imaging MFS writes (bootherd.disk=)."),
        Key("gather_timeout", 60.0,
            "Seconds an image's session waits, after a reload order, for the receivers of "
            "every node reloaded with it before it starts sending (0: no waiting)."),
        Key("reload_on_free", False,
            "Reload a node when it is freed from its experiment (`experiment free`, an "
            "import that drops its allocation): it enters the reload cycle as with "
            "`node reload` (needs imaging.mfs_kernel)."),
        Key("free_image", "",
            "The disk image a freed node writes; empty: the disk image of the node's "
            "default OS (os_images.disk_image)."),
    ]),
    "ui": ("The operator's web console under /ui/ of the HTTP service (docs/ui.md).", [
        Key("enabled", True, "Serve the console (it needs the HTTP service)."),
        Key("read_only", False,
            "Show the console without its actions: wake, reboot, next_os and the others "
            "are neither offered nor accepted (403)."),
        Key("session_lifetime", 28800.0,
            "Seconds a sign-in lasts; then the console asks for the admin token again.",
            bounds=(60, 30 * 86400)),
        Key("update_interval", 0.3,
            "Seconds between the updates pushed to open consoles (one shared update "
            "for all of them).", bounds=(0.05, 10)),
    ]),
    "recovery": ("The recovery ladder for stuck nodes and operator reboots, and "
                 "power-state sync (docs/power.md).", [
        Key("policy", "ladder",
            "ladder: soft step (bootinfo REBOOT order, or IPOD when the OS is up), then "
            "BMC power cycles, then failed and out of service; resend: only re-send orders, "
            "then mark failed (no power actions)."),
        Key("ipod", True,
            "Try Emulab's IPOD (ICMP type 6 code 6 with the node's TMCD ipodinfo hash) "
            "before a power cycle when a node's OS is up and it answers a ping."),
        Key("reboot_timeout", 300.0,
            "Seconds in REBOOTING (after a REBOOT order, an IPOD or a power cycle) before "
            "the next step; longer than a node's POST and power.timeout.", bounds=(1, 86400)),
        Key("power_cycles", 3,
            "Power cycles that did not bring a node to ISUP before it is marked failed and "
            "taken out of service.", bounds=(0, 100)),
        Key("bmc_retries", 5,
            "BMC answers of unreachable or timeout in a row before the node is marked "
            "failed (auth, config and unsupported are final at once).", bounds=(0, 1000)),
        Key("bmc_retry_interval", 60.0,
            "Seconds before a power cycle whose BMC did not answer is tried again.",
            bounds=(0.1, 86400)),
        Key("operator_hold", 600.0,
            "Seconds an operator's own power-off or soft off (CLI, API, web console) keeps "
            "the recovery ladder away from that node, so bootherd never fights it (an "
            "operator's on, cycle or reset starts a boot the watcher follows as any)."),
        Key("power_sync_rate", 2.0,
            "BMC status queries per second at most to learn nodes' actual power state; "
            "0 turns power-state sync off."),
        Key("power_sync_interval", 300.0,
            "Seconds between two status queries of the same node at least.",
            bounds=(1, 864000)),
    ]),
    "states": ("Node state machine and its watcher.", [
        Key("check_interval", 1.0, "Seconds between watcher passes."),
        Key("pxewakeup_timeout", 20.0, "Seconds in PXEWAKEUP before the order is re-sent."),
        Key("pxewakeup_retries", 2, "Re-sent orders before the node is marked failed."),
        Key("booting_timeout", 600.0, "Seconds in BOOTING or TBSETUP before a node is marked failed."),
        Key("reload_timeout", 1800.0,
            "Seconds in RELOADSETUP or RELOADING before a reload is marked RELOADFAILED."),
        Key("event_window", 10.0,
            "Seconds within which a repeated observation of a node (a DHCP ACK, a loader "
            "fetch over TFTP, the same boot answer) records no new state event."),
    ]),
}

VALID_SECTIONS = set(SCHEMA)
# A disk image's name (imaging.free_image, os_images.disk_image, `image create -o`).
DISK_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# Services whose requests log.requests can turn on.
REQUEST_LOG_SERVICES = ("dhcp", "dhcp6", "tftp", "bootinfo", "tmcd", "http")


def did_you_mean(name: str, known: list[str] | tuple[str, ...] | set[str]) -> str:
    """' (did you mean X?)' for the closest known name, or ''."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Section:
    """Attribute access to one section's values (read-only)."""

    def __init__(self, name: str, values: dict[str, Any]):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"{self._name}.{key}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("configuration is read-only")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


@dataclass
class Config:
    sections: dict[str, Section] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)
    source: Path | None = None  # the file read (None: built-in defaults)
    overrides: list[str] = field(default_factory=list)  # --set items (SIGHUP re-applies them)

    def __getattr__(self, name: str) -> Section:
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: sec.as_dict() for name, sec in self.sections.items()}

    def path(self, value: str) -> Path:
        """A configured path, relative ones taken from the config's base folder."""
        p = Path(value)
        return p if p.is_absolute() else self.base_dir / p

    @property
    def database_url(self) -> str:
        url = self.database.url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = url[len("sqlite:///"):]
            if rel and rel != ":memory:":
                return "sqlite:///" + str(self.path(rel))
        return url


def _coerce(section: str, key: Key, value: Any) -> Any:
    where = f"{section}.{key.name}"
    want = key.type
    if want is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if want is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value!r}")
        return _check_bounds(where, key, float(value))
    if want is int:
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise ConfigError(f"{where}: expected a whole number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        if key.kind == "port" and not 0 <= value <= 65535:
            raise ConfigError(f"{where}: port must be 0-65535, got {value}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value}")
        return _check_bounds(where, key, value)
    if want is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        for v in value:
            if key.kind == "services":
                if v not in REQUEST_LOG_SERVICES:
                    hint = did_you_mean(v, REQUEST_LOG_SERVICES)
                    raise ConfigError(f"{where}: unknown service {v!r}{hint} "
                                      f"(known: {', '.join(REQUEST_LOG_SERVICES)})")
            elif key.kind == "networks":
                try:
                    ipaddress.ip_network(v, strict=False)
                except ValueError:
                    raise ConfigError(f"{where}: not an address range: {v!r}") from None
            else:
                _check_address(where, v)
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if key.kind == "address" and not (value == "" and key.default == ""):
        _check_address(where, value)
    return value


def _check_bounds(where: str, key: Key, value: float) -> float:
    if key.bounds is not None and not key.bounds[0] <= value <= key.bounds[1]:
        lo, hi = key.bounds
        raise ConfigError(f"{where}: must be {lo:g} to {hi:g}, got {value:g}")
    return value


def _check_address(where: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{where}: not an IP address: {value!r}") from None


def _check_choices(values: dict[str, dict[str, Any]]) -> None:
    choices = {
        ("dhcp", "mode"): ("authoritative", "proxy"),
        ("dhcp", "unknown_clients"): ("ignore", "pool"),
        ("dhcp6", "unknown_clients"): ("ignore", "pool"),
        ("log", "level"): ("debug", "info", "warning", "error"),
        ("log", "format"): ("text", "json"),
        ("tmcd", "tls_client_certs"): ("none", "optional", "required"),
        ("power", "ipmi_cipher_suite"): tuple(range(18)),
        ("recovery", "policy"): ("ladder", "resend"),
    }
    for (sec, key), allowed in choices.items():
        if values[sec][key] not in allowed:
            raise ConfigError(
                f"{sec}.{key}: must be one of {', '.join(map(str, allowed))}, "
                f"got {values[sec][key]!r}")
    pool = values["dhcp"]["dynamic_pool"]
    if pool:
        parts = pool.split("-")
        if len(parts) != 2:
            raise ConfigError(f"dhcp.dynamic_pool: expected FIRST-LAST, got {pool!r}")
        first, last = (p.strip() for p in parts)
        for p in (first, last):
            _check_address("dhcp.dynamic_pool", p)
        if ipaddress.ip_address(first).version != ipaddress.ip_address(last).version:
            raise ConfigError(f"dhcp.dynamic_pool: {first} and {last} are not of one IP version")
        if ipaddress.ip_address(first) > ipaddress.ip_address(last):
            raise ConfigError(f"dhcp.dynamic_pool: reversed range {pool!r}: the first address "
                              f"must not be above the last ({last}-{first}?)")
    if values["server"]["public_address6"]:
        _check_address("server.public_address6", values["server"]["public_address6"])
    pool6 = values["dhcp6"]["pool"]
    if pool6:
        parts = pool6.split("-")
        if len(parts) != 2:
            raise ConfigError(f"dhcp6.pool: expected FIRST-LAST, got {pool6!r}")
        for p in parts:
            try:
                ipaddress.IPv6Address(p.strip())
            except ValueError:
                raise ConfigError(f"dhcp6.pool: not an IPv6 address: {p.strip()!r}") from None
    if values["dhcp6"]["unknown_clients"] == "pool" and not pool6:
        raise ConfigError("dhcp6.pool: required when dhcp6.unknown_clients = \"pool\"")
    if values["dhcp6"]["preference"] > 255:
        raise ConfigError(f"dhcp6.preference: must be 0-255, got {values['dhcp6']['preference']}")
    if values["dhcp"]["unknown_clients"] == "pool" and not pool:
        raise ConfigError("dhcp.dynamic_pool: required when dhcp.unknown_clients = \"pool\"")
    h = values["http"]
    if h["tls_port"] and not (h["tls_cert"] and h["tls_key"]):
        raise ConfigError("http.tls_cert: required (with http.tls_key) when http.tls_port is set")
    t = values["tmcd"]
    if bool(t["tls_cert"]) != bool(t["tls_key"]):
        missing = "tls_key" if t["tls_cert"] else "tls_cert"
        raise ConfigError(f"tmcd.{missing}: required with tmcd.tls_cert / tmcd.tls_key")
    if t["tls_client_certs"] == "required" and not t["tls_client_ca"]:
        raise ConfigError("tmcd.tls_client_ca: required when tmcd.tls_client_certs = "
                          "\"required\"")
    img = values["imaging"]
    try:
        is_mc = ipaddress.IPv4Address(img["multicast_group"]).is_multicast
    except ValueError:
        is_mc = False
    if not is_mc:
        raise ConfigError(f"imaging.multicast_group: not an IPv4 multicast address "
                          f"(224.0.0.0/4), got {img['multicast_group']!r}")
    multicast_ports(img["multicast_ports"])
    if img["interface_address"]:
        _check_address("imaging.interface_address", img["interface_address"])
    if not 1 <= img["ttl"] <= 255:
        raise ConfigError(f"imaging.ttl: must be 1-255, got {img['ttl']}")
    if not img["reload_disk"].startswith("/") or any(c.isspace() for c in img["reload_disk"]):
        raise ConfigError(f"imaging.reload_disk: an absolute device path without spaces, "
                          f"got {img['reload_disk']!r}")
    for key in ("mfs_kernel", "mfs_initrd"):
        if any(c.isspace() for c in img[key]):
            raise ConfigError(f"imaging.{key}: a path without spaces, got {img[key]!r}")
    if img["reload_on_free"] and not img["mfs_kernel"]:
        raise ConfigError("imaging.reload_on_free: needs imaging.mfs_kernel (the imaging "
                          "MFS a freed node boots to write its disk)")
    if img["free_image"] and not DISK_IMAGE_NAME.fullmatch(img["free_image"]):
        raise ConfigError(f"imaging.free_image: a disk image name is 1-128 letters, digits, "
                          f"'.', '_' or '-', got {img['free_image']!r}")
    if img["gather_timeout"] < 0:
        raise ConfigError(f"imaging.gather_timeout: must be >= 0, got {img['gather_timeout']}")
    if not 0 <= img["fec_proactive"] <= 1:
        raise ConfigError(f"imaging.fec_proactive: must be 0-1, got {img['fec_proactive']}")
    cs = img["chunk_size"]
    if not 4096 <= cs <= 16 << 20 or cs % 512:
        raise ConfigError(f"imaging.chunk_size: a multiple of 512 from 4096 to 16 MiB, got {cs}")
    if not 1 <= img["compression_level"] <= 19:
        raise ConfigError(f"imaging.compression_level: must be 1-19, got {img['compression_level']}")
    if img["max_sessions"] < 1:
        raise ConfigError("imaging.max_sessions: must be at least 1")
    if img["min_receivers"] < 1:
        raise ConfigError(f"imaging.min_receivers: must be at least 1, got {img['min_receivers']}")
    url = values["database"]["url"]
    if not (url.startswith("sqlite:") or url.startswith("postgresql")):
        raise ConfigError(f"database.url: only sqlite: and postgresql URLs are supported, got {url!r}")


def multicast_ports(value: str) -> range:
    """The ports of imaging.multicast_ports ("FIRST-LAST")."""
    first, _, last = value.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise ConfigError(f"imaging.multicast_ports: expected FIRST-LAST, got {value!r}") from None
    if not 1 <= lo <= hi <= 65535:
        raise ConfigError(f"imaging.multicast_ports: ports must be 1-65535, FIRST <= LAST, "
                          f"got {value!r}")
    return range(lo, hi + 1)


def build(raw: dict[str, Any], overrides: list[str] | None = None,
          base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document plus `section.key=value` overrides."""
    if not isinstance(raw, dict):
        raise ConfigError("configuration: expected a table at top level")
    values: dict[str, dict[str, Any]] = {
        sec: {k.name: k.default for k in keys} for sec, (_, keys) in SCHEMA.items()
    }
    for sec, table in raw.items():
        if sec not in SCHEMA:
            raise ConfigError(f"{sec}: unknown section{did_you_mean(sec, SCHEMA)} "
                              f"(known: {', '.join(SCHEMA)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{sec}: expected a table")
        keys = {k.name: k for k in SCHEMA[sec][1]}
        for name, value in table.items():
            if name not in keys:
                raise ConfigError(f"{sec}.{name}: unknown key{_key_hint(sec, name)}")
            values[sec][name] = _coerce(sec, keys[name], value)
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        sec, name = dotted.strip().split(".", 1)
        if sec not in SCHEMA:
            raise ConfigError(f"{dotted}: unknown section{did_you_mean(sec, SCHEMA)}")
        keys = {k.name: k for k in SCHEMA[sec][1]}
        if name not in keys:
            raise ConfigError(f"{dotted}: unknown key{_key_hint(sec, name)}")
        values[sec][name] = _coerce(sec, keys[name], value.strip())
    _check_choices(values)
    return Config({s: Section(s, v) for s, v in values.items()}, base_dir or Path.cwd())


# Where a configuration is looked for when none is named with -c.
ENV_CONFIG = "BOOTHERD_CONFIG"
DEFAULT_CONFIG = Path("/etc/bootherd/bootherd.toml")


def find_config(path: str | os.PathLike | None = None) -> Path | None:
    """The configuration file to read: `path`, else $BOOTHERD_CONFIG, else
    /etc/bootherd/bootherd.toml if it exists; None means the built-in defaults."""
    if path:
        return Path(path)
    env = os.environ.get(ENV_CONFIG, "")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def describe_source(cfg: Config) -> str:
    """Where the configuration came from, for messages."""
    if cfg.source is not None:
        return str(cfg.source.absolute())
    return (f"built-in defaults (no -c, ${ENV_CONFIG} unset, no {DEFAULT_CONFIG})")


MASK = "********"


def mask_url(url: str) -> str:
    """A database URL with its password replaced by the mask."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:{MASK}@{host}"


# Field names whose values are secrets wherever they appear in printed records: node
# keys, password hashes, BMC passwords, tokens, TLS private keys.
SECRET_FIELDS = ("privkey", "password", "passwd", "secret", "token", "tls_key", "private_key")


def is_secret_field(name: str) -> bool:
    n = name.lower()
    return any(word in n for word in SECRET_FIELDS)


def mask_record(value: Any) -> Any:
    """`value` (dicts and lists of records) with every secret field masked."""
    if isinstance(value, dict):
        # A flag or a count (`password_set`) only says whether a secret exists: kept.
        return {k: (MASK if is_secret_field(str(k)) and not isinstance(v, (bool, int, float))
                    and v not in ("", None, "*") else mask_record(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask_record(v) for v in value]
    return value


def masked(cfg: Config) -> dict[str, dict[str, Any]]:
    """The configuration as a dict with every secret masked (for printing)."""
    out = cfg.as_dict()
    for sec, (_, keys) in SCHEMA.items():
        for k in keys:
            if k.secret and out[sec][k.name]:
                out[sec][k.name] = MASK
    out["database"]["url"] = mask_url(out["database"]["url"])
    return out


def _key_hint(sec: str, name: str) -> str:
    """The closest key of the section, else the same key in another section."""
    hint = did_you_mean(name, [k.name for k in SCHEMA[sec][1]])
    if not hint:
        elsewhere = [f"{s}.{name}" for s, (_, keys) in SCHEMA.items()
                     if s != sec and any(k.name == name for k in keys)]
        if elsewhere:
            hint = f" (did you mean {elsewhere[0]!r}?)"
    return hint


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load the configuration file (`find_config`) and apply overrides."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    found = find_config(path)
    if found:
        p = found
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: configuration file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the configuration: {e.strerror}") from None
    cfg = build(raw, overrides, base)
    cfg.source = found
    cfg.overrides = list(overrides or [])
    return cfg


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def example() -> str:
    """The complete default configuration, commented, as valid TOML."""
    out = ["# bootherd configuration. Every key is shown with its default.",
           "# Relative paths are taken from the folder bootherd is started in.", ""]
    for sec, (doc, keys) in SCHEMA.items():
        out.append(f"# {doc}")
        out.append(f"[{sec}]")
        for k in keys:
            out.append(f"# {k.doc}")
            out.append(f"{k.name} = {toml_value(k.default)}")
        out.append("")
    return "\n".join(out)

"""The node inventory schema (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Configuration tables (everything a node is told) are watched: any change to
them bumps `generation`, which running servers notice and reload their
snapshot from.  Runtime tables (leases, states, events) are written by the
servers themselves and do not trigger a reload.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

node_types = Table(
    "node_types", metadata,
    Column("name", String(64), primary_key=True),
    Column("class", String(32), nullable=False, server_default="pc"),
    Column("description", Text, nullable=False, server_default=""),
    # PXE loader per firmware kind, used when the node sets none of its own.
    Column("loader_bios", String(255), nullable=False, server_default=""),
    Column("loader_uefi", String(255), nullable=False, server_default=""),
    Column("loader_http", String(255), nullable=False, server_default=""),
    Column("loader_ipxe", String(255), nullable=False, server_default=""),
    # Every other loader slot (bootherd.firmware.MAP_SLOTS): a JSON object slot -> path.
    Column("loaders", Text, nullable=False, server_default=""),
)

os_images = Table(
    "os_images", metadata,
    Column("name", String(128), primary_key=True),
    # part: boot a disk partition; mfs: memory file system; kernel: kernel (+initrd)
    Column("kind", String(16), nullable=False),
    Column("partition", Integer),
    Column("sysid", Integer),
    Column("path", String(255), nullable=False, server_default=""),
    Column("initrd", String(255), nullable=False, server_default=""),
    Column("cmdline", Text, nullable=False, server_default=""),
    Column("description", Text, nullable=False, server_default=""),
    # The disk image (disk_images.name) a reload writes for this OS; "" for none.
    Column("disk_image", String(128), nullable=False, server_default=""),
)

nodes = Table(
    "nodes", metadata,
    Column("node_id", String(64), primary_key=True),
    Column("type", String(64), ForeignKey("node_types.name"), nullable=False),
    Column("role", String(32), nullable=False, server_default="testnode"),
    Column("phys_node_id", String(64), ForeignKey("nodes.node_id")),
    Column("jailed", Boolean, nullable=False, server_default="0"),
    Column("default_os", String(128), ForeignKey("os_images.name")),
    Column("temp_os", String(128), ForeignKey("os_images.name")),
    Column("next_os", String(128), ForeignKey("os_images.name")),
    Column("loader_bios", String(255), nullable=False, server_default=""),
    Column("loader_uefi", String(255), nullable=False, server_default=""),
    Column("loader_http", String(255), nullable=False, server_default=""),
    Column("loader_ipxe", String(255), nullable=False, server_default=""),
    # The loader this node is set to PXE-boot; another than bootinfo's gets REBOOT.
    Column("pxe_loader", String(255), nullable=False, server_default=""),
    Column("boot_cmdline", Text, nullable=False, server_default=""),
    Column("bios_disk", Integer),
    Column("privkey", String(128)),
    Column("ntp_drift", Float, nullable=False, server_default="0"),
    # TMCD `nodeuuid`; empty means one derived from node_id (stable, uuid5).
    Column("uuid", String(64), nullable=False, server_default=""),
    Column("loaders", Text, nullable=False, server_default=""),  # as node_types.loaders
)

interfaces = Table(
    "interfaces", metadata,
    Column("mac", String(17), primary_key=True),
    Column("node_id", String(64), ForeignKey("nodes.node_id", ondelete="CASCADE"), nullable=False),
    Column("ip", String(45), unique=True),
    Column("mask", String(45), nullable=False, server_default=""),
    Column("role", String(8), nullable=False, server_default="expt"),  # ctrl | expt
    Column("iface", String(32), nullable=False, server_default=""),
    Column("speed", Integer, nullable=False, server_default="1000"),
    Column("duplex", String(8), nullable=False, server_default="full"),
    Column("lan", String(64), nullable=False, server_default=""),
    Column("ip6", String(45)),  # the IPv6 address (DHCPv6, TMCD over IPv6), beside ip
    Index("ix_interfaces_node", "node_id"),
    Index("uq_interfaces_ip6", "ip6", unique=True),
)

groups = Table(
    "groups", metadata,
    Column("name", String(64), primary_key=True),
    Column("gid", Integer, nullable=False, unique=True),
    # The project (pid) the group belongs to; empty: the group is a project's own.
    Column("project", String(64), nullable=False, server_default=""),
)

users = Table(
    "users", metadata,
    Column("login", String(64), primary_key=True),
    Column("uid", Integer, nullable=False, unique=True),
    Column("gid", Integer, nullable=False),
    Column("name", String(255), nullable=False, server_default=""),
    Column("email", String(255), nullable=False, server_default=""),
    Column("shell", String(64), nullable=False, server_default="/bin/sh"),
    Column("password_hash", String(255), nullable=False, server_default="*"),
    Column("serial", Integer, nullable=False, server_default="1"),
)

user_groups = Table(
    "user_groups", metadata,
    Column("login", String(64), ForeignKey("users.login", ondelete="CASCADE"), primary_key=True),
    Column("group_name", String(64), ForeignKey("groups.name", ondelete="CASCADE"),
           primary_key=True),
)

ssh_keys = Table(
    "ssh_keys", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("login", String(64), ForeignKey("users.login", ondelete="CASCADE"), nullable=False),
    Column("key", Text, nullable=False),
)

experiments = Table(
    "experiments", metadata,
    Column("pid", String(64), primary_key=True),
    Column("eid", String(64), primary_key=True),
    Column("creator", String(64), ForeignKey("users.login"), nullable=False),
    Column("swapper", String(64), ForeignKey("users.login"), nullable=False),
    Column("routertype", String(16), nullable=False, server_default="none"),
    Column("nseconfig", Text, nullable=False, server_default=""),
    Column("startupcmd", Text, nullable=False, server_default=""),
    Column("gid", String(64), ForeignKey("groups.name")),
    # TMCD `keyhash` (also the key of the USEWEB file path) and `eventkey`;
    # empty: none handed out (and USEWEB downloads refused).
    Column("keyhash", String(64), nullable=False, server_default=""),
    Column("eventkey", String(64), nullable=False, server_default=""),
    Column("syncserver", String(64), nullable=False, server_default=""),  # a vname
    # emulabdefault | genidefault | none: are /proj, /users shared over NFS?
    Column("nfsmounts", String(16), nullable=False, server_default="emulabdefault"),
)

experiment_members = Table(
    "experiment_members", metadata,
    Column("pid", String(64), primary_key=True),
    Column("eid", String(64), primary_key=True),
    Column("login", String(64), ForeignKey("users.login", ondelete="CASCADE"), primary_key=True),
    Column("root", Boolean, nullable=False, server_default="0"),
)

allocations = Table(
    "allocations", metadata,
    Column("node_id", String(64), ForeignKey("nodes.node_id", ondelete="CASCADE"),
           primary_key=True),
    Column("pid", String(64), nullable=False),
    Column("eid", String(64), nullable=False),
    Column("vname", String(64), nullable=False),
    Column("startupcmd", Text, nullable=False, server_default=""),
    # The node's role in its experiment (TMCD `role`): node, virthost, delaynode, ...
    Column("erole", String(32), nullable=False, server_default="node"),
    UniqueConstraint("pid", "eid", "vname", name="uq_allocation_vname"),
)

mounts = Table(
    "mounts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pid", String(64), nullable=False),
    Column("eid", String(64), nullable=False),
    Column("fstype", String(16), nullable=False, server_default="NFS"),
    Column("remote", String(255), nullable=False),
    Column("local", String(255), nullable=False),
)

# Tarballs and RPMs belong to an experiment, optionally to one of its vnames.
tarballs = Table(
    "tarballs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pid", String(64), nullable=False),
    Column("eid", String(64), nullable=False),
    Column("vname", String(64), nullable=False, server_default=""),
    Column("dir", String(255), nullable=False),
    Column("path", String(255), nullable=False),
)

rpms = Table(
    "rpms", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pid", String(64), nullable=False),
    Column("eid", String(64), nullable=False),
    Column("vname", String(64), nullable=False, server_default=""),
    Column("path", String(255), nullable=False),
)

routes = Table(
    "routes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node_id", String(64), ForeignKey("nodes.node_id", ondelete="CASCADE"), nullable=False),
    Column("dest", String(45), nullable=False),
    Column("desttype", String(8), nullable=False, server_default="net"),
    Column("destmask", String(45), nullable=False, server_default="255.255.255.0"),
    Column("nexthop", String(45), nullable=False),
    Column("cost", Integer, nullable=False, server_default="1"),
    Column("src", String(45), nullable=False, server_default=""),
)

tunnels = Table(
    "tunnels", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node_id", String(64), ForeignKey("nodes.node_id", ondelete="CASCADE"), nullable=False),
    Column("lan", String(64), nullable=False),
    Column("member", String(64), nullable=False),
    Column("key", String(64), nullable=False),
    Column("value", Text, nullable=False, server_default=""),
)

trafgens = Table(
    "trafgens", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node_id", String(64), ForeignKey("nodes.node_id", ondelete="CASCADE"), nullable=False),
    Column("name", String(64), nullable=False),
    Column("myname", String(64), nullable=False),
    Column("myport", Integer, nullable=False),
    Column("peername", String(64), nullable=False),
    Column("peerport", Integer, nullable=False),
    Column("proto", String(8), nullable=False, server_default="udp"),
    Column("role", String(8), nullable=False, server_default="source"),
    Column("generator", String(32), nullable=False, server_default="TG"),
)

# Queue parameters of a shaped link, per direction (0, 1), as tmcd hands them to
# the delay agent: RED/GENTLE, queue LIMIT and the RED thresholds.
DELAY_QUEUE_INT = ("red", "limit", "maxthresh", "minthresh", "linterm", "qinbytes", "bytes",
                   "meanpsize", "wait", "setbit", "droptail", "gentle", "backfill")
DELAY_QUEUE_COLUMNS = [
    *(Column(f"{name}{d}", Integer, nullable=False, server_default="0")
      for d in (0, 1) for name in DELAY_QUEUE_INT),
    Column("weight0", Float, nullable=False, server_default="0"),
    Column("weight1", Float, nullable=False, server_default="0"),
    Column("vnode0", String(64), nullable=False, server_default=""),
    Column("vnode1", String(64), nullable=False, server_default=""),
    Column("noshaping", Integer, nullable=False, server_default="0"),
]

link_delays = Table(
    "link_delays", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node_id", String(64), ForeignKey("nodes.node_id", ondelete="CASCADE"), nullable=False),
    Column("linkname", String(64), nullable=False),
    Column("int0", String(17), nullable=False),
    Column("int1", String(17), nullable=False),
    Column("pipe0", Integer, nullable=False),
    Column("delay0", Float, nullable=False, server_default="0"),
    Column("bw0", Integer, nullable=False, server_default="100000"),
    Column("plr0", Float, nullable=False, server_default="0"),
    Column("pipe1", Integer, nullable=False),
    Column("delay1", Float, nullable=False, server_default="0"),
    Column("bw1", Integer, nullable=False, server_default="100000"),
    Column("plr1", Float, nullable=False, server_default="0"),
    *DELAY_QUEUE_COLUMNS,
)

ntp_servers = Table(
    "ntp_servers", metadata,
    Column("host", String(255), primary_key=True),
    Column("kind", String(8), nullable=False, server_default="server"),  # server | peer
)

# How each node's power and console are reached.  Read when an operation runs (so
# it is always current) and never copied into the snapshot: the password stays in
# the database, which is where BMC secrets are kept (docs/power.md).
node_power = Table(
    "node_power", metadata,
    Column("node_id", String(64), ForeignKey("nodes.node_id", ondelete="CASCADE"),
           primary_key=True),
    Column("driver", String(16), nullable=False),  # ipmi | ipmitool | redfish | wol | manual
    Column("address", String(255), nullable=False, server_default=""),
    Column("port", Integer, nullable=False, server_default="0"),
    Column("user", String(64), nullable=False, server_default=""),
    Column("password", String(255), nullable=False, server_default=""),
    Column("system", String(255), nullable=False, server_default=""),  # Redfish system id
    Column("console", String(255), nullable=False, server_default=""),  # "" | sol | tcp:H:P
)

# --- runtime tables: written by the servers, not watched -----------------------

leases = Table(
    "leases", metadata,
    Column("ip", String(45), primary_key=True),
    Column("mac", String(17), nullable=False),
    Column("client_id", String(255), nullable=False, server_default=""),
    Column("node_id", String(64)),
    Column("state", String(16), nullable=False, server_default="bound"),  # offered|bound|released|declined
    Column("expires", Float, nullable=False),
    Column("updated", Float, nullable=False),
    Column("server", String(64), nullable=False, server_default=""),
    Index("ix_leases_mac", "mac"),
)

node_states = Table(
    "node_states", metadata,
    Column("node_id", String(64), primary_key=True),
    Column("state", String(32), nullable=False),
    Column("since", Float, nullable=False),
    Column("source", String(16), nullable=False, server_default=""),
    # The server that recorded it: with several servers, the one that handled the
    # node's last boot contact, whose watcher alone acts on the node.
    Column("server", String(64), nullable=False, server_default=""),
)

# What the lifecycle coordinator remembers per node beyond its state, so that it
# survives a restart and is shared by several servers: how the node waits (told
# WAIT by which server, through bootinfo or iPXE), the last order it was sent and
# how often it was re-sent, the TMCD configuration digest it last fetched, and the
# recovery ladder's count and out-of-service flag.
node_lifecycle = Table(
    "node_lifecycle", metadata,
    Column("node_id", String(64), primary_key=True),
    Column("wait_via", String(16), nullable=False, server_default=""),  # "" | bootinfo | ipxe
    Column("wait_server", String(64), nullable=False, server_default=""),
    Column("wait_ts", Float, nullable=False, server_default="0"),
    Column("order_kind", String(16), nullable=False, server_default=""),  # "" | AUTO | ...
    Column("order_resends", Integer, nullable=False, server_default="0"),
    Column("order_server", String(64), nullable=False, server_default=""),
    Column("order_ts", Float, nullable=False, server_default="0"),
    Column("config_digest", String(64), nullable=False, server_default=""),
    # The disk image (disk_images.name) the node is to write: the reload cycle (migration 0006b).
    Column("reload_image", String(128), nullable=False, server_default=""),
    Column("updated", Float, nullable=False, server_default="0"),
    # The recovery ladder (migration 0019): power cycles spent since the node was last
    # ISUP, and the out-of-service flag it sets when it gives up ("" = in service),
    # which an operator clears.
    Column("power_cycles", Integer, nullable=False, server_default="0"),
    Column("out_of_service", Text, nullable=False, server_default=""),
    Column("out_since", Float, nullable=False, server_default="0"),
    Column("out_by", String(64), nullable=False, server_default=""),
)

node_events = Table(
    "node_events", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("node_id", String(64), nullable=False),
    Column("ts", Float, nullable=False),
    Column("state", String(32), nullable=False),
    Column("source", String(16), nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Index("ix_node_events_node", "node_id", "ts"),
)

generation = Table(
    "generation", metadata,
    Column("id", Integer, primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# One row per changed configuration row (node-keyed tables name the node; other
# tables leave node_id NULL).  Servers patch only the nodes named here into
# their snapshot instead of rebuilding it whole.  Pruned by age.
changes = Table(
    "changes", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("tbl", String(32), nullable=False),
    Column("node_id", String(64)),
    Column("ts", Float, nullable=False),
)

# Disk images under imaging.root, written by `bootherd image create`.  Not watched:
# creating an image changes nothing a node is told until an OS image points at it.
disk_images = Table(
    "disk_images", metadata,
    Column("name", String(128), primary_key=True),
    Column("file", String(255), nullable=False),  # relative to imaging.root
    Column("disk_size", BigInteger, nullable=False),
    Column("file_size", BigInteger, nullable=False),
    Column("chunk_size", Integer, nullable=False),
    Column("chunks", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("fs_aware", Boolean, nullable=False, server_default="0"),
    Column("source", Text, nullable=False, server_default=""),
    Column("notes", Text, nullable=False, server_default=""),
    Column("created", Float, nullable=False),
)

# Who changed the inventory: one row per change, written in the change's transaction
# by the CLI, the admin API and import; servers log the rows that appear.
inventory_audit = Table(
    "inventory_audit", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("origin", String(16), nullable=False),  # cli | api | import
    Column("who", String(128), nullable=False, server_default=""),
    Column("action", String(16), nullable=False),  # add | change | remove | import | ...
    Column("kind", String(32), nullable=False),  # node, interface, user, ...
    Column("key", String(255), nullable=False, server_default=""),
    Column("detail", Text, nullable=False, server_default=""),
)

servers = Table(
    "servers", metadata,
    Column("name", String(64), primary_key=True),
    Column("roles", String(255), nullable=False, server_default=""),
    Column("address", String(45), nullable=False, server_default=""),
    Column("started", Float, nullable=False),
    Column("heartbeat", Float, nullable=False),
)

# Configuration tables whose rows belong to one node: a change to them touches
# only that node in the snapshot.
NODE_TABLES = ["nodes", "interfaces", "allocations", "routes", "tunnels", "trafgens",
               "link_delays"]

WATCHED_TABLES = [
    "node_types", "os_images", "nodes", "interfaces", "groups", "users", "user_groups",
    "ssh_keys", "experiments", "experiment_members", "allocations", "mounts", "tarballs",
    "rpms", "routes", "tunnels", "trafgens", "link_delays", "ntp_servers",
]

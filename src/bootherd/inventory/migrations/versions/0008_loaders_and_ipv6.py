"""loaders by architecture and IPv6 addresses

Every client architecture has a loader slot (bootherd.firmware); the four that
predate the others keep their loader_<slot> columns, the rest live in a JSON
object `loaders` on node types and nodes.  Interfaces get an IPv6 address beside
their IPv4 one (DHCPv6 hands it out, TMCD and HTTP know the node by it).

Revision ID: 0008
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("node_types", "nodes"):
        op.add_column(table, sa.Column("loaders", sa.Text(), server_default="", nullable=False))
    # SQLite cannot add a UNIQUE column: the uniqueness is an index of its own.
    op.add_column("interfaces", sa.Column("ip6", sa.String(length=45), nullable=True))
    op.create_index("uq_interfaces_ip6", "interfaces", ["ip6"], unique=True)


def downgrade() -> None:
    # Plain ALTER TABLE (SQLite 3.35+ and PostgreSQL): a batch rebuild would drop the
    # tables' change-tracking triggers.
    op.drop_index("uq_interfaces_ip6", table_name="interfaces")
    op.execute('ALTER TABLE interfaces DROP COLUMN ip6')
    for table in ("nodes", "node_types"):
        op.execute(f'ALTER TABLE "{table}" DROP COLUMN loaders')

"""node lifecycle: which server recorded a state, and what the coordinator remembers

`node_states.server` names the server that handled a node's last boot contact,
so with several servers only that one's watcher acts on the node.
`node_lifecycle` keeps, per node, how it waits (told WAIT by which server,
through bootinfo or iPXE), its last order and re-sends, and the TMCD
configuration digest it last fetched: what must survive a restart.

Revision ID: 0004
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node_states") as b:
        b.add_column(sa.Column("server", sa.String(64), nullable=False, server_default=""))
    op.create_table(
        "node_lifecycle",
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("wait_via", sa.String(16), nullable=False, server_default=""),
        sa.Column("wait_server", sa.String(64), nullable=False, server_default=""),
        sa.Column("wait_ts", sa.Float(), nullable=False, server_default="0"),
        sa.Column("order_kind", sa.String(16), nullable=False, server_default=""),
        sa.Column("order_resends", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("order_server", sa.String(64), nullable=False, server_default=""),
        sa.Column("order_ts", sa.Float(), nullable=False, server_default="0"),
        sa.Column("config_digest", sa.String(64), nullable=False, server_default=""),
        sa.Column("updated", sa.Float(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("node_lifecycle")
    with op.batch_alter_table("node_states") as b:
        b.drop_column("server")

"""node power: each node's BMC (driver, address, credentials) and console

One row per node that has out-of-band power; read when a power operation runs,
never copied into the snapshot, so the BMC password stays in the database.

Revision ID: 0005
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_power",
        sa.Column("node_id", sa.String(64), sa.ForeignKey("nodes.node_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("driver", sa.String(16), nullable=False),
        sa.Column("address", sa.String(255), nullable=False, server_default=""),
        sa.Column("port", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("user", sa.String(64), nullable=False, server_default=""),
        sa.Column("password", sa.String(255), nullable=False, server_default=""),
        sa.Column("system", sa.String(255), nullable=False, server_default=""),
        sa.Column("console", sa.String(255), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("node_power")

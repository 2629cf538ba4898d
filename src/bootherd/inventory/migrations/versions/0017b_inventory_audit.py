"""inventory audit: who changed the inventory, from where, and what

One row per change (an entry added, changed or removed through the CLI or the
admin API, an allocation, a whole import), written in the change's own
transaction; running servers log the rows they see appear.

Revision ID: 0017b
Revises: 0006b
"""
import sqlalchemy as sa
from alembic import op

revision = "0017b"
down_revision = "0006b"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inventory_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("who", sa.String(128), nullable=False, server_default=""),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("key", sa.String(255), nullable=False, server_default=""),
        sa.Column("detail", sa.Text(), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("inventory_audit")

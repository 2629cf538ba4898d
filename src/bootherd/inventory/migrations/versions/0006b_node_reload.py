"""node reload: the disk image a node is to write (the reload cycle of issue 20),
remembered by the lifecycle coordinator so a restart keeps the reload

Revision ID: 0006b
Revises: 0019
"""
import sqlalchemy as sa
from alembic import op

revision = "0006b"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("node_lifecycle", sa.Column("reload_image", sa.String(128), nullable=False,
                                              server_default=""))


def downgrade() -> None:
    op.execute("ALTER TABLE node_lifecycle DROP COLUMN reload_image")  # SQLite >= 3.35, PostgreSQL

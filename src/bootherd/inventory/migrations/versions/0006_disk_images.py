"""disk images: the chunked images `bootherd image create` writes, and the OS images
that name one

Revision ID: 0006
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "disk_images",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("disk_size", sa.BigInteger(), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("fs_aware", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("source", sa.Text(), nullable=False, server_default=""),
        sa.Column("notes", sa.Text(), nullable=False, server_default=""),
        sa.Column("created", sa.Float(), nullable=False),
    )
    # A plain column (no foreign key): SQLite adds it in place, so the os_images
    # triggers stay; testbed import checks the name's form, `image delete` the users.
    op.add_column("os_images", sa.Column("disk_image", sa.String(128), nullable=False,
                                         server_default=""))


def downgrade() -> None:
    op.execute("ALTER TABLE os_images DROP COLUMN disk_image")  # SQLite >= 3.35, PostgreSQL
    op.drop_table("disk_images")

"""recovery ladder: power cycles per node and the out-of-service flag

`node_lifecycle` gains what the recovery ladder must share between servers and
keep across restarts: the power cycles it spent on a node since the node was
last ISUP, and the out-of-service flag it sets when it gives up (the reason,
when, by which server), which an operator clears
(`bootherd node service in NODE`).

Revision ID: 0019
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node_lifecycle") as b:
        b.add_column(sa.Column("power_cycles", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("out_of_service", sa.Text(), nullable=False, server_default=""))
        b.add_column(sa.Column("out_since", sa.Float(), nullable=False, server_default="0"))
        b.add_column(sa.Column("out_by", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("node_lifecycle") as b:
        for name in ("out_by", "out_since", "out_of_service", "power_cycles"):
            b.drop_column(name)

"""tmcd dialect: the fields Emulab's client scripts read that the inventory lacked

Group projects (ADDGROUP lists a project's groups), experiment key hash,
event key, sync server and shared-mount mode, a node's role in its
experiment, node UUIDs, and the queue parameters of shaped links
(RED/GENTLE, LIMIT, thresholds, VNODE, NOSHAPING, BACKFILL) that the delay
agent requires.

Revision ID: 0007
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0003"
branch_labels = None
depends_on = None

# Kept here, not imported from schema.py: a migration describes the schema as it
# was at this revision.
QUEUE_INT = ("red", "limit", "maxthresh", "minthresh", "linterm", "qinbytes", "bytes",
             "meanpsize", "wait", "setbit", "droptail", "gentle", "backfill")


def _text(name: str, size: int, default: str = "") -> sa.Column:
    return sa.Column(name, sa.String(size), nullable=False, server_default=default)


def _columns() -> dict[str, list[sa.Column]]:
    delays = [sa.Column(f"{n}{d}", sa.Integer(), nullable=False, server_default="0")
              for d in (0, 1) for n in QUEUE_INT]
    delays += [sa.Column("weight0", sa.Float(), nullable=False, server_default="0"),
               sa.Column("weight1", sa.Float(), nullable=False, server_default="0"),
               _text("vnode0", 64), _text("vnode1", 64),
               sa.Column("noshaping", sa.Integer(), nullable=False, server_default="0")]
    return {
        "nodes": [_text("uuid", 64)],
        "groups": [_text("project", 64)],
        "experiments": [_text("keyhash", 64), _text("eventkey", 64), _text("syncserver", 64),
                        _text("nfsmounts", 16, "emulabdefault")],
        "allocations": [_text("erole", 32, "node")],
        "link_delays": delays,
    }


def upgrade() -> None:
    # Plain ADD COLUMN on both databases: a batch (copy) on SQLite would drop the
    # tables' change-tracking triggers.
    for table, cols in _columns().items():
        for c in cols:
            op.add_column(table, c)


def downgrade() -> None:
    # SQLite before 3.35 cannot drop a column in place: the batch copies the
    # table (and loses its triggers, which 0002/0003's downgrade would drop anyway).
    for table, cols in _columns().items():
        with op.batch_alter_table(table) as batch:
            for c in cols:
                batch.drop_column(c.name)

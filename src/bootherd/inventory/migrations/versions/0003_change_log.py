"""change log: which node each configuration change touched

The generation counter says *that* something changed; the change log says
*which* nodes, so a running server patches those nodes into its snapshot
(milliseconds) instead of rebuilding 10,000 nodes (half a second of CPU that a
boot storm would rather spend answering).

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

from bootherd.inventory.schema import NODE_TABLES, WATCHED_TABLES

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("tbl", sa.String(32), nullable=False),
        sa.Column("node_id", sa.String(64)),
        sa.Column("ts", sa.Float(), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""
            CREATE FUNCTION bootherd_log_node_change() RETURNS trigger AS $$
            BEGIN
                IF TG_OP <> 'INSERT' THEN
                    INSERT INTO changes (tbl, node_id, ts)
                    VALUES (TG_TABLE_NAME, OLD.node_id, extract(epoch from now()));
                END IF;
                IF TG_OP <> 'DELETE' THEN
                    INSERT INTO changes (tbl, node_id, ts)
                    VALUES (TG_TABLE_NAME, NEW.node_id, extract(epoch from now()));
                END IF;
                RETURN NULL;
            END $$ LANGUAGE plpgsql""")
        op.execute("""
            CREATE FUNCTION bootherd_log_table_change() RETURNS trigger AS $$
            BEGIN
                INSERT INTO changes (tbl, node_id, ts)
                VALUES (TG_TABLE_NAME, NULL, extract(epoch from now()));
                RETURN NULL;
            END $$ LANGUAGE plpgsql""")
        for t in WATCHED_TABLES:
            if t in NODE_TABLES:
                op.execute(f"""
                    CREATE TRIGGER {t}_log AFTER INSERT OR UPDATE OR DELETE ON "{t}"
                    FOR EACH ROW EXECUTE FUNCTION bootherd_log_node_change()""")
                op.execute(f"""
                    CREATE TRIGGER {t}_log_truncate AFTER TRUNCATE ON "{t}"
                    FOR EACH STATEMENT EXECUTE FUNCTION bootherd_log_table_change()""")
            else:
                op.execute(f"""
                    CREATE TRIGGER {t}_log AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
                    ON "{t}" FOR EACH STATEMENT EXECUTE FUNCTION bootherd_log_table_change()""")
    else:
        now = "CAST(strftime('%s', 'now') AS REAL)"
        for t in WATCHED_TABLES:
            for ev in ("INSERT", "UPDATE", "DELETE"):
                rows = {"INSERT": ["NEW"], "UPDATE": ["OLD", "NEW"], "DELETE": ["OLD"]}[ev]
                if t in NODE_TABLES:
                    body = " ".join(
                        f"INSERT INTO changes (tbl, node_id, ts) VALUES ('{t}', {r}.node_id, {now});"
                        for r in rows)
                else:
                    body = f"INSERT INTO changes (tbl, node_id, ts) VALUES ('{t}', NULL, {now});"
                op.execute(f'CREATE TRIGGER {t}_log_{ev.lower()} AFTER {ev} ON "{t}" BEGIN {body} END')


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for t in WATCHED_TABLES:
            op.execute(f'DROP TRIGGER IF EXISTS {t}_log ON "{t}"')
            op.execute(f'DROP TRIGGER IF EXISTS {t}_log_truncate ON "{t}"')
        op.execute("DROP FUNCTION IF EXISTS bootherd_log_node_change()")
        op.execute("DROP FUNCTION IF EXISTS bootherd_log_table_change()")
    else:
        for t in WATCHED_TABLES:
            for ev in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {t}_log_{ev}")
    op.drop_table("changes")

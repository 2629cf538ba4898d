"""change tracking: every write to a configuration table bumps `generation`

Running servers compare the generation with the one their snapshot was built
from; PostgreSQL also sends NOTIFY bootherd_changes so they reload at once.
Triggers catch every writer, the CLI, the API or an operator's own SQL.

Revision ID: 0002
Revises: 0001
"""
from alembic import op

from bootherd.inventory.schema import WATCHED_TABLES

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("INSERT INTO generation (id, value) VALUES (1, 1)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""
            CREATE FUNCTION bootherd_bump_generation() RETURNS trigger AS $$
            DECLARE g bigint;
            BEGIN
                UPDATE generation SET value = value + 1 WHERE id = 1 RETURNING value INTO g;
                PERFORM pg_notify('bootherd_changes', g::text);
                RETURN NULL;
            END $$ LANGUAGE plpgsql""")
        for t in WATCHED_TABLES:
            op.execute(f"""
                CREATE TRIGGER {t}_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
                ON "{t}" FOR EACH STATEMENT EXECUTE FUNCTION bootherd_bump_generation()""")
    else:
        for t in WATCHED_TABLES:
            for ev in ("INSERT", "UPDATE", "DELETE"):
                op.execute(f"""
                    CREATE TRIGGER {t}_bump_{ev.lower()} AFTER {ev} ON "{t}"
                    BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for t in WATCHED_TABLES:
            op.execute(f'DROP TRIGGER IF EXISTS {t}_bump ON "{t}"')
        op.execute("DROP FUNCTION IF EXISTS bootherd_bump_generation()")
    else:
        for t in WATCHED_TABLES:
            for ev in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {t}_bump_{ev}")
    op.execute("DELETE FROM generation WHERE id = 1")

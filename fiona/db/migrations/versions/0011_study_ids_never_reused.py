"""study and series row ids are never reused (SQLite AUTOINCREMENT)

By default SQLite gives a new row the largest rowid plus one: after the newest study was
deleted (retention, a subject's erasure) the next study got its id, and an index writer that
still remembered the deleted study's id filed that study's instances, sent again, under the
other one. PostgreSQL's sequences never reuse ids; nothing changes there.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in ("studies", "series"):
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": True}
        ):
            pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in ("series", "studies"):
        with op.batch_alter_table(table, recreate="always"):
            pass

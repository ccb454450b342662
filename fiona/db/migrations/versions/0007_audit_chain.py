"""audit trail: hash chain (seq, row_hash, the chain head), patient keys on audit rows, and
triggers that make the audit tables append-only

Existing audit rows are chained in id order, so that `fiona audit verify` covers them too.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import sqlalchemy as sa
from alembic import op

from fiona.db.chain import GENESIS, content_of, install_guards, remove_guards, row_digest

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_events = sa.table(
    "audit_events",
    sa.column("id", sa.Integer()),
    sa.column("occurred_at", sa.DateTime(timezone=True)),
    sa.column("event_type", sa.String()),
    sa.column("actor", sa.String()),
    sa.column("project", sa.String()),
    sa.column("request_id", sa.Integer()),
    sa.column("study_key", sa.String()),
    sa.column("patient_key", sa.String()),
    sa.column("details", sa.JSON()),
    sa.column("seq", sa.BigInteger()),
    sa.column("row_hash", sa.String()),
)


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("patient_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("row_hash", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_audit_events_patient_key"), ["patient_key"])
        batch_op.create_unique_constraint("uq_audit_events_seq", ["seq"])
    chain = op.create_table(
        "audit_chain",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("row_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    connection = op.get_bind()
    previous, seq, last_id = GENESIS, 0, 0
    while True:
        rows = connection.execute(
            sa.select(_events).where(_events.c.id > last_id).order_by(_events.c.id).limit(2000)
        ).all()
        if not rows:
            break
        updates = []
        for row in rows:
            seq += 1
            fixed = SimpleNamespace(**{**row._asdict(), "occurred_at": _utc(row.occurred_at)})
            previous = row_digest(previous, content_of(fixed, seq))
            updates.append({"b_id": row.id, "b_seq": seq, "b_hash": previous})
        connection.execute(
            _events.update()
            .where(_events.c.id == sa.bindparam("b_id"))
            .values(seq=sa.bindparam("b_seq"), row_hash=sa.bindparam("b_hash")),
            updates,
        )
        last_id = rows[-1].id
    op.bulk_insert(chain, [{"id": 1, "seq": seq, "row_hash": previous}])
    install_guards(connection)


def _utc(value: datetime) -> datetime:
    # SQLite returns naive datetimes (stored as UTC), as fiona.db.models.UTCDateTime knows.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def downgrade() -> None:
    remove_guards(op.get_bind())
    op.drop_table("audit_chain")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_constraint("uq_audit_events_seq", type_="unique")
        batch_op.drop_index(batch_op.f("ix_audit_events_patient_key"))
        batch_op.drop_column("row_hash")
        batch_op.drop_column("seq")
        batch_op.drop_column("patient_key")

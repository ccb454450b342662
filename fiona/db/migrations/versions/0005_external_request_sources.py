"""external request sources: where a request lives in REDCap, and when each study's
"Incoming" record was written there

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("transfer_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("external_ref", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("external_digest", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("external_synced_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_unique_constraint("uq_request_external", ["source", "external_ref"])
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("incoming_written_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("incoming_written_at")
    with op.batch_alter_table("transfer_requests", schema=None) as batch_op:
        batch_op.drop_constraint("uq_request_external", type_="unique")
        batch_op.drop_column("external_synced_at")
        batch_op.drop_column("external_digest")
        batch_op.drop_column("external_ref")

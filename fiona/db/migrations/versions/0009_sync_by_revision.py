"""REDCap write-back by revision and Incoming records by stable moment, not by timestamp order

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("transfer_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("revision", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("external_synced_revision", sa.Integer(), nullable=True))
    # A request written back after its last change counts as given (revision 0); any other
    # (never written, or changed since, or stamped at the same moment) is written back again —
    # once more than needed is harmless, once less is a status REDCap never shows.
    requests = sa.table(
        "transfer_requests",
        sa.column("external_synced_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
        sa.column("external_synced_revision", sa.Integer()),
    )
    op.execute(
        requests.update()
        .where(requests.c.external_synced_at > requests.c.updated_at)
        .values(external_synced_revision=0)
    )

    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("incoming_written_stable_at", sa.DateTime(timezone=True), nullable=True)
        )
    studies = sa.table(
        "studies",
        sa.column("incoming_written_at", sa.DateTime(timezone=True)),
        sa.column("stable_at", sa.DateTime(timezone=True)),
        sa.column("incoming_written_stable_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        studies.update()
        .where(studies.c.incoming_written_at > studies.c.stable_at)
        .values(incoming_written_stable_at=studies.c.stable_at)
    )


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("incoming_written_stable_at")
    with op.batch_alter_table("transfer_requests", schema=None) as batch_op:
        batch_op.drop_column("external_synced_revision")
        batch_op.drop_column("revision")

"""deliveries remember the received version they were prepared from (replacements flow on)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_digest", sa.String(length=64), nullable=True))
    # What was prepared before counts as prepared from the version held now: a replacement
    # arriving from here on is noticed.
    op.execute(
        "UPDATE deliveries SET source_digest = "
        "(SELECT digest FROM instances WHERE instances.id = deliveries.instance_id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("source_digest")

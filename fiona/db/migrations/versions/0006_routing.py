"""routing: when a study was last routed; longer request sources (``rule:<id>``); the
coupling list; retention warnings

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "coupling_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("accession_key", sa.String(length=64), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("coupling_entries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_coupling_entries_accession_key"), ["accession_key"])
        batch_op.create_index(
            batch_op.f("ix_coupling_entries_study_instance_uid"), ["study_instance_uid"]
        )
        batch_op.create_index(batch_op.f("ix_coupling_entries_expires_at"), ["expires_at"])
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("routed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("retention_warned_at", sa.DateTime(timezone=True), nullable=True)
        )
    # Studies that were stable before routing existed are not routed now (that would send old
    # data on its own); `fiona route replay --apply` does it on purpose.
    op.execute("UPDATE studies SET routed_at = stable_at WHERE state = 'STABLE'")
    with op.batch_alter_table("transfer_requests", schema=None) as batch_op:
        batch_op.alter_column(
            "source", existing_type=sa.String(length=16), type_=sa.String(length=80)
        )


def downgrade() -> None:
    with op.batch_alter_table("transfer_requests", schema=None) as batch_op:
        batch_op.alter_column(
            "source", existing_type=sa.String(length=80), type_=sa.String(length=16)
        )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("retention_warned_at")
        batch_op.drop_column("routed_at")
    op.drop_table("coupling_entries")

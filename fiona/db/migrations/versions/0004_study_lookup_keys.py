"""study lookup keys: keyed hashes of AccessionNumber and PatientID, and the StudyDate

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("accession_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("patient_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("study_date", sa.String(length=8), nullable=True))
        batch_op.create_index(batch_op.f("ix_studies_accession_key"), ["accession_key"])
        batch_op.create_index(batch_op.f("ix_studies_patient_key"), ["patient_key"])


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_patient_key"))
        batch_op.drop_index(batch_op.f("ix_studies_accession_key"))
        batch_op.drop_column("study_date")
        batch_op.drop_column("patient_key")
        batch_op.drop_column("accession_key")

"""forwarding: transfer requests, delivery ledger, destination states

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "destination_states",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("breaker_open", sa.Boolean(), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_probe_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "transfer_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("transfer_project_name", sa.String(length=64), nullable=False),
        sa.Column("transfer_name", sa.String(length=64), nullable=False),
        sa.Column("transfer_event_name", sa.String(length=64), nullable=False),
        sa.Column("transfer_site", sa.String(length=64), nullable=True),
        sa.Column("transfer_date_offset_days", sa.Integer(), nullable=True),
        sa.Column("transfer_requested_date", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "NEW",
                "WAITING_FOR_DATA",
                "PROCESSING",
                "SENT",
                "PARTIAL",
                "FAILED",
                "HELD",
                "CANCELLED",
                name="requeststatus",
                native_enum=False,
                length=40,
            ),
            nullable=False,
        ),
        sa.Column("transfer_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("transfer_mapped_uid", sa.String(length=64), nullable=True),
        sa.Column("transfer_error", sa.String(length=64), nullable=True),
        sa.Column("transfer_error_message", sa.Text(), nullable=True),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("transfer_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_transfer_requests_status"), ["status"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_transfer_requests_study_id"), ["study_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_transfer_requests_study_instance_uid"),
            ["study_instance_uid"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_transfer_requests_transfer_project_name"),
            ["transfer_project_name"],
            unique=False,
        )

    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "PENDING",
                "IN_FLIGHT",
                "DELIVERED",
                "FAILED",
                name="deliverystate",
                native_enum=False,
                length=40,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error_class", sa.String(length=40), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("new_study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("new_series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("new_sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["transfer_requests.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id", "instance_id", "destination", name="uq_delivery"),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_deliveries_due", ["destination", "state", "next_attempt_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_deliveries_instance_id"), ["instance_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_deliveries_request_id"), ["request_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_request_id"))
        batch_op.drop_index(batch_op.f("ix_deliveries_instance_id"))
        batch_op.drop_index("ix_deliveries_due")

    op.drop_table("deliveries")
    with op.batch_alter_table("transfer_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_transfer_requests_transfer_project_name"))
        batch_op.drop_index(batch_op.f("ix_transfer_requests_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_transfer_requests_study_id"))
        batch_op.drop_index(batch_op.f("ix_transfer_requests_status"))

    op.drop_table("transfer_requests")
    op.drop_table("destination_states")

"""SQLAlchemy 2 models: the ledger of what FIONA received and what it did.

No patient name, ID or birth date is stored here: header values that later stages need
are read from the spooled file itself. Schema changes go through Alembic migrations in
``fiona/db/migrations`` (``fiona db upgrade``).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Association",
    "AuditChainHead",
    "AuditEvent",
    "AuditEventType",
    "Base",
    "Delivery",
    "DeliveryCheck",
    "DeliveryState",
    "DestinationState",
    "Instance",
    "InstanceState",
    "QuarantinedFile",
    "RequestStatus",
    "Series",
    "Study",
    "StudyState",
    "TransferRequest",
    "UTCDateTime",
    "User",
    "UserRole",
]

UID = String(64)
AE = String(16)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC-aware ones")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StudyState(enum.Enum):
    """Where a study (or series) stands in the receive stage."""

    RECEIVING = "RECEIVING"
    """Instances arrived within ``stable_after_seconds``."""
    STABLE = "STABLE"
    """No instance for ``stable_after_seconds``; later stages may take it."""


class InstanceState(enum.Enum):
    """Where an instance stands; later stages add their states."""

    RECEIVED = "RECEIVED"
    """Durably on disk and indexed, new for the later stages."""


class AuditEventType(enum.Enum):
    """What happened."""

    ASSOCIATION_ACCEPTED = "ASSOCIATION_ACCEPTED"
    ASSOCIATION_REJECTED = "ASSOCIATION_REJECTED"
    ASSOCIATION_ENDED = "ASSOCIATION_ENDED"
    INSTANCE_REPLACED = "INSTANCE_REPLACED"
    INSTANCE_QUARANTINED = "INSTANCE_QUARANTINED"
    STORE_REFUSED = "STORE_REFUSED"
    STUDY_STABLE = "STUDY_STABLE"
    STUDY_REOPENED = "STUDY_REOPENED"
    CONFIGURATION_LOADED = "CONFIGURATION_LOADED"
    SPOOL_RECONCILED = "SPOOL_RECONCILED"
    FILE_MISSING = "FILE_MISSING"
    IMPORT_FINISHED = "IMPORT_FINISHED"
    REQUEST_CREATED = "REQUEST_CREATED"
    REQUEST_FAILED = "REQUEST_FAILED"
    REQUEST_HELD = "REQUEST_HELD"
    REQUEST_CHANGED = "REQUEST_CHANGED"
    REQUEST_CANCELLED = "REQUEST_CANCELLED"
    REQUEST_COMPLETED = "REQUEST_COMPLETED"
    DEIDENTIFIED = "DEIDENTIFIED"
    DEIDENTIFICATION_FAILED = "DEIDENTIFICATION_FAILED"
    DELIVERED = "DELIVERED"
    DELIVERY_FAILED = "DELIVERY_FAILED"
    DELIVERY_RETRIED = "DELIVERY_RETRIED"
    BREAKER_OPENED = "BREAKER_OPENED"
    BREAKER_CLOSED = "BREAKER_CLOSED"
    DELIVERY_VERIFIED = "DELIVERY_VERIFIED"
    REQUEST_SOURCE_ALERT = "REQUEST_SOURCE_ALERT"
    """The request source (REDCap) refused FIONA (token, permissions, its project's fields)."""
    ROUTING_DECISION = "ROUTING_DECISION"
    """Which projects a stable study went to, by which rule (or ``unassigned``)."""
    UNASSIGNED_EXPIRING = "UNASSIGNED_EXPIRING"
    """An unassigned study will be deleted by retention after the warning period."""
    RETENTION_DELETED = "RETENTION_DELETED"
    """Retention deleted an unassigned study's files and index rows."""
    COUPLING_IMPORTED = "COUPLING_IMPORTED"
    """Coupling-list entries were added (who, how many, for which projects)."""
    RULES_LOADED = "RULES_LOADED"
    """The routing rules file was (re)loaded: its path and SHA-256."""
    STUDY_RECEIVED = "STUDY_RECEIVED"
    """The first instance of a study not held before (sender, association, patient key)."""
    SUBJECT_FORGOTTEN = "SUBJECT_FORGOTTEN"
    """``fiona report subject --forget`` removed a participant's originals from FIONA."""
    USER_CHANGED = "USER_CHANGED"
    """A web/API user was added or changed (name, role, projects; never the password)."""
    LOGIN = "LOGIN"
    """A user logged in to the web interface (name, address)."""
    LOGIN_FAILED = "LOGIN_FAILED"
    """A failed or refused login (the name tried, address, why)."""
    QUARANTINE_RELEASED = "QUARANTINE_RELEASED"
    """An operator released a quarantined file: it passed the checks and was ingested."""
    QUARANTINE_DELETED = "QUARANTINE_DELETED"
    """An operator deleted a quarantined file for good."""
    EXPORT_CREATED = "EXPORT_CREATED"
    """A web user made an export package of a project's de-identified data."""
    EXPORT_DOWNLOADED = "EXPORT_DOWNLOADED"
    """An export package was downloaded."""
    ECHO_TESTED = "ECHO_TESTED"
    """A web user C-ECHOed a destination (the result)."""
    PROTECTED_VIEWED = "PROTECTED_VIEWED"
    """A web user read a protected report (subject report, de-identification check)."""
    LOGOUT = "LOGOUT"
    """A user logged out."""


class UserRole(enum.Enum):
    """What a web/API user may do (``fiona user add --role``)."""

    ADMIN = "admin"
    """Everything, configuration views and user management included."""
    PROJECT = "project"
    """Requests and studies of their own projects only."""
    AUDITOR = "auditor"
    """Read-only: the audit log and the reports."""


class RequestStatus(enum.Enum):
    """A transfer request's status (the strings of MMIV's REDCap instrument)."""

    NEW = "new"
    WAITING_FOR_DATA = "waiting-for-data"
    PROCESSING = "processing"
    SENT = "sent"
    PARTIAL = "partial"
    FAILED = "failed"
    HELD = "held"
    CANCELLED = "cancelled"


class DeliveryState(enum.Enum):
    """One (request, instance, destination) row of the delivery ledger."""

    PENDING = "PENDING"
    """Due at ``next_attempt_at``."""
    IN_FLIGHT = "IN_FLIGHT"
    """Claimed by a sender until ``lease_until`` (a crash leaves it to be sent again)."""
    DELIVERED = "DELIVERED"
    """Acknowledged (success or warning status)."""
    FAILED = "FAILED"
    """Permanent failure (reason in ``last_error``); an operator may retry it."""
    SKIPPED = "SKIPPED"
    """Not sent on purpose: the project never receives this modality (``projects.<ID>.drop``);
    the reason is in ``last_error``. Counts as done."""


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings: adding a member needs no ALTER TYPE on PostgreSQL.
    return Enum(cls, native_enum=False, length=40, validate_strings=True)


class Base(DeclarativeBase):
    """Declarative base of every FIONA table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON}


class Association(Base):
    """One DICOM association (or one ``fiona import`` run): who sent, and how much."""

    __tablename__ = "associations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(AE)
    called_ae_title: Mapped[str] = mapped_column(AE)
    peer_address: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)


class Study(Base):
    """A study as received (original StudyInstanceUID)."""

    __tablename__ = "studies"
    # Ids are never reused: index writers remember them (see migration 0011).
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012 (declarative reads it once)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), index=True)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    stable_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    reopened_count: Mapped[int] = mapped_column(Integer, default=0)
    accession_key: Mapped[str | None] = mapped_column(String(64), index=True)
    """Keyed hash (node secret) of the AccessionNumber of the study's first instance: a request
    can name the study by it; the number itself is never stored here."""
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)
    """Keyed hash of the PatientID (with ``study_date``: a request by patient and date)."""
    study_date: Mapped[str | None] = mapped_column(String(8))
    incoming_written_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When the study's "Incoming" record was last written to REDCap (``requests.source:
    redcap``)."""
    incoming_written_stable_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """The ``stable_at`` of the study as it was written there: once the study is stable again
    (a late series), ``stable_at`` differs and the record is written again. Compared for
    equality, not order: the sweep stamps the moment it began, which can be before (or the
    same as) the moment the record was written."""
    routed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When routing last decided about the study (again when it became stable after that)."""
    retention_warned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When its deletion as an unassigned study was announced (``routing.
    unassigned_retention_days``)."""


class Series(Base):
    """A series as received; its metadata file is written once it is stable."""

    __tablename__ = "series"
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012 (declarative reads it once)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), index=True)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    stable_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    metadata_written_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    """One SOP instance on disk under ``incoming/``, with how it arrived."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str | None] = mapped_column(String(16))
    calling_ae_title: Mapped[str] = mapped_column(AE)
    called_ae_title: Mapped[str] = mapped_column(AE)
    peer_address: Mapped[str] = mapped_column(String(64))
    association_id: Mapped[str] = mapped_column(String(36), index=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the stored file, hex."""
    path: Mapped[str] = mapped_column(Text)
    """Relative to the storage folder."""
    version: Mapped[int] = mapped_column(Integer, default=1)
    """1 for the first copy; +1 each time different bytes replaced it."""
    state: Mapped[InstanceState] = mapped_column(_enum(InstanceState), index=True)
    file_missing: Mapped[bool] = mapped_column(default=False)
    """Set by restart reconciliation when the row's file is gone."""


class QuarantinedFile(Base):
    """Bytes FIONA could not accept into ``incoming/``, kept with the reason."""

    __tablename__ = "quarantined_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    quarantined_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(AE)
    called_ae_title: Mapped[str] = mapped_column(AE)
    peer_address: Mapped[str] = mapped_column(String(64))
    association_id: Mapped[str] = mapped_column(String(36))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128))
    sop_class_uid: Mapped[str | None] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))


class TransferRequest(Base):
    """Study → project, pseudonym, event: one row per request (REDCap-like field names).

    This table is the only place where an original study is linked to its pseudonym; it is
    protected like the spool. Issue 5 adds the poller, validation and the REDCap adapter.
    """

    __tablename__ = "transfer_requests"
    __table_args__ = (UniqueConstraint("source", "external_ref", name="uq_request_external"),)
    # The new revision (an UPDATE's own ``revision + 1``) is read back at once (RETURNING).
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012 (declarative reads it once)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    """The original StudyInstanceUID."""
    accession_number: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    transfer_project_name: Mapped[str] = mapped_column(String(64), index=True)
    transfer_name: Mapped[str] = mapped_column(String(64))
    """The pseudonym."""
    transfer_event_name: Mapped[str] = mapped_column(String(64), default="")
    transfer_site: Mapped[str | None] = mapped_column(String(64))
    transfer_date_offset_days: Mapped[int | None] = mapped_column(Integer)
    transfer_requested_date: Mapped[datetime] = mapped_column(UTCDateTime)
    requested_by: Mapped[str] = mapped_column(String(128))
    status: Mapped[RequestStatus] = mapped_column(_enum(RequestStatus), index=True)
    transfer_date: Mapped[datetime | None] = mapped_column(UTCDateTime)
    transfer_mapped_uid: Mapped[str | None] = mapped_column(UID)
    """The new StudyInstanceUID."""
    transfer_error: Mapped[str | None] = mapped_column(String(64))
    """Flags: ``de-identification``, ``sending``, ``held`` (comma-separated)."""
    transfer_error_message: Mapped[str | None] = mapped_column(Text)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    source: Mapped[str] = mapped_column(String(80), default="table")
    """Who made the request: ``cli``, ``csv``, ``redcap``, ``ae-title``, ``rule:<id>``,
    ``coupling``, ``resend of <id>``."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    external_ref: Mapped[str | None] = mapped_column(String(200))
    """Where an external source keeps the request (REDCap: ``<record>#<repeat instance>``)."""
    external_digest: Mapped[str | None] = mapped_column(String(64))
    """Digest of the source's fields when last read: a change there changes it."""
    external_synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When FIONA's fields were last written back (and read back) to the source."""
    revision: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", onupdate=text("revision + 1")
    )
    """Bumped by the database in every UPDATE of the row that does not set it itself.

    What an external source was last given is tracked by revision, not by time: concurrent
    passes stamp ``updated_at`` with the moment each began, so a change committed after a
    write-back can carry an earlier (or the same) timestamp."""
    external_synced_revision: Mapped[int | None] = mapped_column(Integer)
    """The revision whose fields the source last kept (``None``: never written back)."""


class CouplingEntry(Base):
    """One coupling-list row: the study with this AccessionNumber (or UID) goes to a project.

    The AccessionNumber is kept only as a keyed hash (node secret), like the studies' own.
    """

    __tablename__ = "coupling_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    accession_key: Mapped[str | None] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    project: Mapped[str] = mapped_column(String(64))
    pseudonym: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(64), default="")
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class Delivery(Base):
    """The delivery ledger: one row per (request, instance, destination)."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("request_id", "instance_id", "destination", name="uq_delivery"),
        Index("ix_deliveries_due", "destination", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("transfer_requests.id"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """C-STOREs (or writes) started; more than one success-worthy attempt means a resend."""
    last_status: Mapped[int | None] = mapped_column(Integer)
    """The last DIMSE status (None: no answer)."""
    last_error_class: Mapped[str | None] = mapped_column(String(40))
    last_error: Mapped[str | None] = mapped_column(Text)
    """Why the last attempt failed (never patient data)."""
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the de-identified bytes (the same on every resend)."""
    source_digest: Mapped[str | None] = mapped_column(String(64))
    """The digest of the received instance the row was prepared from. When a replacement
    arrives (same SOP Instance UID, other bytes) it differs from the instance's: the row is
    prepared again and the new version sent (``None``: prepared before FIONA kept it)."""
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    new_study_instance_uid: Mapped[str] = mapped_column(UID)
    new_series_instance_uid: Mapped[str] = mapped_column(UID)
    new_sop_instance_uid: Mapped[str] = mapped_column(UID)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DeliveryCheck(Base):
    """A check that a destination holds what it acknowledged (C-FIND of the new study)."""

    __tablename__ = "delivery_checks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("transfer_requests.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expected: Mapped[int] = mapped_column(Integer)
    """Instances of the new study FIONA delivered to this destination (all requests)."""
    found: Mapped[int | None] = mapped_column(Integer)
    """What the destination reports (None: the query failed)."""
    ok: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)


class DestinationState(Base):
    """A destination's circuit breaker, shared by every FIONA process."""

    __tablename__ = "destination_states"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    breaker_open: Mapped[bool] = mapped_column(default=False)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_probe_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """An append-only audit row, sealed into a hash chain when its transaction commits.

    Rows carry no PHI in clear: studies and patients are named by keyed hashes (node secret).
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_type_time", "event_type", "occurred_at"),
        UniqueConstraint("seq", name="uq_audit_events_seq"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    event_type: Mapped[AuditEventType] = mapped_column(_enum(AuditEventType))
    actor: Mapped[str] = mapped_column(String(128))
    project: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[int | None] = mapped_column(Integer)
    study_key: Mapped[str | None] = mapped_column(String(64), index=True)
    """Keyed hash of the original StudyInstanceUID, never the UID itself."""
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)
    """Keyed hash of the original PatientID, where the event concerns one patient's study."""
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seq: Mapped[int | None] = mapped_column(BigInteger)
    """Position in the hash chain (1, 2, 3 …), set when the row's transaction commits."""
    row_hash: Mapped[str | None] = mapped_column(String(64))
    """SHA-256 of the previous row's ``row_hash`` and this row's content (``fiona.db.chain``)."""


class AuditChainHead(Base):
    """The single row (``id`` 1) holding the audit chain's last position and hash."""

    __tablename__ = "audit_chain"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    row_hash: Mapped[str] = mapped_column(String(64))


class User(Base):
    """A person (or script) using the web interface and the HTTP API."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[UserRole] = mapped_column(_enum(UserRole))
    projects: Mapped[list[str]] = mapped_column(JSON, default=list)
    """The projects a ``project`` user works on (empty for the other roles)."""
    password_hash: Mapped[str] = mapped_column(Text)
    """Argon2id (``argon2-cffi``), never the password."""
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    """SHA-256 of the user's API token (``fiona user token``); the token itself is shown once."""
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

"""What auditors and data-protection officers ask: the routing log and the subject report.

Both are answered from the audit trail, which names studies and patients only by keyed hashes
(node secret): given a PatientID or StudyInstanceUID, FIONA computes the key and finds the
rows; nobody can list the identifiers from the trail. The protected tables (transfer requests,
the study index, the delivery ledger) add what they still hold — the original
StudyInstanceUIDs and the generated series — until ``fiona report subject --forget`` removes
the participant's originals; the audit trail keeps answering after that.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.db import (
    AuditEvent,
    AuditEventType,
    CouplingEntry,
    Delivery,
    DeliveryState,
    Instance,
    RequestStatus,
    Series,
    Study,
    TransferRequest,
)
from fiona.db.chain import PLAIN_FIELDS
from fiona.keys import keyed_hash

__all__ = [
    "AuditFilter",
    "ForgetRefusedError",
    "ForgetResult",
    "RequestReport",
    "Subject",
    "SubjectReport",
    "event_line",
    "event_record",
    "forget_subject",
    "resolve_subject",
    "select_events",
    "subject_report",
]

OPEN_STATUSES = (
    RequestStatus.NEW,
    RequestStatus.WAITING_FOR_DATA,
    RequestStatus.PROCESSING,
    RequestStatus.HELD,
)
"""Statuses in which a request may still send data: forgetting its subject is refused."""


@dataclass
class Subject:
    """Everything that names one participant (or one study) in FIONA's records."""

    patient_key: str | None
    study_keys: set[str] = field(default_factory=set)
    study_uids: set[str] = field(default_factory=set)
    """Original StudyInstanceUIDs the protected tables still hold."""
    request_ids: set[int] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return not (self.study_keys or self.request_ids)


def resolve_subject(
    session: Session,
    node_key: bytes,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
) -> Subject:
    """Find the studies and requests of a PatientID or of a StudyInstanceUID.

    A patient's studies come from ``STUDY_RECEIVED`` rows (the trail links study and patient
    keys) and from the study index; requests from every audit row about those studies, from
    requests named by the PatientID, and from the request table.
    """
    if bool(patient_id) == bool(study_uid):
        raise ValueError("give exactly one of a PatientID and a StudyInstanceUID")
    subject = Subject(keyed_hash(node_key, patient_id) if patient_id else None)
    if study_uid:
        subject.study_uids.add(study_uid)
        subject.study_keys.add(keyed_hash(node_key, study_uid))
    else:
        key = subject.patient_key
        subject.study_keys.update(
            session.scalars(
                select(AuditEvent.study_key).where(
                    AuditEvent.patient_key == key, AuditEvent.study_key.is_not(None)
                )
            ).all()  # type: ignore[arg-type]  # filtered on NOT NULL
        )
        subject.study_uids.update(
            session.scalars(select(Study.study_instance_uid).where(Study.patient_key == key))
        )
        subject.request_ids.update(
            session.scalars(
                select(AuditEvent.request_id).where(
                    AuditEvent.patient_key == key, AuditEvent.request_id.is_not(None)
                )
            ).all()  # type: ignore[arg-type]  # filtered on NOT NULL
        )
        subject.request_ids.update(
            session.scalars(
                select(TransferRequest.id).where(TransferRequest.patient_id == patient_id)
            )
        )
    subject.study_keys.update(keyed_hash(node_key, uid) for uid in subject.study_uids)
    if subject.study_keys:
        subject.request_ids.update(
            session.scalars(
                select(AuditEvent.request_id).where(
                    AuditEvent.study_key.in_(subject.study_keys),
                    AuditEvent.request_id.is_not(None),
                )
            ).all()  # type: ignore[arg-type]  # filtered on NOT NULL
        )
    if subject.study_uids:
        subject.request_ids.update(
            session.scalars(
                select(TransferRequest.id).where(
                    TransferRequest.study_instance_uid.in_(subject.study_uids)
                )
            )
        )
    return subject


# -- the routing log -------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilter:
    """``fiona audit``'s selection; empty fields select everything."""

    subject: Subject | None = None
    project: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    event_types: tuple[AuditEventType, ...] = ()


def select_events(session: Session, where: AuditFilter, batch: int = 2000) -> Iterator[AuditEvent]:
    """The audit rows that match, in chain order (streamed in batches)."""
    conditions: list[Any] = []
    if where.subject is not None:
        subject = where.subject
        alternatives: list[Any] = []
        if subject.patient_key:
            alternatives.append(AuditEvent.patient_key == subject.patient_key)
        if subject.study_keys:
            alternatives.append(AuditEvent.study_key.in_(subject.study_keys))
        if subject.request_ids:
            alternatives.append(AuditEvent.request_id.in_(subject.request_ids))
        conditions.append(or_(*alternatives) if alternatives else AuditEvent.id.is_(None))
    if where.project:
        conditions.append(AuditEvent.project == where.project)
    if where.since is not None:
        conditions.append(AuditEvent.occurred_at >= where.since)
    if where.until is not None:
        conditions.append(AuditEvent.occurred_at < where.until)
    if where.event_types:
        conditions.append(AuditEvent.event_type.in_(where.event_types))
    last = 0
    while True:
        rows = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.seq > last, *conditions)
            .order_by(AuditEvent.seq)
            .limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq or last


def event_record(row: AuditEvent) -> dict[str, Any]:
    """One audit row as plain data (``--json``/``--csv``)."""
    return {
        "seq": row.seq,
        "occurred_at": row.occurred_at.isoformat(),
        "event": row.event_type.value,
        **{name: getattr(row, name) for name in PLAIN_FIELDS},
    }


def _value(value: Any) -> str:
    if isinstance(value, str) and value and " " not in value:
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def event_line(row: AuditEvent) -> str:
    """One audit row as the line an auditor reads."""
    parts = [
        f"#{row.seq}",
        row.occurred_at.strftime("%Y-%m-%d %H:%M:%SZ"),
        row.event_type.value,
        f"by {row.actor}",
    ]
    if row.project:
        parts.append(f"project={row.project}")
    if row.request_id is not None:
        parts.append(f"request={row.request_id}")
    if row.study_key:
        parts.append(f"study={row.study_key[:12]}")
    if row.patient_key:
        parts.append(f"patient={row.patient_key[:12]}")
    parts.extend(f"{key}={_value(value)}" for key, value in sorted(row.details.items()))
    return "  ".join(parts)


# -- the subject report ----------------------------------------------------------------------


@dataclass
class DestinationReport:
    destination: str
    acknowledged: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    last_at: datetime | None = None
    verified: bool | None = None
    new_series_uids: set[str] = field(default_factory=set)


@dataclass
class RequestReport:
    request_id: int
    project: str | None = None
    pseudonym: str | None = None
    event: str | None = None
    source: str | None = None
    requested_by: str | None = None
    requested_at: datetime | None = None
    status: str | None = None
    study_key: str | None = None
    original_study_uid: str | None = None
    new_study_uid: str | None = None
    deidentified_at: datetime | None = None
    profile: str | None = None
    destinations: dict[str, DestinationReport] = field(default_factory=dict)

    @property
    def received(self) -> bool:
        """Did any destination acknowledge data of this request?"""
        return any(d.acknowledged for d in self.destinations.values())


@dataclass
class StudyReport:
    study_key: str
    original_study_uid: str | None = None
    received_at: datetime | None = None
    sender: str | None = None
    instances: int | None = None
    held: bool = False
    """The originals are still in FIONA's spool."""


@dataclass
class SubjectReport:
    subject: Subject
    studies: dict[str, StudyReport] = field(default_factory=dict)
    requests: dict[int, RequestReport] = field(default_factory=dict)
    forgotten: list[datetime] = field(default_factory=list)

    def projects(self) -> list[str]:
        """The projects that received this subject's data (acknowledged by a destination)."""
        return sorted({r.project for r in self.requests.values() if r.received and r.project})


def subject_report(session: Session, node_key: bytes, subject: Subject) -> SubjectReport:
    """Which projects received the subject's data, when, under which pseudonym, where."""
    report = SubjectReport(subject)
    uid_of_key = {keyed_hash(node_key, uid): uid for uid in subject.study_uids}

    def study(key: str) -> StudyReport:
        return report.studies.setdefault(key, StudyReport(key, uid_of_key.get(key)))

    def request(row: AuditEvent) -> RequestReport:
        assert row.request_id is not None
        entry = report.requests.setdefault(row.request_id, RequestReport(row.request_id))
        entry.project = entry.project or row.project
        entry.study_key = entry.study_key or row.study_key
        return entry

    for row in select_events(session, AuditFilter(subject=subject)):
        details, kind = row.details, row.event_type
        if kind == AuditEventType.SUBJECT_FORGOTTEN:
            report.forgotten.append(row.occurred_at)
        if row.study_key and row.study_key in subject.study_keys:
            entry = study(row.study_key)
            if kind == AuditEventType.STUDY_RECEIVED and entry.received_at is None:
                entry.received_at, entry.sender = row.occurred_at, row.actor
            elif kind == AuditEventType.STUDY_STABLE:
                entry.instances = details.get("instances")
        if row.request_id is None:
            continue
        req = request(row)
        if kind == AuditEventType.REQUEST_CREATED:
            req.pseudonym = req.pseudonym or details.get("pseudonym")
            req.event, req.source = details.get("event"), details.get("source")
            req.requested_by, req.requested_at = row.actor, row.occurred_at
            req.status = req.status or RequestStatus.NEW.value
        elif kind == AuditEventType.DEIDENTIFIED:
            req.pseudonym = details.get("pseudonym") or req.pseudonym
            req.new_study_uid = details.get("new_study_instance_uid") or req.new_study_uid
            req.deidentified_at = req.deidentified_at or row.occurred_at
            req.profile = f"{details.get('profile')} {details.get('profile_version') or ''}".strip()
        elif kind == AuditEventType.DELIVERED:
            dest = req.destinations.setdefault(
                details["destination"], DestinationReport(details["destination"])
            )
            dest.acknowledged += int(details.get("instances", 0))
            for status, count in (details.get("statuses") or {}).items():
                dest.statuses[status] = dest.statuses.get(status, 0) + int(count)
            dest.last_at = row.occurred_at
            if details.get("new_series_instance_uid"):
                dest.new_series_uids.add(details["new_series_instance_uid"])
        elif kind == AuditEventType.DELIVERY_VERIFIED:
            dest = req.destinations.setdefault(
                details["destination"], DestinationReport(details["destination"])
            )
            dest.verified = bool(details.get("ok"))
        elif kind == AuditEventType.REQUEST_COMPLETED:
            req.status = details.get("status", req.status)
        elif kind in (
            AuditEventType.REQUEST_CANCELLED,
            AuditEventType.REQUEST_HELD,
            AuditEventType.REQUEST_FAILED,
        ):
            req.status = {
                AuditEventType.REQUEST_CANCELLED: RequestStatus.CANCELLED,
                AuditEventType.REQUEST_HELD: RequestStatus.HELD,
                AuditEventType.REQUEST_FAILED: RequestStatus.FAILED,
            }[kind].value
    _add_protected_tables(session, report)
    return report


def _add_protected_tables(session: Session, report: SubjectReport) -> None:
    """What the request table, the index and the ledger still hold about the subject."""
    ids = set(report.requests) | report.subject.request_ids
    if ids:
        for stored in session.scalars(select(TransferRequest).where(TransferRequest.id.in_(ids))):
            req = report.requests.setdefault(stored.id, RequestReport(stored.id))
            req.project = stored.transfer_project_name
            req.pseudonym = stored.transfer_name  # the table has it even where audit withheld it
            req.event = stored.transfer_event_name
            req.source = req.source or stored.source
            req.requested_by = req.requested_by or stored.requested_by
            req.requested_at = req.requested_at or stored.transfer_requested_date
            req.status = stored.status.value
            req.original_study_uid = stored.study_instance_uid
            req.new_study_uid = stored.transfer_mapped_uid or req.new_study_uid
        ledger = session.execute(
            select(Delivery.request_id, Delivery.destination, Delivery.new_series_instance_uid)
            .where(Delivery.request_id.in_(ids), Delivery.state == DeliveryState.DELIVERED)
            .distinct()
        ).all()
        for request_id, destination, series_uid in ledger:
            dest = report.requests[request_id].destinations.setdefault(
                destination, DestinationReport(destination)
            )
            dest.new_series_uids.add(series_uid)
    if report.subject.study_uids:
        for uid, instances in session.execute(
            select(Study.study_instance_uid, Study.instance_count).where(
                Study.study_instance_uid.in_(report.subject.study_uids)
            )
        ):
            entry = next(
                (s for s in report.studies.values() if s.original_study_uid == uid), None
            ) or report.studies.setdefault(uid, StudyReport(uid, uid))
            entry.held = True
            entry.instances = entry.instances if entry.instances is not None else instances


# -- forgetting ------------------------------------------------------------------------------


class ForgetRefusedError(Exception):
    """The subject cannot be forgotten now (the message says why and what to do)."""


@dataclass(frozen=True)
class ForgetResult:
    studies: int
    instances: int
    requests: int


def forget_subject(
    session_factory: sessionmaker[Session],
    storage: Path,
    node_key: bytes,
    subject: Subject,
    actor: str,
    now: datetime,
) -> ForgetResult:
    """Remove the subject's originals from FIONA (spool files and index rows), keep the trail.

    Requests keep their project, pseudonym, new StudyInstanceUID and status; their link to
    the original study (StudyInstanceUID, AccessionNumber, PatientID) is cleared. Delivery
    ledger rows, prepared files and the outgoing quarantine of those requests go (the
    ``DELIVERED`` audit rows remain). Refused while a request of the subject may still send
    (new, waiting, processing, held): cancel it first.
    """
    from fiona.forwarder.prepared import PreparedFiles

    with session_factory() as session, session.begin():
        open_requests = session.scalars(
            select(TransferRequest.id).where(
                TransferRequest.id.in_(subject.request_ids),
                TransferRequest.status.in_(OPEN_STATUSES),
            )
        ).all()
        if open_requests:
            listed = ", ".join(str(i) for i in sorted(open_requests))
            raise ForgetRefusedError(
                f"requests {listed} are still open: cancel them first "
                "(fiona request cancel ID), then forget"
            )
        studies = session.execute(
            select(Study.id, Study.study_instance_uid, Study.accession_key).where(
                Study.study_instance_uid.in_(subject.study_uids)
            )
        ).all()
        study_ids = [row.id for row in studies]
        instances = session.scalar(
            select(func.count()).select_from(Instance).where(Instance.study_id.in_(study_ids))
        )
        session.execute(delete(Delivery).where(Delivery.request_id.in_(subject.request_ids)))
        session.execute(
            update(TransferRequest)
            .where(TransferRequest.id.in_(subject.request_ids))
            .values(
                study_instance_uid=None,
                accession_number=None,
                patient_id=None,
                study_date=None,
                study_id=None,
                updated_at=now,
            )
        )
        accession_keys = [row.accession_key for row in studies if row.accession_key]
        uids = [row.study_instance_uid for row in studies]
        session.execute(
            delete(CouplingEntry).where(
                or_(
                    CouplingEntry.accession_key.in_(accession_keys),
                    CouplingEntry.study_instance_uid.in_(uids),
                )
            )
        )
        session.execute(delete(Instance).where(Instance.study_id.in_(study_ids)))
        session.execute(delete(Series).where(Series.study_id.in_(study_ids)))
        session.execute(delete(Study).where(Study.id.in_(study_ids)))
        session.add(
            audit_event(
                AuditEventType.SUBJECT_FORGOTTEN,
                actor=actor,
                occurred_at=now,
                patient_key=subject.patient_key,
                study_key=next(iter(subject.study_keys)) if len(subject.study_keys) == 1 else None,
                studies=sorted(subject.study_keys),
                requests=sorted(subject.request_ids),
                instances_removed=instances or 0,
            )
        )
        # The files go inside the transaction: if removing them fails, the rows stay.
        _remove_folders(storage / "incoming" / uid for uid in uids)
    prepared = PreparedFiles(storage)
    for request_id in subject.request_ids:
        prepared.discard_request(request_id)
        # De-identified bytes a destination refused, kept for an operator: the subject's too.
        shutil.rmtree(prepared.outgoing / str(request_id), ignore_errors=True)
    return ForgetResult(len(study_ids), instances or 0, len(subject.request_ids))


def _remove_folders(folders: Iterable[Path]) -> None:
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder)

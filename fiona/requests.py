"""Transfer requests: study → project, pseudonym, event.

A request names a study by its original StudyInstanceUID. :func:`activate_requests` moves
``new`` and ``waiting-for-data`` requests on. A request FIONA may not act on is **held** with
the reason (status ``held``, flag ``held``, an audit row): its project is not configured, not
active, has no destinations, is outside its approval window, or the pseudonym does not match
the project's pattern. An operator fixes the cause and retries it (:func:`retry_request`).
A study not received yet waits; once its first instance is in
(with ``forwarding.stream_while_receiving``, the default; otherwise once it is stable) the
request goes to ``processing``, where the forwarder prepares and delivers instances as they
arrive, and completes it when the study is stable. A request that was ``sent`` or
``partial`` goes back to ``processing`` when its study receives late instances — only the new
instances are then sent.

Operator actions (``fiona request …``): :func:`retry_request`, :func:`cancel_request`,
:func:`resend_request` and :func:`import_requests` (CSV); each is an audit event naming who.
A request may name its study by AccessionNumber, or by PatientID and StudyDate, instead of
its UID: received studies keep keyed hashes of both (never the values), the request is matched
when the study's first instance is in, and more than one match holds the request — FIONA never
guesses. :mod:`fiona.redcap` fills this table from a REDCap project (``requests.source:
redcap``); issue 6 adds the router that creates requests automatically.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Exists, exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.config import FionaConfig
from fiona.db import (
    AuditEventType,
    Delivery,
    Instance,
    RequestStatus,
    Study,
    StudyState,
    TransferRequest,
)
from fiona.keys import keyed_hash

__all__ = [
    "CSV_FIELDS",
    "RequestError",
    "activate_requests",
    "cancel_request",
    "create_request",
    "entry_problems",
    "fail_request",
    "hold_reason",
    "hold_request",
    "import_requests",
    "parse_requests_csv",
    "project_hold_reason",
    "read_csv",
    "record_change",
    "resend_request",
    "restart_request",
    "retry_request",
    "study_key",
]

_OPEN = (RequestStatus.NEW, RequestStatus.WAITING_FOR_DATA)
_DONE = (RequestStatus.SENT, RequestStatus.PARTIAL)
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def create_request(
    session: Session,
    *,
    study_instance_uid: str | None = None,
    project: str,
    pseudonym: str,
    requested_by: str,
    now: datetime,
    node_key: bytes,
    event: str = "",
    site: str | None = None,
    date_offset_days: int | None = None,
    source: str = "table",
    accession_number: str | None = None,
    patient_id: str | None = None,
    study_date: str | None = None,
    audit_pseudonym: bool = True,
) -> TransferRequest:
    """Add a ``new`` request (and its audit event) to *session*.

    ``audit_pseudonym=False`` keeps the pseudonym out of the audit row (the router's, when it
    took an incoming PatientID that does not fit the project's pattern: it may be a real one).

    The study is named by its StudyInstanceUID, or by AccessionNumber, or by PatientID and
    StudyDate (found when its first instance arrives; see :func:`activate_requests`).
    """
    request = TransferRequest(
        study_instance_uid=study_instance_uid or None,
        accession_number=accession_number or None,
        patient_id=patient_id or None,
        study_date=study_date or None,
        transfer_project_name=project,
        transfer_name=pseudonym,
        transfer_event_name=event,
        transfer_site=site,
        transfer_date_offset_days=date_offset_days,
        transfer_requested_date=now,
        requested_by=requested_by,
        status=RequestStatus.NEW,
        source=source,
        created_at=now,
        updated_at=now,
    )
    session.add(request)
    session.flush()
    session.add(
        audit_event(
            AuditEventType.REQUEST_CREATED,
            actor=requested_by,
            occurred_at=now,
            project=project,
            request_id=request.id,
            study_key=study_key(node_key, request),
            patient_key=keyed_hash(node_key, request.patient_id) if request.patient_id else None,
            named_by=_named_by(request),
            pseudonym=pseudonym if audit_pseudonym else "(withheld: not a valid pseudonym)",
            event=event,
            source=source,
        )
    )
    return request


def _named_by(request: TransferRequest) -> str:
    if request.study_instance_uid:
        return "study-uid"
    return "accession" if request.accession_number else "patient-and-date"


def _find_study(
    session: Session, request: TransferRequest, node_key: bytes
) -> tuple[Study | None, str | None]:
    """The received study a request names (None: not here yet), or why it is ambiguous."""
    if request.study_instance_uid:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == request.study_instance_uid)
        ).one_or_none()
        return study, None
    if request.accession_number:
        query = select(Study).where(
            Study.accession_key == keyed_hash(node_key, request.accession_number)
        )
        what = "AccessionNumber"
    elif request.patient_id and request.study_date:
        query = select(Study).where(
            Study.patient_key == keyed_hash(node_key, request.patient_id),
            Study.study_date == request.study_date,
        )
        what = "PatientID and StudyDate"
    else:
        return None, (
            "the request names no study (StudyInstanceUID, AccessionNumber, or PatientID and "
            "StudyDate)"
        )
    found = session.scalars(query.limit(2)).all()
    if len(found) > 1:
        return None, f"more than one received study has this {what}: name it by its UID"
    return (found[0] if found else None), None


def study_key(node_key: bytes, request: TransferRequest) -> str | None:
    """The keyed hash that names a request's study in audit rows (never the UID itself)."""
    if not request.study_instance_uid:
        return None
    return keyed_hash(node_key, request.study_instance_uid)


def fail_request(
    session: Session, request: TransferRequest, now: datetime, flag: str, reason: str
) -> None:
    """Mark *request* ``failed`` with an error flag and the reason, and audit it."""
    _stop(session, request, now, RequestStatus.FAILED, flag, reason)


def hold_request(session: Session, request: TransferRequest, now: datetime, reason: str) -> None:
    """Mark *request* ``held`` with the reason (it waits for an operator), and audit it."""
    _stop(session, request, now, RequestStatus.HELD, "held", reason)


def _stop(
    session: Session,
    request: TransferRequest,
    now: datetime,
    status: RequestStatus,
    flag: str,
    reason: str,
) -> None:
    request.status = status
    request.transfer_error = flag
    request.transfer_error_message = reason
    request.updated_at = now
    event = (
        AuditEventType.REQUEST_HELD
        if status == RequestStatus.HELD
        else AuditEventType.REQUEST_FAILED
    )
    session.add(
        audit_event(
            event,
            actor="fiona",
            occurred_at=now,
            project=request.transfer_project_name,
            request_id=request.id,
            reason=reason,
        )
    )


def hold_reason(config: FionaConfig, request: TransferRequest, today: date) -> str | None:
    """Why FIONA may not act on *request* (None: it may)."""
    return project_hold_reason(config, request.transfer_project_name, request.transfer_name, today)


def project_hold_reason(config: FionaConfig, name: str, pseudonym: str, today: date) -> str | None:
    """Why data of project *name* (its id or number) under *pseudonym* would be held today."""
    project = config.projects.get(config.project_id(name) or name)
    if project is None:
        return f"project {name!r} is not configured"
    if not project.active:
        return f"project {name} is not active"
    if not project.destinations:
        return f"project {name} has no destinations"
    approval = project.approval
    if approval is not None and not approval.covers(today):
        window = f"{approval.start or '…'} to {approval.end or '…'}"
        reference = f" ({approval.reference})" if approval.reference else ""
        return f"project {name} is outside its approval window{reference}: {window}"
    return project.pseudonym_problem(pseudonym)


LATE_WINDOW = timedelta(minutes=5)
"""How long after a request completed its study is checked for instances it did not send
(longer than an instance's stamp can precede its index commit)."""


def _unsent_instance() -> Exists:
    """Whether the request's study holds an instance it has no ledger row for, or one
    prepared from an older version (same SOP Instance UID, other bytes)."""
    current = exists().where(
        Delivery.request_id == TransferRequest.id,
        Delivery.instance_id == Instance.id,
        Delivery.source_digest.is_(None) | (Delivery.source_digest == Instance.digest),
    )
    return exists().where(
        Instance.study_id == TransferRequest.study_id,
        Instance.file_missing.is_(False),
        ~current,
    )


def activate_requests(
    session_factory: sessionmaker[Session], config: FionaConfig, node_key: bytes, now: datetime
) -> list[int]:
    """Advance open requests; return the ids that are now ``processing``."""
    ready: list[int] = []
    stream = config.forwarding.stream_while_receiving
    with session_factory() as session, session.begin():
        open_requests = select(TransferRequest).where(TransferRequest.status.in_(_OPEN))
        # Late instances: a sent request whose study received instances (new ones, or new
        # versions of sent ones) after it was sent (and, unless streaming, became stable
        # again). Only those are prepared and sent. Selected in SQL: sent requests pile up
        # over the years. An instance is stamped just before its index commit, so one
        # committed just after a request completed can carry an earlier stamp: requests
        # completed lately are checked whatever the stamps say — if their study was re-opened
        # (such an instance re-opens it; most studies never are, which keeps this cheap).
        recent = (TransferRequest.transfer_date > now - LATE_WINDOW) & (Study.reopened_count > 0)
        late = (
            select(TransferRequest)
            .join(Study, Study.id == TransferRequest.study_id)
            .where(
                TransferRequest.status.in_(_DONE),
                TransferRequest.transfer_date.is_not(None),
                ((Study.last_received_at > TransferRequest.transfer_date) | recent)
                if stream
                else (
                    (Study.state == StudyState.STABLE)
                    & ((Study.stable_at > TransferRequest.transfer_date) | recent)
                ),
                _unsent_instance(),
            )
        )
        if session.get_bind().dialect.name == "postgresql":
            # Several FIONA processes on one database: each request is moved on by one.
            open_requests = open_requests.with_for_update(skip_locked=True)
            late = late.with_for_update(of=TransferRequest, skip_locked=True)
        for request in session.scalars(late).all():
            request.status = RequestStatus.PROCESSING
            request.updated_at = now
            ready.append(request.id)
        for request in session.scalars(open_requests).all():
            project_id = config.project_id(request.transfer_project_name)
            if project_id is not None and project_id != request.transfer_project_name:
                request.transfer_project_name = project_id  # named by its number
            reason = hold_reason(config, request, now.date())
            if reason is not None:
                hold_request(session, request, now, reason)
                continue
            study, ambiguous = _find_study(session, request, node_key)
            if ambiguous is not None:
                hold_request(session, request, now, ambiguous)
                continue
            if study is not None and not request.study_instance_uid:
                request.study_instance_uid = study.study_instance_uid  # found by its keys
            if study is None or (study.state != StudyState.STABLE and not stream):
                if request.status != RequestStatus.WAITING_FOR_DATA:
                    request.status = RequestStatus.WAITING_FOR_DATA
                    request.updated_at = now
                continue
            request.study_id = study.id
            request.status = RequestStatus.PROCESSING
            request.updated_at = now
            ready.append(request.id)
    return ready


# -- operator actions ------------------------------------------------------------------------


class RequestError(Exception):
    """An operator action that cannot be done (unknown request, wrong status): the message
    says why."""


def record_change(
    session: Session,
    request: TransferRequest,
    now: datetime,
    actor: str,
    action: str,
    **details: Any,
) -> None:
    """Audit a change of *request* by *actor* (``cancel`` is its own event type)."""
    cancelled = action == "cancel"
    session.add(
        audit_event(
            AuditEventType.REQUEST_CANCELLED if cancelled else AuditEventType.REQUEST_CHANGED,
            actor=actor,
            occurred_at=now,
            project=request.transfer_project_name,
            request_id=request.id,
            action=action,
            **details,
        )
    )


def restart_request(
    session: Session,
    request: TransferRequest,
    now: datetime,
    actor: str,
    status: RequestStatus,
    action: str,
    **details: Any,
) -> None:
    """Put *request* back to *status* with its errors cleared, and audit who did it and why."""
    previous = request.status
    request.status = status
    request.transfer_error = None
    request.transfer_error_message = None
    request.updated_at = now
    record_change(session, request, now, actor, action, previous=previous.value, **details)


def _get(session: Session, request_id: int) -> TransferRequest:
    request = session.get(TransferRequest, request_id)
    if request is None:
        raise RequestError(f"no transfer request {request_id}")
    return request


def retry_request(
    session_factory: sessionmaker[Session],
    request_id: int,
    now: datetime,
    actor: str,
    storage: Path,
) -> str:
    """Try a held, failed or partial request again after the cause was fixed; says what.

    The request's refused instances leave the outgoing quarantine (``storage``): they are
    being sent again.
    """
    from fiona.forwarder.prepared import PreparedFiles

    message = _retry(session_factory, request_id, now, actor)
    released = PreparedFiles(storage).release_quarantine(request_id)
    if released:
        message += f"\n{released} refused instances released from the outgoing quarantine"
    return message


def _retry(
    session_factory: sessionmaker[Session], request_id: int, now: datetime, actor: str
) -> str:
    from fiona.forwarder.ledger import retry_failed

    with session_factory() as session, session.begin():
        request = _get(session, request_id)
        status = request.status
        if status in (RequestStatus.HELD, RequestStatus.FAILED) and request.study_id is None:
            # Never got as far as the ledger: validate and look for the study again.
            restart_request(session, request, now, actor, RequestStatus.NEW, "retry")
            return f"request {request_id}: {status.value} → new (checked again at the next poll)"
        if status not in (RequestStatus.FAILED, RequestStatus.PARTIAL, RequestStatus.HELD):
            raise RequestError(f"request {request_id} is {status.value}: nothing to retry")
    count = retry_failed(session_factory, request_id, now, actor)
    if count:
        return f"request {request_id}: {count} failed deliveries are due again"
    with session_factory() as session, session.begin():
        # Failed before any delivery row existed (e.g. the profile could not be loaded).
        restart_request(
            session, _get(session, request_id), now, actor, RequestStatus.PROCESSING, "retry"
        )
    return f"request {request_id}: {status.value} → processing (prepared again)"


def cancel_request(
    session_factory: sessionmaker[Session], request_id: int, now: datetime, actor: str
) -> str:
    """Stop a request: nothing more is sent (a batch already on the wire finishes)."""
    from fiona.db import Delivery, DeliveryState

    with session_factory() as session, session.begin():
        request = _get(session, request_id)
        if request.status in (RequestStatus.CANCELLED, RequestStatus.SENT):
            raise RequestError(f"request {request_id} is {request.status.value}: cannot cancel")
        previous = request.status
        request.status = RequestStatus.CANCELLED
        request.updated_at = now
        dropped = session.execute(
            update(Delivery)
            .where(Delivery.request_id == request_id, Delivery.state == DeliveryState.PENDING)
            .values(
                state=DeliveryState.FAILED,
                last_error_class="cancelled",
                last_error=f"request cancelled by {actor}",
                updated_at=now,
            )
        )
        count = int(getattr(dropped, "rowcount", 0) or 0)
        record_change(
            session, request, now, actor, "cancel", previous=previous.value, dropped=count
        )
    return f"request {request_id}: cancelled ({count} pending deliveries dropped)"


def resend_request(
    session_factory: sessionmaker[Session], request_id: int, now: datetime, actor: str,
    node_key: bytes,
) -> tuple[int, str]:  # fmt: skip
    """Send a request's study again from scratch (e.g. after a profile fix): a new request
    with the same study, project, pseudonym and event; the old one keeps its ledger."""
    with session_factory() as session, session.begin():
        old = _get(session, request_id)
        if not old.study_instance_uid:
            raise RequestError(f"request {request_id} has not found its study yet")
        new = create_request(
            session,
            study_instance_uid=old.study_instance_uid,
            project=old.transfer_project_name,
            pseudonym=old.transfer_name,
            requested_by=actor,
            now=now,
            node_key=node_key,
            event=old.transfer_event_name,
            site=old.transfer_site,
            date_offset_days=old.transfer_date_offset_days,
            source=f"resend of {old.id}",
        )
        record_change(session, old, now, actor, "resend", resent_as=new.id)
        return new.id, f"request {request_id}: sent again as request {new.id}"


CSV_FIELDS = (
    "transfer_project_name",
    "transfer_name",
    "study_instance_uid",
    "accession_number",
    "patient_id",
    "study_date",
    "transfer_event_name",
    "transfer_site",
    "transfer_date_offset_days",
)
"""Columns of ``fiona request import``: project and pseudonym are required; each row names its
study by ``study_instance_uid``, ``accession_number``, or ``patient_id`` + ``study_date``."""
_REQUIRED = CSV_FIELDS[:2]


def entry_problems(
    config: FionaConfig,
    study_uid: str,
    project: str,
    accession: str = "",
    patient_id: str = "",
    study_date: str = "",
) -> list[str]:
    """What makes a new request unacceptable at entry (a bad pseudonym only holds it later)."""
    problems = []
    ways = [bool(study_uid), bool(accession), bool(patient_id or study_date)]
    if sum(ways) != 1:
        problems.append(
            "name the study one way: its StudyInstanceUID, its AccessionNumber, or the "
            "PatientID and StudyDate"
        )
    elif (patient_id or study_date) and not (patient_id and study_date):
        problems.append("PatientID and StudyDate go together")
    if study_date and not re.fullmatch(r"\d{8}", study_date):
        problems.append("study_date is not YYYYMMDD")
    if study_uid and not _UID.fullmatch(study_uid):
        problems.append("study_instance_uid is not a valid UID")
    if project and config.project_id(project) is None:
        problems.append(f"project {project!r} is not configured")
    return problems


def read_csv(
    text: str, known: Sequence[str], required: Sequence[Sequence[str]]
) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """The non-empty rows of a CSV (line number, stripped values), or why its header is wrong.

    *required* lists the columns that must be there, each as its alternatives (one suffices).
    """
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [
        " or ".join(alternatives)
        for alternatives in required
        if not any(name in header for name in alternatives)
    ]
    unknown = [name for name in header if name not in known]
    if missing or unknown:
        problems = [f"missing columns: {', '.join(missing)}"] if missing else []
        if unknown:
            problems.append(f"unknown columns: {', '.join(unknown)}")
        return [], problems
    rows = []
    for line, raw in enumerate(reader, start=2):
        row = {key.strip(): (value or "").strip() for key, value in raw.items() if key}
        if any(row.values()):
            rows.append((line, row))
    return rows, []


def parse_requests_csv(text: str, config: FionaConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a request CSV, and every problem found (line numbers included)."""
    lines, problems = read_csv(text, CSV_FIELDS, [(name,) for name in _REQUIRED])
    rows: list[dict[str, Any]] = []
    for line, row in lines:
        for name in _REQUIRED:
            if not row.get(name):
                problems.append(f"line {line}: {name} is empty")
        found = entry_problems(
            config,
            row.get("study_instance_uid", ""),
            row.get("transfer_project_name", ""),
            row.get("accession_number", ""),
            row.get("patient_id", ""),
            row.get("study_date", ""),
        )
        problems += [f"line {line}: {p}" for p in found]
        offset: int | None = None
        if row.get("transfer_date_offset_days"):
            try:
                offset = int(row["transfer_date_offset_days"])
            except ValueError:
                problems.append(f"line {line}: transfer_date_offset_days is not a whole number")
        rows.append(
            {
                "study_instance_uid": row.get("study_instance_uid") or None,
                "accession_number": row.get("accession_number") or None,
                "patient_id": row.get("patient_id") or None,
                "study_date": row.get("study_date") or None,
                "project": row.get("transfer_project_name", ""),
                "pseudonym": row.get("transfer_name", ""),
                "event": row.get("transfer_event_name", ""),
                "site": row.get("transfer_site") or None,
                "date_offset_days": offset,
            }
        )
    if not lines and not problems:
        problems.append("no requests in the file")
    return rows, problems


def import_requests(
    session_factory: sessionmaker[Session], rows: list[dict[str, Any]], now: datetime,
    actor: str, node_key: bytes,
) -> list[int]:  # fmt: skip
    """Add every row as a ``new`` request in one transaction (all or nothing)."""
    with session_factory() as session, session.begin():
        return [
            create_request(
                session, requested_by=actor, now=now, node_key=node_key, source="csv", **row
            ).id
            for row in rows
        ]

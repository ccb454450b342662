"""Transfer requests: study → project, pseudonym, event (the minimal core the forwarder needs).

A request names a study by its original StudyInstanceUID. :func:`activate_requests` moves
``new`` and ``waiting-for-data`` requests on: a project that does not exist or is inactive fails
the request with that reason; a study not received yet waits; once its first instance is in
(with ``forwarding.stream_while_receiving``, the default; otherwise once it is stable) the
request goes to ``processing``, where the forwarder prepares and delivers instances as they
arrive, and completes it when the study is stable. A request that was ``sent`` or
``partial`` goes back to ``processing`` when its study receives late instances — only the new
instances are then sent.

Issue 5 adds the poller of the REDCap-like table and of REDCap, naming a study by
AccessionNumber or PatientID + StudyDate, pseudonym patterns, approval windows and the
operator commands; issue 6 adds the router that creates requests automatically.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.config import FionaConfig
from fiona.db import AuditEventType, RequestStatus, Study, StudyState, TransferRequest
from fiona.keys import keyed_hash

__all__ = ["activate_requests", "create_request", "fail_request", "study_key"]

_OPEN = (RequestStatus.NEW, RequestStatus.WAITING_FOR_DATA)
_DONE = (RequestStatus.SENT, RequestStatus.PARTIAL)


def create_request(
    session: Session,
    *,
    study_instance_uid: str,
    project: str,
    pseudonym: str,
    requested_by: str,
    now: datetime,
    node_key: bytes,
    event: str = "",
    site: str | None = None,
    date_offset_days: int | None = None,
    source: str = "table",
) -> TransferRequest:
    """Add a ``new`` request (and its audit event) to *session*."""
    request = TransferRequest(
        study_instance_uid=study_instance_uid,
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
            study_key=keyed_hash(node_key, study_instance_uid),
            pseudonym=pseudonym,
            event=event,
            source=source,
        )
    )
    return request


def study_key(node_key: bytes, request: TransferRequest) -> str | None:
    """The keyed hash that names a request's study in audit rows (never the UID itself)."""
    if not request.study_instance_uid:
        return None
    return keyed_hash(node_key, request.study_instance_uid)


def fail_request(
    session: Session, request: TransferRequest, now: datetime, flag: str, reason: str
) -> None:
    """Mark *request* ``failed`` with an error flag and the reason, and audit it."""
    request.status = RequestStatus.FAILED
    request.transfer_error = flag
    request.transfer_error_message = reason
    request.updated_at = now
    session.add(
        audit_event(
            AuditEventType.REQUEST_FAILED,
            actor="fiona",
            occurred_at=now,
            project=request.transfer_project_name,
            request_id=request.id,
            reason=reason,
        )
    )


def activate_requests(
    session_factory: sessionmaker[Session], config: FionaConfig, node_key: bytes, now: datetime
) -> list[int]:
    """Advance open requests; return the ids that are now ``processing``."""
    ready: list[int] = []
    with session_factory() as session, session.begin():
        requests = session.scalars(
            select(TransferRequest).where(TransferRequest.status.in_(_OPEN + _DONE))
        ).all()
        for request in requests:
            study = None
            if request.study_instance_uid:
                study = session.scalars(
                    select(Study).where(Study.study_instance_uid == request.study_instance_uid)
                ).one_or_none()
            stream = config.forwarding.stream_while_receiving
            if request.status in _DONE:
                # Late instances: the study re-opened after the request was sent (and, unless
                # streaming, became stable again). Only instances without ledger rows will be
                # prepared and sent.
                if (
                    study is not None
                    and request.transfer_date is not None
                    and (
                        (stream and study.last_received_at > request.transfer_date)
                        or (
                            study.state == StudyState.STABLE
                            and study.stable_at is not None
                            and study.stable_at > request.transfer_date
                        )
                    )
                ):
                    request.status = RequestStatus.PROCESSING
                    request.updated_at = now
                    ready.append(request.id)
                continue
            project = config.projects.get(request.transfer_project_name)
            reason = None
            if project is None:
                reason = f"project {request.transfer_project_name!r} is not configured"
            elif not project.active:
                reason = f"project {request.transfer_project_name} is not active"
            elif not project.destinations:
                reason = f"project {request.transfer_project_name} has no destinations"
            if reason is not None:
                fail_request(session, request, now, "held", reason)
                continue
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

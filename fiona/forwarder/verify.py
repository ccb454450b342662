"""Delivery verification: does the destination hold what it acknowledged?

For a DICOM destination with ``verify: true``, once every delivery of a request to it is
settled (and again after a late series), FIONA asks it with a study-level C-FIND for the new
StudyInstanceUID how many instances it holds (Number of Study Related Instances; an
image-level C-FIND counts them when the destination does not fill that in) and compares that
with the instances FIONA delivered there for that study. Fewer than delivered is a
``verification`` error on the request, with the numbers; the check is an audit event either way.
"""

from __future__ import annotations

from datetime import datetime

import structlog
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.config import DicomDestination, FionaConfig
from fiona.db import (
    AuditEventType,
    Delivery,
    DeliveryCheck,
    DeliveryState,
    RequestStatus,
    TransferRequest,
)
from fiona.forwarder.senders import associate

__all__ = ["count_study_instances", "verify_deliveries"]

log = structlog.get_logger("fiona.forwarder")
_PENDING = (0xFF00, 0xFF01)


def count_study_instances(
    destination: DicomDestination, calling_ae_title: str, study_uid: str
) -> tuple[int | None, str | None]:
    """Instances of *study_uid* the destination holds (None and the reason if it cannot say)."""
    ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    timeout = min(destination.timeout, 30.0)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = associate(ae, destination)
    if not assoc.is_established:
        return None, "no association for C-FIND"
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        query.NumberOfStudyRelatedInstances = ""
        counts: list[int] = []
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = getattr(status, "Status", None)
            if code in _PENDING and identifier is not None:
                value = identifier.get("NumberOfStudyRelatedInstances")
                if value not in (None, ""):
                    counts.append(int(value))
                else:
                    counts.append(-1)
            elif code not in (0x0000, *_PENDING):
                return None, f"C-FIND status {code!r}"
        if not counts:
            return 0, None
        if counts[0] >= 0:
            return counts[0], None
        # The destination does not count for us: count the instances at image level.
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.SOPInstanceUID = ""
        seen: set[str] = set()
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if getattr(status, "Status", None) in _PENDING and identifier is not None:
                seen.add(str(identifier.get("SOPInstanceUID", "")))
        return len(seen), None
    finally:
        if assoc.is_established:
            assoc.release()


def _due(session: Session, config: FionaConfig) -> list[tuple[int, str, str, int]]:
    """(request, destination, new study UID, expected count) whose check is due."""
    due: list[tuple[int, str, str, int]] = []
    verifying = [
        name
        for name, dest in config.destinations.items()
        if isinstance(dest, DicomDestination) and dest.verify
    ]
    if not verifying:
        return due
    requests = session.scalars(
        select(TransferRequest).where(
            TransferRequest.status.in_((RequestStatus.SENT, RequestStatus.PARTIAL)),
            TransferRequest.transfer_mapped_uid.is_not(None),
        )
    ).all()
    for request in requests:
        for name in verifying:
            states = dict(
                session.execute(
                    select(Delivery.state, func.max(Delivery.acknowledged_at))
                    .where(Delivery.request_id == request.id, Delivery.destination == name)
                    .group_by(Delivery.state)
                ).all()
            )
            last_ack = states.get(DeliveryState.DELIVERED)
            if last_ack is None or DeliveryState.PENDING in states:
                continue
            if DeliveryState.IN_FLIGHT in states:
                continue
            checked = session.scalar(
                select(func.max(DeliveryCheck.checked_at)).where(
                    DeliveryCheck.request_id == request.id, DeliveryCheck.destination == name
                )
            )
            if checked is not None and checked >= last_ack:
                continue
            expected = session.scalar(
                select(func.count(func.distinct(Delivery.new_sop_instance_uid))).where(
                    Delivery.destination == name,
                    Delivery.state == DeliveryState.DELIVERED,
                    Delivery.new_study_instance_uid == request.transfer_mapped_uid,
                )
            )
            assert request.transfer_mapped_uid is not None
            due.append((request.id, name, request.transfer_mapped_uid, int(expected or 0)))
    return due


def verify_deliveries(
    session_factory: sessionmaker[Session], config: FionaConfig, now: datetime
) -> int:
    """Run every due check; return how many ran."""
    with session_factory() as session:
        due = _due(session, config)
    for request_id, name, study_uid, expected in due:
        destination = config.destinations[name]
        assert isinstance(destination, DicomDestination)
        found, error = count_study_instances(destination, config.node.ae_title, study_uid)
        ok = found is not None and found >= expected
        with session_factory() as session, session.begin():
            session.add(
                DeliveryCheck(
                    request_id=request_id,
                    destination=name,
                    checked_at=now,
                    expected=expected,
                    found=found,
                    ok=ok,
                    error=error,
                )
            )
            request = session.get(TransferRequest, request_id)
            assert request is not None
            flags = [f for f in (request.transfer_error or "").split(",") if f]
            if not ok:
                message = (
                    f"{name} holds {found} of the {expected} instances delivered"
                    if found is not None
                    else f"{name} could not be checked: {error}"
                )
                if "verification" not in flags:
                    flags.append("verification")
                request.transfer_error_message = message
            elif "verification" in flags:
                flags.remove("verification")
                request.transfer_error_message = None
            request.transfer_error = ",".join(flags) or None
            request.updated_at = now
            session.add(
                audit_event(
                    AuditEventType.DELIVERY_VERIFIED,
                    actor="fiona",
                    occurred_at=now,
                    project=request.transfer_project_name,
                    request_id=request_id,
                    destination=name,
                    new_study_instance_uid=study_uid,
                    expected=expected,
                    found=found,
                    ok=ok,
                    error=error,
                )
            )
        log.info("delivery verified", destination=name, expected=expected, found=found, ok=ok)
    return len(due)

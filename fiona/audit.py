"""Audit rows: the record of truth that auditors read (``fiona audit``, ``fiona report``).

Rows carry no PHI in clear: studies and patients are named by keyed hashes
(:func:`fiona.keys.keyed_hash`); the link original → pseudonym lives only in the protected
request table.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fiona.db.models import AuditEvent, AuditEventType

__all__ = ["Clock", "audit_event", "utcnow"]

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The default clock: timezone-aware UTC now."""
    return datetime.now(UTC)


def audit_event(
    event_type: AuditEventType,
    *,
    actor: str,
    occurred_at: datetime,
    study_key: str | None = None,
    project: str | None = None,
    request_id: int | None = None,
    patient_key: str | None = None,
    **details: Any,
) -> AuditEvent:
    """Build an audit row (not yet added to a session); it is sealed into the hash chain
    (:mod:`fiona.db.chain`) when its transaction commits."""
    return AuditEvent(
        occurred_at=occurred_at,
        event_type=event_type,
        actor=actor,
        study_key=study_key,
        project=project,
        request_id=request_id,
        patient_key=patient_key,
        details=details,
    )

"""Audit rows: the record of truth that auditors read (issue 7 chains and reports them).

Rows carry no PHI in clear: studies are named by a keyed hash (:func:`fiona.keys.keyed_hash`).
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
    **details: Any,
) -> AuditEvent:
    """Build an audit row (not yet added to a session)."""
    return AuditEvent(
        occurred_at=occurred_at,
        event_type=event_type,
        actor=actor,
        study_key=study_key,
        project=project,
        request_id=request_id,
        details=details,
    )

"""The receive quarantine as an operator handles it: list, release (after a repair), delete.

Bytes FIONA could not accept wait in ``<storage>/quarantine/<day>/<id>.dcm`` with a JSON
sidecar and a ``quarantined_files`` row. *Release* checks the file again the way a C-STORE is
checked (e.g. after it was repaired in place with ``dcmodify``, or after a FIONA fix) and, if it
passes now, ingests it exactly like a C-STORE from its original sender; if not, it stays, and
the reason is given. *Delete* removes it for good. Both are audit rows naming the operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.db import AuditEventType, QuarantinedFile
from fiona.scp.header import HeaderError, checked_header
from fiona.scp.importer import ingest_copy
from fiona.scp.ingest import Ingestor, ReceiveFacts
from fiona.scp.spool import Spool

__all__ = ["QuarantineError", "delete_quarantined", "list_quarantined", "release_quarantined"]


class QuarantineError(Exception):
    """The quarantined file cannot be released or deleted (the message says why)."""


@dataclass(frozen=True)
class Released:
    outcome: str
    study_instance_uid: str


def list_quarantined(session: Session, limit: int = 500) -> list[QuarantinedFile]:
    """The newest quarantined files first."""
    return list(
        session.scalars(
            select(QuarantinedFile).order_by(QuarantinedFile.quarantined_at.desc()).limit(limit)
        )
    )


def _entry(session: Session, entry_id: int) -> QuarantinedFile:
    entry = session.get(QuarantinedFile, entry_id)
    if entry is None:
        raise QuarantineError(f"no quarantined file {entry_id}")
    return entry


def _remove(spool: Spool, relative: str) -> None:
    path = spool.root / relative
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)


def release_quarantined(
    session_factory: sessionmaker[Session],
    ingestor: Ingestor,
    entry_id: int,
    actor: str,
    now: datetime,
) -> Released:
    """Ingest a quarantined file again, as from its original sender, if it passes now."""
    spool = ingestor.spool
    with session_factory() as session:
        entry = _entry(session, entry_id)
        relative = entry.path
        facts = ReceiveFacts(
            entry.calling_ae_title, entry.called_ae_title, entry.peer_address, f"release-{entry_id}"
        )
    source = spool.root / relative
    if not source.is_file():
        raise QuarantineError(f"quarantined file {entry_id}: {relative} is gone")
    try:
        header = checked_header(source)
    except HeaderError as exc:
        raise QuarantineError(f"still not acceptable: {exc}") from None
    result = ingest_copy(ingestor, source, facts)
    if not result.ok or result.outcome is None:
        raise QuarantineError(f"not stored: 0x{result.status:04X} {result.comment or ''}")
    with session_factory() as session, session.begin():
        session.delete(_entry(session, entry_id))
        session.add(
            audit_event(
                AuditEventType.QUARANTINE_RELEASED,
                actor=actor,
                occurred_at=now,
                quarantined_id=entry_id,
                path=relative,
                outcome=result.outcome.value,
            )
        )
    _remove(spool, relative)
    return Released(result.outcome.value, header.study_instance_uid)


def delete_quarantined(
    session_factory: sessionmaker[Session], spool: Spool, entry_id: int, actor: str, now: datetime
) -> None:
    """Remove a quarantined file, its sidecar and its row for good."""
    with session_factory() as session, session.begin():
        entry = _entry(session, entry_id)
        relative, reason = entry.path, entry.reason
        session.delete(entry)
        session.add(
            audit_event(
                AuditEventType.QUARANTINE_DELETED,
                actor=actor,
                occurred_at=now,
                quarantined_id=entry_id,
                path=relative,
                reason=reason,
            )
        )
        # The file goes inside the transaction: if removing it fails, the row stays.
        _remove(spool, relative)

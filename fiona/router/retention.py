"""Retention of unassigned studies: explicit, configured, audited, announced in advance.

FIONA never deletes received data on its own — not under disk pressure, not by default. With
``routing.unassigned_retention_days`` set, a study that no transfer request has ever named
(in any status) and that has received nothing for that many days is deleted from the spool and
the index, after a warning period:

* ``retention_warning_days`` before the end, an ``UNASSIGNED_EXPIRING`` audit row (and a log
  line) announces it; the deletion waits at least that long after the warning, even when the
  setting was only just turned on;
* the deletion removes the study's files and index rows and writes a ``RETENTION_DELETED``
  audit row (keyed study hash, instance count, age). The audit trail stays.

A study with a request — even a cancelled one — is never deleted here: someone decided about
it. :func:`apply_retention` runs hourly in ``fiona serve``'s primary process.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta

import structlog
from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.config import FionaConfig
from fiona.db import AuditEventType, Instance, Series, Study, StudyState, TransferRequest
from fiona.keys import keyed_hash
from fiona.scp.spool import Spool

__all__ = ["RetentionResult", "apply_retention"]

log = structlog.get_logger("fiona.retention")


class RetentionResult:
    def __init__(self) -> None:
        self.warned = 0
        self.deleted = 0


def apply_retention(
    session_factory: sessionmaker[Session],
    spool: Spool,
    config: FionaConfig,
    node_key: bytes,
    now: datetime,
) -> RetentionResult:
    """Warn about, then delete, unassigned studies past ``routing.unassigned_retention_days``."""
    result = RetentionResult()
    days = config.routing.unassigned_retention_days
    if days is None:
        return result
    keep = timedelta(days=days)
    warning = timedelta(days=config.routing.retention_warning_days)
    named = exists().where(TransferRequest.study_instance_uid == Study.study_instance_uid)
    with session_factory() as session, session.begin():
        to_warn = session.scalars(
            select(Study).where(
                Study.state == StudyState.STABLE,
                ~named,
                Study.retention_warned_at.is_(None),
                Study.last_received_at <= now - keep + warning,
            )
        ).all()
        for study in to_warn:
            study.retention_warned_at = now
            delete_after = max(study.last_received_at + keep, now + warning)
            session.add(
                audit_event(
                    AuditEventType.UNASSIGNED_EXPIRING,
                    actor="fiona",
                    occurred_at=now,
                    study_key=keyed_hash(node_key, study.study_instance_uid),
                    delete_after=delete_after.isoformat(),
                    retention_days=days,
                )
            )
        result.warned = len(to_warn)
    if result.warned:
        log.warning("unassigned studies will be deleted after the warning period",
                    studies=result.warned, retention_days=days)  # fmt: skip
    with session_factory() as session:
        due = session.scalars(
            select(Study.id).where(
                Study.state == StudyState.STABLE,
                ~named,
                Study.retention_warned_at <= now - warning,
                Study.last_received_at <= now - keep,
            )
        ).all()
    for study_id in due:
        if _delete(session_factory, spool, node_key, now, study_id, days):
            result.deleted += 1
    if result.deleted:
        log.warning("unassigned studies deleted by retention", studies=result.deleted,
                    retention_days=days)  # fmt: skip
    return result


def _delete(
    session_factory: sessionmaker[Session],
    spool: Spool,
    node_key: bytes,
    now: datetime,
    study_id: int,
    days: int,
) -> bool:
    with session_factory() as session, session.begin():
        query = select(Study).where(Study.id == study_id)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        study = session.scalars(query).one_or_none()
        if study is None:
            return False
        named = session.scalar(
            select(exists().where(TransferRequest.study_instance_uid == study.study_instance_uid))
        )
        if named or study.state != StudyState.STABLE:
            return False  # a request came, or new instances: keep it
        uid = study.study_instance_uid
        instances = study.instance_count
        paths = session.scalars(select(Instance.path).where(Instance.study_id == study_id)).all()
        series_uids = session.scalars(
            select(Series.series_instance_uid).where(Series.study_id == study_id)
        ).all()
        session.execute(delete(Instance).where(Instance.study_id == study_id))
        session.execute(delete(Series).where(Series.study_id == study_id))
        session.delete(study)
        session.add(
            audit_event(
                AuditEventType.RETENTION_DELETED,
                actor="fiona",
                occurred_at=now,
                study_key=keyed_hash(node_key, uid),
                instances=instances,
                retention_days=days,
                last_received_at=study.last_received_at.isoformat(),
            )
        )
        # The files go inside the transaction: if removing them fails, the rows stay. Only
        # the files of these rows: an instance of the study stored this very moment (its row
        # not committed yet) keeps its file, and its folders.
        for path in paths:
            (spool.root / path).unlink(missing_ok=True)
        for series_uid in series_uids:
            spool.series_metadata_path(uid, series_uid).unlink(missing_ok=True)
        folder = spool.incoming / uid
        for series_folder in (folder / series_uid for series_uid in series_uids):
            with contextlib.suppress(OSError):  # gone, or holds a newcomer
                series_folder.rmdir()
        with contextlib.suppress(OSError):
            folder.rmdir()
    return True

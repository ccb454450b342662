"""Study stability: a study (series) is STABLE once nothing arrived for N seconds.

(N plus the index writer's :data:`~fiona.scp.index.TOUCH_INTERVAL`, at most one second.)
Instance counts of a study and a series are taken when it becomes stable.

State and timestamps live in the database, so a restart resumes where it stopped: a sweep
after a restart simply finds what became stable meanwhile. When a series becomes stable
its metadata file ``incoming/<study>/<series>.json`` is written (FIONA convention); a
series whose file is missing (crash between the two steps) is written on the next sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.db.models import AuditEventType, Instance, Series, Study, StudyState
from fiona.keys import keyed_hash
from fiona.logs import get_logger
from fiona.scp.header import read_series_header
from fiona.scp.index import TOUCH_INTERVAL
from fiona.scp.spool import Spool, write_json_atomic

__all__ = ["SweepResult", "classify_series", "sweep"]

log = get_logger(__name__)

ClassifyHook = Callable[[dict[str, Any]], list[str]]


def classify_series(_header: dict[str, Any]) -> list[str]:
    """Classification hook for the series metadata (rules come with a later issue)."""
    return []


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did."""

    studies_stable: int
    series_stable: int
    metadata_written: int


def sweep(
    session_factory: sessionmaker[Session],
    spool: Spool,
    node_key: bytes,
    now: datetime,
    stable_after_seconds: float,
    classify: ClassifyHook = classify_series,
) -> SweepResult:
    """Mark quiet series and studies STABLE and write pending series metadata."""
    # The index writer may leave last_received_at up to TOUCH_INTERVAL stale.
    cutoff = now - timedelta(seconds=stable_after_seconds) - TOUCH_INTERVAL
    with session_factory() as session, session.begin():
        series_ids = session.scalars(
            update(Series)
            .where(Series.state == StudyState.RECEIVING, Series.last_received_at < cutoff)
            .values(
                state=StudyState.STABLE,
                stable_at=now,
                instance_count=select(func.count())
                .where(Instance.series_id == Series.id)
                .scalar_subquery(),
            )
            .returning(Series.id)
        ).all()
        studies = session.execute(
            update(Study)
            .where(Study.state == StudyState.RECEIVING, Study.last_received_at < cutoff)
            .values(
                state=StudyState.STABLE,
                stable_at=now,
                instance_count=select(func.count())
                .where(Instance.study_id == Study.id)
                .scalar_subquery(),
            )
            .returning(Study.id, Study.study_instance_uid, Study.instance_count)
        ).all()
        for study_id, study_uid, instance_count in studies:
            series_count = session.scalar(
                select(func.count()).select_from(Series).where(Series.study_id == study_id)
            )
            session.add(
                audit_event(
                    AuditEventType.STUDY_STABLE,
                    actor="fiona",
                    occurred_at=now,
                    study_key=keyed_hash(node_key, study_uid),
                    instances=instance_count,
                    series=series_count,
                )
            )
            log.info(
                "study stable",
                study_key=keyed_hash(node_key, study_uid),
                instances=instance_count,
                series=series_count,
            )
    written = 0
    with session_factory() as session:
        pending = session.execute(
            select(Series.id, Series.series_instance_uid, Study.study_instance_uid)
            .join(Study, Study.id == Series.study_id)
            .where(Series.state == StudyState.STABLE, Series.metadata_written_at.is_(None))
        ).all()
    for series_id, series_uid, study_uid in pending:
        if _write_series_metadata(
            session_factory, spool, series_id, study_uid, series_uid, now, classify
        ):
            written += 1
    return SweepResult(len(studies), len(series_ids), written)


def _write_series_metadata(
    session_factory: sessionmaker[Session],
    spool: Spool,
    series_id: int,
    study_uid: str,
    series_uid: str,
    now: datetime,
    classify: ClassifyHook,
) -> bool:
    with session_factory() as session:
        rows = session.execute(
            select(
                Instance.path,
                Instance.calling_ae_title,
                Instance.called_ae_title,
                Instance.peer_address,
                Instance.sop_class_uid,
            )
            .where(Instance.series_id == series_id, Instance.file_missing.is_(False))
            .order_by(Instance.id)
        ).all()
    if not rows:
        return False
    try:
        header = read_series_header(spool.root / rows[0].path)
    except Exception as exc:  # noqa: BLE001 - a bad file must not stop the sweeper
        log.warning("series metadata not written", error=type(exc).__name__)
        return False
    connections = sorted({(r.calling_ae_title, r.called_ae_title, r.peer_address) for r in rows})
    metadata = {
        **header,
        "NumFiles": len(rows),
        "SOPClassUIDs": sorted({r.sop_class_uid for r in rows}),
        "IncomingConnection": [
            {"CallingAETitle": c, "CalledAETitle": d, "PeerAddress": p} for c, d, p in connections
        ],
        "ClassifyType": classify(header),
        "StableAt": now.isoformat(),
    }
    write_json_atomic(spool.series_metadata_path(study_uid, series_uid), metadata)
    with session_factory() as session, session.begin():
        # Only if no instance arrived meanwhile (which re-opens the series).
        session.execute(
            update(Series)
            .where(Series.id == series_id, Series.state == StudyState.STABLE)
            .values(metadata_written_at=now)
        )
    return True

"""``fiona status``: what the node holds, as plain data."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from fiona.db.models import Instance, QuarantinedFile, Series, Study, StudyState
from fiona.scp.spool import Spool

__all__ = ["node_status"]


def node_status(session_factory: sessionmaker[Session], spool: Spool) -> dict[str, Any]:
    """Counts of instances, studies by state, quarantine and free disk."""
    with session_factory() as session:
        studies = dict(
            session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
        )
        series = dict(
            session.execute(select(Series.state, func.count()).group_by(Series.state)).all()
        )
        instances = session.scalar(select(func.count()).select_from(Instance)) or 0
        missing = (
            session.scalar(
                select(func.count()).select_from(Instance).where(Instance.file_missing.is_(True))
            )
            or 0
        )
        size = session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))) or 0
        quarantined = session.scalar(select(func.count()).select_from(QuarantinedFile)) or 0
    return {
        "instances": instances,
        "instances_missing_file": missing,
        "instance_bytes": int(size),
        "studies": {state.value: studies.get(state, 0) for state in StudyState},
        "series": {state.value: series.get(state, 0) for state in StudyState},
        "quarantined": quarantined,
        "storage": {
            "path": str(spool.root),
            "free_bytes": spool.free_bytes(),
            "min_free_bytes": spool.min_free_mb * 1024 * 1024,
        },
    }

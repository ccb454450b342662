"""``fiona status``: what the node holds, as plain data."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from fiona.db.models import (
    Delivery,
    DeliveryState,
    DestinationState,
    Instance,
    QuarantinedFile,
    RequestStatus,
    Series,
    Study,
    StudyState,
    TransferRequest,
)
from fiona.scp.spool import Spool

__all__ = ["destination_status", "node_status"]


def destination_status(
    session: Session, destinations: list[str] | tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """Per destination: deliveries by state, breaker, the oldest waiting delivery."""
    counts: dict[str, dict[str, int]] = {}
    for name, state, count in session.execute(
        select(Delivery.destination, Delivery.state, func.count()).group_by(
            Delivery.destination, Delivery.state
        )
    ):
        counts.setdefault(name, {})[state.value] = count
    oldest = dict(
        session.execute(
            select(Delivery.destination, func.min(Delivery.created_at))
            .where(Delivery.state.in_((DeliveryState.PENDING, DeliveryState.IN_FLIGHT)))
            .group_by(Delivery.destination)
        ).all()
    )
    breakers = {state.name: state for state in session.scalars(select(DestinationState))}
    report: dict[str, dict[str, Any]] = {}
    for name in sorted(set(destinations) | set(counts) | set(breakers)):
        by_state = counts.get(name, {})
        breaker = breakers.get(name)
        waiting = oldest.get(name)
        report[name] = {
            "queued": by_state.get(DeliveryState.PENDING.value, 0),
            "in_flight": by_state.get(DeliveryState.IN_FLIGHT.value, 0),
            "delivered": by_state.get(DeliveryState.DELIVERED.value, 0),
            "failed": by_state.get(DeliveryState.FAILED.value, 0),
            "breaker": "open" if breaker is not None and breaker.breaker_open else "closed",
            "breaker_last_error": breaker.last_error if breaker is not None else None,
            "oldest_waiting_since": waiting.isoformat() if waiting is not None else None,
        }
    return report


def node_status(
    session_factory: sessionmaker[Session],
    spool: Spool,
    destinations: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Counts of instances, studies by state, quarantine, free disk, requests, destinations."""
    with session_factory() as session:
        requests = dict(
            session.execute(
                select(TransferRequest.status, func.count()).group_by(TransferRequest.status)
            ).all()
        )
        forwarding = destination_status(session, destinations)
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
        "requests": {status.value: requests.get(status, 0) for status in RequestStatus},
        "destinations": forwarding,
        "storage": {
            "path": str(spool.root),
            "free_bytes": spool.free_bytes(),
            "min_free_bytes": spool.min_free_mb * 1024 * 1024,
        },
    }

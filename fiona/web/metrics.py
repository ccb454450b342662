"""``/metrics``: Prometheus text: counts from the database at each scrape, plus the
counters and histograms of :mod:`fiona.metrics` (all processes' under ``fiona serve``).

Counts and ages only: no UID, name or pseudonym is ever a label. Label values are FIONA's own
states, projects (configuration ids) and destination names.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select

from fiona.audit import utcnow
from fiona.db import (
    Delivery,
    DeliveryState,
    Instance,
    QuarantinedFile,
    Study,
    StudyState,
    TransferRequest,
)

if TYPE_CHECKING:
    from fiona.web.app import WebContext

__all__ = ["render_metrics"]


class _Collector:
    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def collect(self) -> Any:
        now = utcnow()
        with self.ctx.session_factory() as session:
            instances = session.scalar(select(func.count()).select_from(Instance)) or 0
            studies = dict(
                session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
            )
            requests = session.execute(
                select(
                    TransferRequest.transfer_project_name, TransferRequest.status, func.count()
                ).group_by(TransferRequest.transfer_project_name, TransferRequest.status)
            ).all()
            deliveries = session.execute(
                select(Delivery.destination, Delivery.state, func.count()).group_by(
                    Delivery.destination, Delivery.state
                )
            ).all()
            oldest = session.execute(
                select(Delivery.destination, func.min(Delivery.created_at))
                .where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.IN_FLIGHT]))
                .group_by(Delivery.destination)
            ).all()
            quarantined = session.scalar(select(func.count()).select_from(QuarantinedFile)) or 0
        yield GaugeMetricFamily("fiona_instances", "Instances held in the spool", value=instances)
        family = GaugeMetricFamily("fiona_studies", "Studies by state", labels=["state"])
        for state in StudyState:
            family.add_metric([state.value.lower()], studies.get(state, 0))
        yield family
        family = GaugeMetricFamily(
            "fiona_requests",
            "Transfer requests by project and status",
            labels=["project", "status"],
        )
        for project, status, count in requests:
            family.add_metric([project, status.value], count)
        yield family
        family = GaugeMetricFamily(
            "fiona_deliveries",
            "Delivery ledger rows by destination and state",
            labels=["destination", "state"],
        )
        for destination, delivery_state, count in deliveries:
            family.add_metric([destination, delivery_state.value.lower()], count)
        yield family
        family = GaugeMetricFamily(
            "fiona_oldest_waiting_delivery_seconds",
            "Age of the oldest delivery not yet acknowledged, per destination",
            labels=["destination"],
        )
        for destination, created in oldest:
            if created is not None:
                age = (now - created.replace(tzinfo=now.tzinfo)).total_seconds()
                family.add_metric([destination], max(0.0, age))
        yield family
        yield GaugeMetricFamily(
            "fiona_quarantined_files", "Files kept in the quarantine", value=quarantined
        )
        spool = self.ctx.spool
        yield GaugeMetricFamily(
            "fiona_spool_free_bytes", "Free space on the spool filesystem", value=spool.free_bytes()
        )
        yield GaugeMetricFamily(
            "fiona_scp_listening", "1 if the DICOM port is bound", value=int(self.ctx.scp_bound())
        )


def render_metrics(ctx: WebContext) -> tuple[bytes, str]:
    from fiona import metrics

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(ctx))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # fiona serve: every process's counts
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for collector in (
            metrics.INSTANCES_RECEIVED,
            metrics.DEIDENTIFY_SECONDS,
            metrics.SEND_SECONDS,
        ):
            registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST

"""Routing studies: read the facts, decide, create requests, audit every decision.

:func:`route_stable_studies` runs in ``fiona serve``'s primary process after each stability
sweep that found stable studies (and at start-up). A study is routed when it becomes stable,
and again when it becomes stable after a late series — but a request for the same (study,
project, pseudonym, event) is never created twice; the existing request sends the late
instances itself.

:func:`route_receiving_studies` runs after every sweep: a study sent to a project's AE title
(mode B: the sender chose the project) is routed at its first instance, so that its request
streams the study to the destinations while it still arrives. Other studies wait for
stability (a coupling list or a request may still come).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.config import FionaConfig
from fiona.db import AuditEventType, Instance, RequestStatus, Study, StudyState, TransferRequest
from fiona.keys import keyed_hash
from fiona.requests import create_request
from fiona.router.coupling import coupling_for
from fiona.router.decide import Decision, Routing, StudyFacts, decide
from fiona.router.rules import RuleSet

__all__ = [
    "DatasetHeader",
    "Outcome",
    "import_coupling_and_route",
    "route_receiving_studies",
    "route_stable_studies",
    "route_study",
    "study_facts",
]

log = structlog.get_logger("fiona.router")

BATCH = 100


class DatasetHeader(Mapping[str, str]):
    """A dataset's attributes by keyword, as text (what rules match against)."""

    def __init__(self, ds: Dataset) -> None:
        self._ds = ds

    def __getitem__(self, keyword: str) -> str:
        if keyword not in self._ds:
            raise KeyError(keyword)
        value = self._ds[keyword].value
        if value is None:
            return ""
        if isinstance(value, bytes):
            return value.decode("latin-1").strip("\x00 ")
        return str(value).strip()

    def __iter__(self) -> Iterator[str]:
        return iter(element.keyword for element in self._ds if element.keyword)

    def __len__(self) -> int:
        return len(self._ds)


def study_facts(session: Session, study: Study, storage: Path) -> StudyFacts | None:
    """The facts of *study*'s first instance (None if it has none, or its file is unreadable)."""
    first = session.scalars(
        select(Instance).where(Instance.study_id == study.id).order_by(Instance.id).limit(1)
    ).one_or_none()
    if first is None:
        return None
    try:
        ds = dcmread(storage / first.path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file leaves the study unassigned
        log.warning("study header not readable for routing", error=type(exc).__name__)
        return None
    return StudyFacts(
        calling_ae=first.calling_ae_title,
        called_ae=first.called_ae_title,
        peer_address=first.peer_address,
        header=DatasetHeader(ds),
    )


def route_stable_studies(
    session_factory: sessionmaker[Session],
    config: FionaConfig,
    rules: RuleSet,
    node_key: bytes,
    now: datetime,
) -> int:
    """Route every study that became stable since it was last routed; returns requests made."""
    created = 0
    while True:
        with session_factory() as session:
            ids = session.scalars(
                select(Study.id)
                .where(
                    Study.state == StudyState.STABLE,
                    # never routed, or stable again after a late series since it was routed
                    # (a study routed while it arrived is not routed again at stability)
                    Study.routed_at.is_(None)
                    | ((Study.stable_at > Study.routed_at) & (Study.reopened_count > 0)),
                )
                .order_by(Study.id)
                .limit(BATCH)
            ).all()
        created += _route_each(session_factory, config, rules, node_key, now, ids)
        if len(ids) < BATCH:
            return created


def route_receiving_studies(
    session_factory: sessionmaker[Session],
    config: FionaConfig,
    rules: RuleSet,
    node_key: bytes,
    now: datetime,
) -> int:
    """Route studies still arriving that were sent to a project's AE title; returns requests."""
    titles = sorted({title for p in config.projects.values() for title in p.ae_titles})
    if not titles:
        return 0
    with session_factory() as session:
        ids = session.scalars(
            select(Study.id)
            .where(
                Study.state == StudyState.RECEIVING,
                Study.routed_at.is_(None),
                exists().where(Instance.study_id == Study.id, Instance.called_ae_title.in_(titles)),
            )
            .order_by(Study.id)
            .limit(BATCH)
        ).all()
    return _route_each(session_factory, config, rules, node_key, now, ids)


def _route_each(
    session_factory: sessionmaker[Session],
    config: FionaConfig,
    rules: RuleSet,
    node_key: bytes,
    now: datetime,
    study_ids: Sequence[int],
) -> int:
    """Route these studies; returns the requests created."""
    created = 0
    for study_id in study_ids:
        outcomes = route_study(session_factory, config, rules, node_key, now, study_id)
        created += sum(1 for o in outcomes if o.request_id is not None and not o.existed)
    return created


@dataclass(frozen=True)
class Outcome:
    """What became of one decision: a new request, or the one that already existed."""

    decision: Decision
    existed: bool
    request_id: int | None


def route_study(
    session_factory: sessionmaker[Session],
    config: FionaConfig,
    rules: RuleSet,
    node_key: bytes,
    now: datetime,
    study_id: int,
    *,
    actor: str = "fiona",
    project: str | None = None,
    apply: bool = True,
) -> list[Outcome]:
    """Decide for one study and (``apply``) create the missing requests and the audit row.

    ``project`` limits the decisions to one project (``fiona route replay --project``);
    ``apply=False`` only says what would happen. The study is marked routed when applied.
    """
    with session_factory() as session:
        study = session.get(Study, study_id)
        if study is None:
            return []
        uid, stable_at = study.study_instance_uid, study.stable_at
        facts = study_facts(session, study, config.storage.path)
        coupling = coupling_for(session, study, now)
    routing = (
        decide(facts, config, rules, now.date(), coupling)
        if facts is not None
        else Routing((), rules.sha256, ("the study's header could not be read",))
    )
    decisions = [d for d in routing.decisions if project is None or d.project == project]
    outcomes: list[Outcome] = []
    with session_factory() as session, session.begin():
        for decision in decisions:
            existing = session.scalars(
                select(TransferRequest.id)
                .where(
                    TransferRequest.study_instance_uid == uid,
                    TransferRequest.transfer_project_name == decision.project,
                    TransferRequest.transfer_name == decision.pseudonym,
                    TransferRequest.transfer_event_name == decision.event,
                    TransferRequest.status != RequestStatus.CANCELLED,
                )
                .limit(1)
            ).first()
            if existing is not None or not apply:
                outcomes.append(Outcome(decision, existing is not None, existing))
                continue
            request = create_request(
                session,
                study_instance_uid=uid,
                project=decision.project,
                pseudonym=decision.pseudonym,
                requested_by=actor,
                now=now,
                node_key=node_key,
                event=decision.event,
                source=decision.origin,
                audit_pseudonym=decision.hold_reason is None,
            )
            outcomes.append(Outcome(decision, False, request.id))
        if not apply:
            return outcomes
        session.add(
            audit_event(
                AuditEventType.ROUTING_DECISION,
                actor=actor,
                occurred_at=now,
                project=decisions[0].project if decisions else None,
                study_key=keyed_hash(node_key, uid),
                unassigned=routing.unassigned,
                decisions=[
                    {
                        "project": o.decision.project,
                        "origin": o.decision.origin,
                        "rule": o.decision.rule_id,
                        "event": o.decision.event,
                        "pseudonym_source": o.decision.pseudonym_source,
                        "held": o.decision.hold_reason,
                        "request": o.request_id,
                        "existed": o.existed,
                    }
                    for o in outcomes
                ],
                ruleset_sha256=routing.ruleset_sha256,
            )
        )
        session.execute(
            update(Study)
            .where(Study.id == study_id, Study.stable_at == stable_at)
            .values(routed_at=now)
        )
    return outcomes


def import_coupling_and_route(
    session_factory: sessionmaker[Session],
    config: FionaConfig,
    rules: RuleSet,
    node_key: bytes,
    rows: list[dict[str, object]],
    now: datetime,
    actor: str,
    expire_days: int,
    file_sha256: str,
) -> tuple[int, int, int]:
    """Store coupling entries (all or nothing) and route the studies already here at once.

    Returns (entries added, studies already here, requests created).
    """
    from fiona.router.coupling import import_coupling

    count, here = import_coupling(session_factory, rows, now, actor, node_key, expire_days,
                                  file_sha256)  # fmt: skip
    created = 0
    for study_id in here:
        outcomes = route_study(session_factory, config, rules, node_key, now, study_id,
                               actor=actor)  # fmt: skip
        created += sum(1 for o in outcomes if o.request_id is not None and not o.existed)
    return count, len(here), created

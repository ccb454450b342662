"""The delivery ledger: one row per (request, instance, destination), in the database.

Every step is a committed state change, so any process can die at any moment:

* :func:`prepare` de-identifies each instance of a ``processing`` request once (outside any
  transaction), records the new UIDs and the digest of the de-identified bytes, and adds a
  ``PENDING`` row per destination — only for instances that have none yet, so late series add
  rows for their new instances only; a row prepared from an older version of its instance (a
  replacement arrived: same SOP Instance UID, other bytes) is prepared again in place.
* :func:`claim` leases a batch of due rows of one destination (one request and series at a
  time; ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, SQLite's write lock otherwise) and counts the
  attempt. A crash leaves them ``IN_FLIGHT`` until the lease runs out; then they are due again
  and are sent again (the ledger's ``attempts`` shows the resend).
* :func:`record` writes each outcome: delivered, retry later (exponential backoff with jitter),
  or failed with the reason. Then the request's status is rolled up from its rows.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from fiona.anonymizer import Context, anonymize_bytes
from fiona.anonymizer.projects import ProjectDeidentification, project_deidentification
from fiona.audit import audit_event
from fiona.config import FionaConfig, ForwardingConfig
from fiona.db import (
    AuditEventType,
    Delivery,
    DeliveryState,
    DestinationState,
    Instance,
    RequestStatus,
    Study,
    StudyState,
    TransferRequest,
)
from fiona.errors import ConfigError, DeidentificationError
from fiona.forwarder.classify import Kind, Outcome
from fiona.forwarder.prepared import PreparedFiles
from fiona.metrics import DEIDENTIFY_SECONDS
from fiona.requests import fail_request, study_key

__all__ = [
    "WorkItem",
    "claim",
    "deidentify_item",
    "prepare",
    "record",
    "recover_leases",
    "release_owner",
    "request_context",
    "retry_failed",
    "still_needed",
]

DEID_FAILED = "deidentification"
OUTPUT_CHANGED = "output-changed"
REPREPARE = (DEID_FAILED, OUTPUT_CHANGED)
"""Failure classes an operator retry cures by preparing the instance again."""
_CONTEXT_FIELDS = ("transfer_name", "transfer_event_name", "transfer_site")


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One claimed delivery: what to send where, and how to rebuild the de-identified bytes."""

    delivery_id: int
    request_id: int
    instance_id: int
    destination: str
    path: Path
    """The original file in the spool."""
    digest: str
    project: str
    pseudonym: str
    event: str
    site: str
    date_offset_days: int | None
    sop_class_uid: str
    transfer_syntax_uid: str
    new_study_instance_uid: str
    new_series_instance_uid: str
    new_sop_instance_uid: str
    attempts: int


def request_context(settings: ProjectDeidentification, request: TransferRequest) -> Context:
    """The de-identification context of *request* (pseudonym, event, site, date offset)."""
    return settings.context(
        request.transfer_name,
        event=request.transfer_event_name or "",
        site=request.transfer_site or "",
        date_offset_days=request.transfer_date_offset_days,
    )


def deidentify_item(
    item: WorkItem, settings: ProjectDeidentification, prepared: PreparedFiles
) -> tuple[Path | None, Outcome | None]:
    """The item's de-identified file: the one prepared, or rebuilt and checked.

    De-identification is deterministic, so a missing prepared file (the forwarder restarted,
    an operator retried) is rebuilt from the original and must match the ledger's digest.
    """
    kept = prepared.path(item.request_id, item.instance_id, item.digest)
    if kept.exists():
        return kept, None
    context = settings.context(
        item.pseudonym,
        event=item.event,
        site=item.site,
        date_offset_days=item.date_offset_days,
    )
    try:
        data = anonymize_bytes(item.path.read_bytes(), settings.profile, context).data
    except (OSError, DeidentificationError) as exc:
        return None, Outcome(Kind.PERMANENT, DEID_FAILED, f"cannot de-identify: {exc}")
    if hashlib.sha256(data).hexdigest() != item.digest:
        return None, Outcome(
            Kind.PERMANENT,
            OUTPUT_CHANGED,
            "the de-identified bytes differ from those prepared (the project's profile, UID "
            "scheme or secret changed?): retry the request to prepare it again",
        )
    written = prepared.write(item.request_id, item.instance_id, item.digest, data)
    if written is None:
        return None, Outcome(
            Kind.TRANSIENT, "disk", "cannot write the de-identified file (disk full?)"
        )
    return written, None


def prepare(
    session_factory: sessionmaker[Session],
    config: FionaConfig,
    storage: Path,
    node_key: bytes,
    now: datetime,
    request_ids: Sequence[int] | None = None,
    settings_cache: dict[str, ProjectDeidentification] | None = None,
) -> int:
    """Add ledger rows for every ``processing`` request (or the given ones); return the count.

    *settings_cache* (project → compiled profile and UID scheme) may be kept by the caller
    from one call to the next: while a study streams in, this runs every poll.
    """
    with session_factory() as session:
        query = select(TransferRequest.id).where(TransferRequest.status == RequestStatus.PROCESSING)
        if request_ids is not None:
            query = query.where(TransferRequest.id.in_(request_ids))
        ids = list(session.scalars(query))
    added = 0
    cache = settings_cache if settings_cache is not None else {}
    for request_id in ids:
        added += _prepare_one(session_factory, config, storage, node_key, now, request_id, cache)
    return added


def _stale(source_digest: str | None, digest: str) -> bool:
    """Whether a ledger row was prepared from another version of its instance."""
    return source_digest is not None and source_digest != digest


def _prepare_one(
    session_factory: sessionmaker[Session],
    config: FionaConfig,
    storage: Path,
    node_key: bytes,
    now: datetime,
    request_id: int,
    settings_cache: dict[str, ProjectDeidentification],
) -> int:
    with session_factory() as session:
        request = session.get(TransferRequest, request_id)
        if request is None or request.study_id is None:
            return 0
        project = config.projects.get(request.transfer_project_name)
        destinations = project.destinations if project is not None else ()
        dropped = project.drop if project is not None else ()
        # (instance, destination) -> its row: missing (a new instance), or prepared from an
        # older version of the instance (a replacement arrived) and not being sent right now.
        existing = {
            (row.instance_id, row.destination): row
            for row in session.execute(
                select(
                    Delivery.id,
                    Delivery.instance_id,
                    Delivery.destination,
                    Delivery.source_digest,
                    Delivery.state,
                ).where(Delivery.request_id == request_id)
            )
        }

        def wanted(instance_id: int, digest: str, name: str) -> bool:
            row = existing.get((instance_id, name))
            return row is None or (
                _stale(row.source_digest, digest) and row.state != DeliveryState.IN_FLIGHT
            )

        instances = [
            (row.id, row.path, row.sop_class_uid, row.transfer_syntax_uid, row.modality, row.digest)
            for row in session.execute(
                select(
                    Instance.id,
                    Instance.path,
                    Instance.sop_class_uid,
                    Instance.transfer_syntax_uid,
                    Instance.modality,
                    Instance.digest,
                )
                .where(Instance.study_id == request.study_id, Instance.file_missing.is_(False))
                .order_by(Instance.series_id, Instance.id)
            )
            if any(wanted(row.id, row.digest, name) for name in destinations)
        ]
        session.expunge(request)
    if not instances:
        _rollup(session_factory, request_id, now, node_key)
        return 0
    try:
        settings = settings_cache.get(request.transfer_project_name)
        if settings is None:
            settings = project_deidentification(config, request.transfer_project_name)
            settings_cache[request.transfer_project_name] = settings
    except ConfigError as exc:
        with session_factory() as session, session.begin():
            stored = session.get(TransferRequest, request_id)
            if stored is not None:
                fail_request(session, stored, now, "de-identification", f"configuration: {exc}")
        return 0
    context = request_context(settings, request)
    kept = PreparedFiles(storage)
    rows: list[Delivery] = []
    resets: list[tuple[int, dict[str, Any]]] = []
    failures: list[str] = []
    new_study: str | None = None

    def add(instance_id: int, source_digest: str, values: dict[str, Any]) -> None:
        """A row per destination that needs one: new, or prepared again for a new version."""
        values = {
            "attempts": 0, "last_status": None, "next_attempt_at": now, "lease_until": None,
            "lease_owner": None, "acknowledged_at": None, "source_digest": source_digest,
            "updated_at": now, **values,
        }  # fmt: skip
        for name in destinations:
            if not wanted(instance_id, source_digest, name):
                continue
            row = existing.get((instance_id, name))
            if row is None:
                new = Delivery(request_id=request_id, instance_id=instance_id, destination=name,
                               created_at=now, **values)  # fmt: skip
                rows.append(new)
            else:
                resets.append((row.id, values))

    for instance_id, rel_path, sop_class, syntax, modality, source_digest in instances:
        if modality in dropped:  # the project never receives it: a ledger row says so
            add(instance_id, source_digest, {
                "state": DeliveryState.SKIPPED, "last_error_class": "dropped",
                "last_error": f"modality {modality} is not forwarded for this project",
                "digest": "", "sop_class_uid": sop_class, "transfer_syntax_uid": syntax,
                "new_study_instance_uid": "", "new_series_instance_uid": "",
                "new_sop_instance_uid": "",
            })  # fmt: skip
            continue
        outcome_error: str | None = None
        try:
            data = (storage / rel_path).read_bytes()
            with DEIDENTIFY_SECONDS.time():
                result = anonymize_bytes(data, settings.profile, context)
        except (OSError, DeidentificationError) as exc:
            outcome_error = f"cannot de-identify: {exc}"
            digest, uids = "", ("", "", "")
        else:
            digest = hashlib.sha256(result.data).hexdigest()
            kept.write(request_id, instance_id, digest, result.data)
            uids = (
                result.study_instance_uid or "",
                result.series_instance_uid or "",
                result.sop_instance_uid or "",
            )
            new_study = new_study or result.study_instance_uid
        if outcome_error is not None:
            failures.append(outcome_error)
        add(instance_id, source_digest, {
            "state": DeliveryState.FAILED if outcome_error else DeliveryState.PENDING,
            "last_error_class": DEID_FAILED if outcome_error else None,
            "last_error": outcome_error, "digest": digest, "sop_class_uid": sop_class,
            "transfer_syntax_uid": syntax, "new_study_instance_uid": uids[0],
            "new_series_instance_uid": uids[1], "new_sop_instance_uid": uids[2],
        })  # fmt: skip
    with session_factory() as session, session.begin():
        stored = session.get(TransferRequest, request_id)
        if stored is None or stored.status != RequestStatus.PROCESSING:
            return 0  # cancelled (or otherwise moved on) while it was being prepared
        session.add_all(rows)
        replaced = 0
        for delivery_id, values in resets:
            # A row a sender claimed meanwhile is left alone: once it is recorded, it is
            # stale, the request cannot complete, and the next pass prepares it again.
            replaced += session.execute(  # type: ignore[attr-defined]  # a CursorResult
                update(Delivery)
                .where(Delivery.id == delivery_id, Delivery.state != DeliveryState.IN_FLIGHT)
                .values(**values)
            ).rowcount
        if stored is not None and new_study and not stored.transfer_mapped_uid:
            stored.transfer_mapped_uid = new_study
        key = study_key(node_key, request)
        session.add(
            audit_event(
                AuditEventType.DEIDENTIFIED,
                actor="fiona",
                occurred_at=now,
                project=request.transfer_project_name,
                request_id=request_id,
                study_key=key,
                profile=settings.profile.name,
                profile_version=settings.profile.version,
                profile_sha256=settings.profile.digest,
                uid_scheme=settings.scheme_name,
                pseudonym=request.transfer_name,
                new_study_instance_uid=new_study,
                instances=len(instances) - len(failures),
                failed=len(failures),
                replaced=replaced,
                destinations=list(destinations),
            )
        )
        for reason in sorted(set(failures)):
            session.add(
                audit_event(
                    AuditEventType.DEIDENTIFICATION_FAILED,
                    actor="fiona",
                    occurred_at=now,
                    project=request.transfer_project_name,
                    request_id=request_id,
                    study_key=key,
                    reason=reason,
                )
            )
    _rollup(session_factory, request_id, now, node_key)
    return len(rows) + replaced


def _rollup(
    session_factory: sessionmaker[Session], request_id: int, now: datetime, node_key: bytes
) -> None:
    """Derive a ``processing`` request's status from its ledger rows."""
    with session_factory() as session, session.begin():
        request = session.get(TransferRequest, request_id)
        if request is None or request.status != RequestStatus.PROCESSING:
            return
        counts: Counter[DeliveryState] = Counter(
            dict(
                (state, count)
                for state, count in session.execute(
                    select(Delivery.state, func.count())
                    .where(Delivery.request_id == request_id)
                    .group_by(Delivery.state)
                )
            )
        )
        if counts[DeliveryState.PENDING] or counts[DeliveryState.IN_FLIGHT]:
            return
        # A request is complete only when its study is: stable, and every instance prepared
        # (instances keep arriving while a request streams).
        if request.study_id is not None:
            study = session.get(Study, request.study_id)
            if study is None or study.state != StudyState.STABLE:
                return
            instances = session.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.study_id == request.study_id, Instance.file_missing.is_(False))
            )
            prepared = session.scalar(
                select(func.count(func.distinct(Delivery.instance_id))).where(
                    Delivery.request_id == request_id
                )
            )
            if (prepared or 0) < (instances or 0):
                return
            # A replacement arrived for an instance already prepared: the next pass prepares
            # it again and sends the new version (see _prepare_one).
            stale = session.scalar(
                select(func.count())
                .select_from(Delivery)
                .join(Instance, Instance.id == Delivery.instance_id)
                .where(
                    Delivery.request_id == request_id,
                    Delivery.source_digest.is_not(None),
                    Delivery.source_digest != Instance.digest,
                    Instance.file_missing.is_(False),
                )
            )
            if stale:
                return
        delivered, failed = counts[DeliveryState.DELIVERED], counts[DeliveryState.FAILED]
        flags = []
        messages: list[str] = []
        if failed:
            classes = dict(
                (cls or "", reason or "")
                for cls, reason in session.execute(
                    select(Delivery.last_error_class, Delivery.last_error)
                    .where(
                        Delivery.request_id == request_id,
                        Delivery.state == DeliveryState.FAILED,
                    )
                    .distinct()
                    .limit(20)
                )
            )
            if set(classes) & set(REPREPARE):
                flags.append("de-identification")
            if set(classes) - set(REPREPARE):
                flags.append("sending")
            messages = sorted(set(classes.values()))[:3]
        if not delivered and not failed:
            request.status = RequestStatus.FAILED
            request.transfer_error_message = (
                "every instance is of a modality this project does not receive"
                if counts[DeliveryState.SKIPPED]
                else "the study has no instances to send"
            )
        elif failed and delivered:
            request.status = RequestStatus.PARTIAL
        elif failed:
            request.status = RequestStatus.FAILED
        else:
            request.status = RequestStatus.SENT
        request.transfer_error = ",".join(flags) or None
        if messages:
            request.transfer_error_message = "; ".join(messages)
        elif request.status == RequestStatus.SENT:
            request.transfer_error_message = None
        request.transfer_date = now
        request.updated_at = now
        session.add(
            audit_event(
                AuditEventType.REQUEST_COMPLETED,
                actor="fiona",
                occurred_at=now,
                project=request.transfer_project_name,
                request_id=request_id,
                study_key=study_key(node_key, request),
                status=request.status.value,
                delivered=delivered,
                failed=failed,
                new_study_instance_uid=request.transfer_mapped_uid,
            )
        )


def claim(
    session_factory: sessionmaker[Session],
    storage: Path,
    destination: str,
    owner: str,
    now: datetime,
    lease_seconds: float,
    limit: int,
    share: int = 1,
) -> list[WorkItem]:
    """Lease due rows of *destination* (one request and series) and count the attempt.

    A sender takes its fair part of what is due in that series — the due rows divided by
    *share* (the destination's parallel senders), at most *limit* — so that parallel
    associations finish together instead of one of them sending a long tail alone.
    """
    with session_factory() as session, session.begin():
        query = (
            select(Delivery)
            .join(TransferRequest, TransferRequest.id == Delivery.request_id)
            .where(
                Delivery.destination == destination,
                Delivery.state == DeliveryState.PENDING,
                Delivery.next_attempt_at <= now,
                # A cancelled request's rows that came back from the wire are never sent.
                TransferRequest.status == RequestStatus.PROCESSING,
            )
            .order_by(Delivery.next_attempt_at, Delivery.request_id, Delivery.id)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(of=Delivery, skip_locked=True)
        rows = list(session.scalars(query))
        if not rows:
            return []
        first = rows[0]
        rows = [
            row
            for row in rows
            if row.request_id == first.request_id
            and row.new_series_instance_uid == first.new_series_instance_uid
        ]
        if share > 1:
            due = session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(
                    Delivery.destination == destination,
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= now,
                    Delivery.request_id == first.request_id,
                    Delivery.new_series_instance_uid == first.new_series_instance_uid,
                )
            )
            rows = rows[: max(1, -(-int(due or 0) // share))]
        request = session.get(TransferRequest, first.request_id)
        assert request is not None
        paths: dict[int, str] = {
            instance_id: path
            for instance_id, path in session.execute(
                select(Instance.id, Instance.path).where(
                    Instance.id.in_([row.instance_id for row in rows])
                )
            )
        }
        items = []
        lease = now + timedelta(seconds=lease_seconds)
        for row in rows:
            row.state = DeliveryState.IN_FLIGHT
            row.lease_until = lease
            row.lease_owner = owner
            row.attempts += 1
            row.updated_at = now
            items.append(
                WorkItem(
                    delivery_id=row.id,
                    request_id=row.request_id,
                    instance_id=row.instance_id,
                    destination=destination,
                    path=storage / paths[row.instance_id],
                    digest=row.digest,
                    project=request.transfer_project_name,
                    pseudonym=request.transfer_name,
                    event=request.transfer_event_name or "",
                    site=request.transfer_site or "",
                    date_offset_days=request.transfer_date_offset_days,
                    sop_class_uid=row.sop_class_uid,
                    transfer_syntax_uid=row.transfer_syntax_uid,
                    new_study_instance_uid=row.new_study_instance_uid,
                    new_series_instance_uid=row.new_series_instance_uid,
                    new_sop_instance_uid=row.new_sop_instance_uid,
                    attempts=row.attempts,
                )
            )
        return items


def backoff(attempts: int, policy: ForwardingConfig, rng: Callable[[], float]) -> float:
    """Seconds before the next attempt: base · 2^(n-1), capped, times a jitter in [0.5, 1)."""
    return exponential_delay(attempts, policy.retry_base_seconds, policy.retry_cap_seconds, rng)


def exponential_delay(
    attempts: int, base: float, cap: float, rng: Callable[[], float] = random.random
) -> float:
    """base · 2^(attempts-1), at most *cap*, times a jitter in [0.5, 1)."""
    exponent = min(max(0, attempts - 1), 40)
    return float(min(cap, base * float(2**exponent)) * (0.5 + rng() / 2))


def record(
    session_factory: sessionmaker[Session],
    results: Sequence[tuple[WorkItem, Outcome]],
    now: datetime,
    policy: ForwardingConfig,
    node_key: bytes,
    rng: Callable[[], float] = random.random,
) -> None:
    """Write the outcome of each attempt; roll the requests up."""
    if not results:
        return
    requests: set[int] = set()
    with session_factory() as session, session.begin():
        delivered: Counter[str] = Counter()
        rows = {
            row.id: row
            for row in session.scalars(
                select(Delivery).where(Delivery.id.in_([item.delivery_id for item, _ in results]))
            )
        }
        cancelled = set(
            session.scalars(
                select(TransferRequest.id).where(
                    TransferRequest.id.in_({item.request_id for item, _ in results}),
                    TransferRequest.status == RequestStatus.CANCELLED,
                )
            )
        )
        for item, outcome in results:
            row = rows.get(item.delivery_id)
            if row is None or row.state != DeliveryState.IN_FLIGHT:
                continue  # released meanwhile (lease expired and re-claimed): theirs now
            row.last_status = outcome.status
            row.lease_until = None
            row.lease_owner = None
            row.updated_at = now
            requests.add(row.request_id)
            if outcome.kind.delivered:
                row.state = DeliveryState.DELIVERED
                row.acknowledged_at = now
                row.last_error_class = "warning" if outcome.kind == Kind.WARNING else None
                row.last_error = outcome.reason if outcome.kind == Kind.WARNING else None
                delivered[f"0x{outcome.status or 0:04X}"] += 1
            elif outcome.kind == Kind.TRANSIENT and row.request_id not in cancelled:
                row.state = DeliveryState.PENDING
                row.last_error_class = outcome.label
                row.last_error = outcome.reason
                row.next_attempt_at = now + timedelta(seconds=backoff(row.attempts, policy, rng))
            elif outcome.kind == Kind.TRANSIENT:  # its request was cancelled meanwhile
                row.state = DeliveryState.FAILED
                row.last_error_class = "cancelled"
                row.last_error = f"request cancelled; last attempt: {outcome.reason}"
            else:
                row.state = DeliveryState.FAILED
                row.last_error_class = outcome.label
                row.last_error = outcome.reason
                session.add(
                    audit_event(
                        AuditEventType.DELIVERY_FAILED,
                        actor="fiona",
                        occurred_at=now,
                        project=item.project,
                        request_id=item.request_id,
                        destination=item.destination,
                        sop_instance_uid=item.new_sop_instance_uid,
                        error_class=outcome.label,
                        reason=outcome.reason,
                    )
                )
        first = results[0][0]
        if delivered:
            session.add(
                audit_event(
                    AuditEventType.DELIVERED,
                    actor=first.destination,
                    occurred_at=now,
                    project=first.project,
                    request_id=first.request_id,
                    destination=first.destination,
                    new_series_instance_uid=first.new_series_instance_uid,
                    instances=sum(delivered.values()),
                    statuses=dict(delivered),
                )
            )
    for request_id in sorted(requests):
        _rollup(session_factory, request_id, now, node_key)


def recover_leases(session_factory: sessionmaker[Session], now: datetime) -> int:
    """Make ``IN_FLIGHT`` rows whose lease ran out due again (their sender died)."""
    return _release(session_factory, now, Delivery.lease_until < now)


def release_owner(session_factory: sessionmaker[Session], owner_prefix: str, now: datetime) -> int:
    """At start-up: rows leased by an earlier run of this node are due again at once."""
    return _release(session_factory, now, Delivery.lease_owner.like(f"{owner_prefix}%"))


def _release(session_factory: sessionmaker[Session], now: datetime, which: Any) -> int:
    """``IN_FLIGHT`` rows matching *which* are due again now; returns how many."""
    with session_factory() as session, session.begin():
        result = session.execute(
            update(Delivery)
            .where(Delivery.state == DeliveryState.IN_FLIGHT, which)
            .values(
                state=DeliveryState.PENDING,
                lease_until=None,
                lease_owner=None,
                next_attempt_at=now,
                updated_at=now,
            )
        )
        return int(getattr(result, "rowcount", 0) or 0)


def retry_failed(
    session_factory: sessionmaker[Session], request_id: int, now: datetime, actor: str
) -> int:
    """Operator action, after fixing the cause: a request's failed rows are tried again.

    Rows that failed in sending are due again as they are. Rows that failed in preparation
    (the original could not be de-identified, or its de-identified bytes no longer match the
    prepared digest because the profile, UID scheme or secret changed) are removed, so that the
    next pipeline step prepares those instances again under the current configuration; their
    failure stays in the audit trail.
    """
    with session_factory() as session, session.begin():
        result = session.execute(
            update(Delivery)
            .where(
                Delivery.request_id == request_id,
                Delivery.state == DeliveryState.FAILED,
                Delivery.last_error_class.not_in(REPREPARE),
            )
            .values(state=DeliveryState.PENDING, next_attempt_at=now, updated_at=now)
        )
        resend = int(getattr(result, "rowcount", 0) or 0)
        result = session.execute(
            delete(Delivery).where(
                Delivery.request_id == request_id,
                Delivery.state == DeliveryState.FAILED,
                Delivery.last_error_class.in_(REPREPARE),
            )
        )
        reprepare = int(getattr(result, "rowcount", 0) or 0)
        request = session.get(TransferRequest, request_id)
        if (resend or reprepare) and request is not None:
            request.status = RequestStatus.PROCESSING
            request.transfer_error = None
            request.transfer_error_message = None
            request.updated_at = now
            session.add(
                audit_event(
                    AuditEventType.DELIVERY_RETRIED,
                    actor=actor,
                    occurred_at=now,
                    project=request.transfer_project_name,
                    request_id=request_id,
                    instances=resend + reprepare,
                    resent=resend,
                    prepared_again=reprepare,
                )
            )
        return resend + reprepare


def still_needed(
    session_factory: sessionmaker[Session], request_id: int, instance_ids: Sequence[int]
) -> set[int]:
    """Those of *instance_ids* some destination still has to get (pending or in flight)."""
    if not instance_ids:
        return set()
    with session_factory() as session:
        return set(
            session.scalars(
                select(Delivery.instance_id)
                .where(
                    Delivery.request_id == request_id,
                    Delivery.instance_id.in_(instance_ids),
                    Delivery.state.in_([DeliveryState.PENDING, DeliveryState.IN_FLIGHT]),
                )
                .distinct()
            )
        )


def breaker_state(session: Session, name: str, now: datetime) -> DestinationState:
    state = session.get(DestinationState, name)
    if state is None:
        state = DestinationState(
            name=name, breaker_open=False, consecutive_failures=0, updated_at=now
        )
        session.add(state)
        session.flush()
    return state

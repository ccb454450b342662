"""Export packages: a project's (or one subject's, or chosen requests') de-identified data as a
zip, ``Project/Subject/Event/Series/<SOP>.dcm`` (the DZHK download structure), named after
the project and the UTC time.

A package is built in the background (a thread of ``fiona serve``) into
``<storage>/exports/`` and downloaded from there as a stream: nothing is held in memory. The
de-identified bytes are made again from the originals with the request's pseudonym, event,
site and date offset, exactly as the forwarder made them; an instance whose bytes now differ
from what was delivered (the profile changed since) is counted in ``manifest.json``. Only
instances a destination acknowledged are exported. Packages older than a day are removed
when the next one is made. Creating and downloading a package are audit rows.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fiona.anonymizer.engine import anonymize_bytes
from fiona.anonymizer.projects import project_deidentification
from fiona.audit import audit_event, utcnow
from fiona.config import FionaConfig
from fiona.db import AuditEventType, Delivery, DeliveryState, Instance, RequestStatus
from fiona.db import TransferRequest as Request
from fiona.forwarder.ledger import request_context
from fiona.logs import get_logger

__all__ = ["ExportJob", "Exports"]

log = get_logger(__name__)
KEEP = timedelta(days=1)
EXPORTED = (RequestStatus.SENT, RequestStatus.PARTIAL)


def _safe(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return cleaned[:64] or "none"


@dataclass
class ExportJob:
    id: str
    owner: str
    project: str
    name: str
    path: Path
    created_at: datetime
    subject: str | None = None
    request_ids: tuple[int, ...] = ()
    total: int = 0
    done: int = 0
    state: str = "running"
    """``running``, ``done`` or ``failed``."""
    error: str | None = None
    differing: int = 0
    requests: list[int] = field(default_factory=list)


class Exports:
    """The export jobs of one ``fiona serve`` (kept in memory; the files on disk)."""

    def __init__(self, config: FionaConfig, session_factory: sessionmaker[Session]) -> None:
        self.config = config
        self.session_factory = session_factory
        self.folder = config.storage.path / "exports"
        self.jobs: dict[str, ExportJob] = {}
        self._lock = threading.Lock()

    def start(
        self,
        owner: str,
        project: str,
        subject: str | None = None,
        request_ids: tuple[int, ...] = (),
    ) -> ExportJob:
        now = utcnow()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._clean(now)
        name = f"{_safe(project)}_{now.strftime('%Y%m%dT%H%M%SZ')}.zip"
        job = ExportJob(
            uuid.uuid4().hex,
            owner,
            project,
            name,
            self.folder / f"{uuid.uuid4().hex}.zip",
            now,
            subject,
            request_ids,
        )
        with self._lock:
            self.jobs[job.id] = job
        threading.Thread(
            target=self._build, args=(job,), name=f"export-{job.id[:8]}", daemon=True
        ).start()
        return job

    def _clean(self, now: datetime) -> None:
        with self._lock:
            for job_id, job in list(self.jobs.items()):
                if job.state != "running" and now - job.created_at > KEEP:
                    job.path.unlink(missing_ok=True)
                    del self.jobs[job_id]

    def _items(self, job: ExportJob) -> list[tuple[Request, Instance, str]]:
        query = select(Request).where(
            Request.transfer_project_name == job.project, Request.status.in_(EXPORTED)
        )
        if job.subject:
            query = query.where(Request.transfer_name == job.subject)
        if job.request_ids:
            query = query.where(Request.id.in_(job.request_ids))
        items: list[tuple[Request, Instance, str]] = []
        with self.session_factory() as session:
            for request in session.scalars(query.order_by(Request.id)):
                rows = session.execute(
                    select(Instance, Delivery.digest)
                    .join(Delivery, Delivery.instance_id == Instance.id)
                    .where(
                        Delivery.request_id == request.id, Delivery.state == DeliveryState.DELIVERED
                    )
                    .order_by(Instance.id)
                ).all()
                seen: set[int] = set()
                for instance, digest in rows:  # one per instance, whatever the destinations
                    if instance.id not in seen:
                        seen.add(instance.id)
                        items.append((request, instance, digest))
        return items

    def _build(self, job: ExportJob) -> None:
        import zipfile

        try:
            settings = project_deidentification(self.config, job.project)
            items = self._items(job)
            job.total = len(items)
            job.requests = sorted({request.id for request, _, _ in items})
            partial = job.path.with_suffix(".part")
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for request, instance, digest in items:
                    result = anonymize_bytes(
                        (self.config.storage.path / instance.path).read_bytes(),
                        settings.profile,
                        request_context(settings, request),
                    )
                    if hashlib.sha256(result.data).hexdigest() != digest:
                        job.differing += 1
                    folder = "/".join(
                        [
                            _safe(job.project),
                            _safe(request.transfer_name),
                            _safe(request.transfer_event_name or "no-event"),
                            _safe(result.series_instance_uid or "series"),
                        ]
                    )
                    with archive.open(f"{folder}/{result.sop_instance_uid}.dcm", "w") as out:
                        out.write(result.data)
                    job.done += 1
                manifest = {
                    "project": job.project,
                    "created_at": job.created_at.isoformat(),
                    "created_by": job.owner,
                    "subject": job.subject,
                    "requests": job.requests,
                    "instances": job.done,
                    "profile": settings.profile.label,
                    "profile_sha256": settings.profile.digest,
                    "differing_from_delivered": job.differing,
                }
                archive.writestr("manifest.json", json.dumps(manifest, indent=2))
            partial.replace(job.path)
            job.state = "done"
            self._audit(
                AuditEventType.EXPORT_CREATED,
                job,
                instances=job.done,
                requests=job.requests,
                differing=job.differing,
            )
        except Exception as exc:  # noqa: BLE001  # the job shows it; the node goes on
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"[:300]
            job.path.with_suffix(".part").unlink(missing_ok=True)
            log.error("export failed", project=job.project, error=type(exc).__name__)

    def downloaded(self, job: ExportJob, user: str) -> None:
        self._audit(AuditEventType.EXPORT_DOWNLOADED, job, downloaded_by=user)

    def _audit(self, kind: AuditEventType, job: ExportJob, **details: Any) -> None:
        with self.session_factory() as session, session.begin():
            session.add(
                audit_event(
                    kind,
                    actor=job.owner,
                    occurred_at=utcnow(),
                    project=job.project,
                    package=job.name,
                    **details,
                )
            )

"""The coupling list: legacy and bulk data assigned to projects before it arrives.

``fiona coupling import FILE.csv`` reads rows ``AccessionNumber,ProjectName,subjectid,eventname``
(``StudyInstanceUID`` instead of ``AccessionNumber`` is accepted) — MMIV's migration format.
Each row says: the study with this accession number goes to this project under this pseudonym
and event. AccessionNumbers are stored only as keyed hashes (like the studies' own), so the
table cannot be read back into a list of accession numbers. Entries expire after
``routing.coupling_expire_days``; routing (:mod:`fiona.router.decide`) uses the live ones when
a study becomes stable, and the import itself routes studies that are already here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.config import FionaConfig
from fiona.db import AuditEventType, CouplingEntry, Study
from fiona.keys import keyed_hash
from fiona.requests import entry_problems, read_csv

__all__ = ["COUPLING_COLUMNS", "Coupling", "coupling_for", "import_coupling", "parse_coupling_csv"]

COUPLING_COLUMNS = ("AccessionNumber", "StudyInstanceUID", "ProjectName", "subjectid", "eventname")


@dataclass(frozen=True)
class Coupling:
    """One live coupling-list entry that names a study."""

    entry_id: int
    project: str
    pseudonym: str
    event: str


def parse_coupling_csv(text: str, config: FionaConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a coupling CSV, and every problem (with line numbers)."""
    required = [("AccessionNumber", "StudyInstanceUID"), ("ProjectName",), ("subjectid",)]
    lines, problems = read_csv(text, COUPLING_COLUMNS, required)
    rows: list[dict[str, Any]] = []
    for line, row in lines:
        accession = row.get("AccessionNumber", "")
        uid = row.get("StudyInstanceUID", "")
        project = row.get("ProjectName", "")
        found = entry_problems(config, uid, project, accession)
        if not project:
            found.append("ProjectName is empty")
        if not row.get("subjectid"):
            found.append("subjectid is empty")
        problems += [f"line {line}: {p}" for p in found]
        rows.append(
            {
                "accession_number": accession or None,
                "study_instance_uid": uid or None,
                "project": config.project_id(project) or project,
                "pseudonym": row.get("subjectid", ""),
                "event": row.get("eventname", ""),
            }
        )
    if not lines and not problems:
        problems.append("no entries in the file")
    return rows, problems


def import_coupling(
    session_factory: sessionmaker[Session],
    rows: list[dict[str, Any]],
    now: datetime,
    actor: str,
    node_key: bytes,
    expire_days: int,
    file_sha256: str,
) -> tuple[int, list[int]]:
    """Store *rows* (all or nothing); returns how many, and the ids of studies already here."""
    expires = now + timedelta(days=expire_days)
    accession_keys: set[str] = set()
    uids: set[str] = set()
    with session_factory() as session, session.begin():
        for row in rows:
            key = keyed_hash(node_key, row["accession_number"]) if row["accession_number"] else None
            if key:
                accession_keys.add(key)
            if row["study_instance_uid"]:
                uids.add(row["study_instance_uid"])
            session.add(
                CouplingEntry(
                    accession_key=key,
                    study_instance_uid=row["study_instance_uid"],
                    project=row["project"],
                    pseudonym=row["pseudonym"],
                    event=row["event"],
                    created_by=actor,
                    created_at=now,
                    expires_at=expires,
                )
            )
        session.add(
            audit_event(
                AuditEventType.COUPLING_IMPORTED,
                actor=actor,
                occurred_at=now,
                entries=len(rows),
                projects=sorted({row["project"] for row in rows}),
                expires_at=expires.isoformat(),
                sha256=file_sha256,
            )
        )
        here = session.scalars(
            select(Study.id).where(
                or_(Study.accession_key.in_(accession_keys), Study.study_instance_uid.in_(uids))
            )
        ).all()
    return len(rows), list(here)


def coupling_for(session: Session, study: Study, now: datetime) -> list[Coupling]:
    """The live entries that name *study* (by its UID or its AccessionNumber's keyed hash)."""
    names = [CouplingEntry.study_instance_uid == study.study_instance_uid]
    if study.accession_key:
        names.append(CouplingEntry.accession_key == study.accession_key)
    entries = session.scalars(
        select(CouplingEntry)
        .where(or_(*names), CouplingEntry.expires_at > now)
        .order_by(CouplingEntry.id)
    ).all()
    return [Coupling(e.id, e.project, e.pseudonym, e.event) for e in entries]

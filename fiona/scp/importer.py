"""``fiona import``: ingest a folder of DICOM files through exactly the C-STORE path.

Each file is copied into the spool's ``tmp/`` and handed to the same
:class:`~fiona.scp.ingest.Ingestor` the SCP uses: same checks, quarantine, durability and
index. Files that are not DICOM Part 10 (no ``DICM`` preamble) and DICOMDIR files are
reported and skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import MediaStorageDirectoryStorage

from fiona.audit import audit_event
from fiona.db.models import Association, AuditEventType
from fiona.scp.ingest import Ingestor, IngestResult, ReceiveFacts

__all__ = ["ImportReport", "import_folder", "ingest_copy", "iter_files"]


@dataclass
class ImportReport:
    """What an import did; ``skipped`` lists (path, reason) of non-DICOM files."""

    association_id: str
    outcomes: Counter[str] = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def iter_files(folder: Path) -> Iterator[Path]:
    """All regular files below `folder`, in a stable order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def _skip_reason(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            if handle.read(4) != b"DICM":
                return "not a DICOM Part 10 file"
        meta = read_file_meta_info(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    except Exception:  # noqa: BLE001 - a corrupt meta header goes to the ingest checks
        return None
    if meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
        return "DICOMDIR (a media index, not an instance)"
    return None


def ingest_copy(ingestor: Ingestor, source: Path, facts: ReceiveFacts) -> IngestResult:
    """Copy *source* into the spool's ``tmp/`` and ingest it exactly like a C-STORE."""
    fd, tmp_name = tempfile.mkstemp(suffix=".dcm", dir=ingestor.spool.tmp)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as data:
            shutil.copyfileobj(data, out, 1 << 20)
        return ingestor.ingest(tmp, facts)
    finally:
        tmp.unlink(missing_ok=True)


def import_folder(
    ingestor: Ingestor,
    folder: Path,
    *,
    called_ae_title: str,
    calling_ae_title: str,
    progress: Callable[[Path], None] = lambda _p: None,
    peer_address: str = "local-import",
) -> ImportReport:
    """Ingest every DICOM file below `folder`."""
    facts = ReceiveFacts(
        calling_ae_title=calling_ae_title,
        called_ae_title=called_ae_title,
        peer_address=peer_address,
        association_id=str(uuid.uuid4()),
    )
    report = ImportReport(facts.association_id)
    started = ingestor.clock()
    writer = ingestor.writer
    writer.add(
        [
            Association(
                id=facts.association_id,
                calling_ae_title=calling_ae_title,
                called_ae_title=called_ae_title,
                peer_address=facts.peer_address,
                started_at=started,
                instances_stored=0,
                instances_failed=0,
            )
        ]
    ).result()
    for path in iter_files(folder):
        progress(path)
        reason = _skip_reason(path)
        if reason is not None:
            report.skipped.append((str(path), reason))
            continue
        result = ingest_copy(ingestor, path, facts)
        if result.ok and result.outcome is not None:
            report.outcomes[result.outcome.value] += 1
        else:
            report.outcomes["FAILED"] += 1
            report.failed.append((str(path), f"0x{result.status:04X} {result.comment or ''}"))
    stored = sum(v for k, v in report.outcomes.items() if k != "FAILED")

    def finish(session: object) -> None:
        row = session.get(Association, facts.association_id)  # type: ignore[attr-defined]
        row.ended_at = ingestor.clock()
        row.instances_stored = stored
        row.instances_failed = report.outcomes["FAILED"]
        session.add(  # type: ignore[attr-defined]
            audit_event(
                AuditEventType.IMPORT_FINISHED,
                actor=f"{calling_ae_title}@local-import",
                occurred_at=ingestor.clock(),
                association_id=facts.association_id,
                outcomes=dict(report.outcomes),
                skipped=len(report.skipped),
            )
        )

    writer.submit(finish).result()
    return report

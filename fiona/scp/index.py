"""The index writer: one thread that commits index rows in groups.

Every association thread hands its instance record to the writer and waits for the
commit; the writer takes everything queued, writes it in one transaction and commits
once. With several concurrent associations one commit (one WAL fsync on SQLite) covers
many instances — a group commit — and SQLite never sees two writers from this process.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.db.models import (
    AuditEventType,
    Instance,
    InstanceState,
    Series,
    Study,
    StudyState,
)
from fiona.keys import keyed_hash
from fiona.logs import get_logger
from fiona.scp.header import InstanceHeader

__all__ = ["IndexWriter", "InstanceRecord", "StoreOutcome"]

log = get_logger(__name__)

_MAX_BATCH = 256


class StoreOutcome(Enum):
    """What indexing an instance did."""

    STORED = "STORED"
    DUPLICATE = "DUPLICATE"
    """Same SOP Instance UID, identical bytes: nothing changed."""
    REPLACED = "REPLACED"
    """Same SOP Instance UID, different bytes: the new version replaced the old."""


@dataclass(frozen=True)
class InstanceRecord:
    """An instance that is durably on disk and must be indexed."""

    header: InstanceHeader
    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    association_id: str
    received_at: datetime
    size_bytes: int
    digest: str
    path: str


_Work = Callable[[Session], Any]


class IndexWriter:
    """Serialises index writes through one thread, committing in groups.

    Parameters
    ----------
    session_factory : sessionmaker
        Where to write.
    node_key : bytes
        Secret for the study keys in audit rows.
    """

    def __init__(self, session_factory: sessionmaker[Session], node_key: bytes) -> None:
        self._session_factory = session_factory
        self._node_key = node_key
        self._queue: queue.Queue[tuple[_Work, Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fiona-index-writer", daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    def stop(self) -> None:
        """Finish everything queued, then stop."""
        if self._started:
            self._queue.put(None)
            self._thread.join()
            self._started = False

    def __enter__(self) -> IndexWriter:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- public operations -------------------------------------------------------------

    def submit(self, work: _Work) -> Future[Any]:
        """Run ``work(session)`` inside the next group transaction."""
        future: Future[Any] = Future()
        if not self._started:
            future.set_exception(RuntimeError("index writer is not running"))
            return future
        self._queue.put((work, future))
        return future

    def index_instance(self, record: InstanceRecord) -> Future[StoreOutcome]:
        """Queue an instance row; the future resolves once it is committed."""
        return self.submit(lambda session: self._apply_instance(session, record))

    def add(self, rows: Sequence[object]) -> Future[None]:
        """Queue rows (audit events, associations) to insert."""
        return self.submit(lambda session: session.add_all(rows))

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            batch: list[tuple[_Work, Future[Any]]] = []
            if first is None:
                stopping = True
            else:
                batch.append(first)
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    continue
                batch.append(item)
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[tuple[_Work, Future[Any]]], attempt: int = 1) -> None:
        try:
            with self._session_factory() as session, session.begin():
                results = [work(session) for work, _ in batch]
        except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
            if len(batch) > 1:
                # One bad item must not fail its neighbours: retry each on its own.
                for item in batch:
                    self._commit([item])
                return
            if attempt == 1 and isinstance(exc, IntegrityError | OperationalError):
                # Another node inserted the same study/series meanwhile (PostgreSQL
                # shared by several receivers), or the database was busy: try once more.
                self._commit(batch, attempt=2)
                return
            log.error("index write failed", error=type(exc).__name__, detail=str(exc)[:300])
            batch[0][1].set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)

    # -- the instance upsert ---------------------------------------------------------------

    def _apply_instance(self, session: Session, record: InstanceRecord) -> StoreOutcome:
        header = record.header
        now = record.received_at
        existing = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
        ).one_or_none()
        if existing is not None and existing.digest == record.digest and not existing.file_missing:
            return StoreOutcome.DUPLICATE

        study = session.scalars(
            select(Study).where(Study.study_instance_uid == header.study_instance_uid)
        ).one_or_none()
        study_key = keyed_hash(self._node_key, header.study_instance_uid)
        if study is None:
            study = Study(
                study_instance_uid=header.study_instance_uid,
                state=StudyState.RECEIVING,
                first_received_at=now,
                last_received_at=now,
                instance_count=0,
                reopened_count=0,
            )
            session.add(study)
            session.flush()
        else:
            if study.state is StudyState.STABLE:
                study.reopened_count += 1
                session.add(
                    audit_event(
                        AuditEventType.STUDY_REOPENED,
                        actor=record.calling_ae_title,
                        occurred_at=now,
                        study_key=study_key,
                        association_id=record.association_id,
                    )
                )
            study.state = StudyState.RECEIVING
            study.last_received_at = max(study.last_received_at, now)

        series = session.scalars(
            select(Series).where(Series.series_instance_uid == header.series_instance_uid)
        ).one_or_none()
        if series is None:
            series = Series(
                study_id=study.id,
                series_instance_uid=header.series_instance_uid,
                modality=header.modality,
                state=StudyState.RECEIVING,
                last_received_at=now,
                instance_count=0,
            )
            session.add(series)
            session.flush()
        else:
            series.state = StudyState.RECEIVING
            series.last_received_at = max(series.last_received_at, now)
            series.metadata_written_at = None

        if existing is None:
            study.instance_count += 1
            series.instance_count += 1
            session.add(
                Instance(
                    study_id=study.id,
                    series_id=series.id,
                    sop_instance_uid=header.sop_instance_uid,
                    sop_class_uid=header.sop_class_uid,
                    transfer_syntax_uid=header.transfer_syntax_uid,
                    modality=header.modality,
                    calling_ae_title=record.calling_ae_title,
                    called_ae_title=record.called_ae_title,
                    peer_address=record.peer_address,
                    association_id=record.association_id,
                    received_at=now,
                    size_bytes=record.size_bytes,
                    digest=record.digest,
                    path=record.path,
                    version=1,
                    state=InstanceState.RECEIVED,
                    file_missing=False,
                )
            )
            return StoreOutcome.STORED

        previous_digest = existing.digest
        was_missing = existing.file_missing
        for name, value in (
            ("study_id", study.id),
            ("series_id", series.id),
            ("sop_class_uid", header.sop_class_uid),
            ("transfer_syntax_uid", header.transfer_syntax_uid),
            ("modality", header.modality),
            ("calling_ae_title", record.calling_ae_title),
            ("called_ae_title", record.called_ae_title),
            ("peer_address", record.peer_address),
            ("association_id", record.association_id),
            ("received_at", now),
            ("size_bytes", record.size_bytes),
            ("digest", record.digest),
            ("path", record.path),
            ("state", InstanceState.RECEIVED),
            ("file_missing", False),
        ):
            setattr(existing, name, value)
        if previous_digest != record.digest:
            existing.version += 1
            session.add(
                audit_event(
                    AuditEventType.INSTANCE_REPLACED,
                    actor=record.calling_ae_title,
                    occurred_at=now,
                    study_key=study_key,
                    association_id=record.association_id,
                    version=existing.version,
                    previous_digest=previous_digest,
                    digest=record.digest,
                    file_was_missing=was_missing,
                )
            )
            return StoreOutcome.REPLACED
        return StoreOutcome.STORED

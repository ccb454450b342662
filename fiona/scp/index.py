"""The index writer: one thread that commits index rows in groups.

Every association thread hands its instance record to the writer and waits for the
commit; the writer takes everything queued, writes it in one transaction and commits
once. With several concurrent associations one commit (one WAL fsync on SQLite) covers
many instances — a group commit — and SQLite never sees two writers from this process.

Routine instances — a new SOP instance of a study and series this writer already knows,
whose ``last_received_at`` needs no update yet — take a short lane (:class:`_RoutineLane`):
one ``INSERT … ON CONFLICT DO NOTHING`` each on a DBAPI connection the writer keeps, in
one transaction, with the values converted by the columns' own SQLAlchemy types. An ORM
session around those statements cost ~0.4 ms of interpreter time per instance, more than
the commit's fsync. Everything else, and any batch the lane cannot finish (a row that
exists, an error), goes through the session as before.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from fiona.audit import audit_event
from fiona.db.engine import WriteTurn
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

__all__ = ["TOUCH_INTERVAL", "IndexWriter", "InstanceRecord", "StoreOutcome"]

log = get_logger(__name__)

_MAX_BATCH = 256
_MAX_CACHED_IDS = 100_000

# Built once: statement construction costs more than executing it on SQLite.
_INSTANCES = cast(Table, Instance.__table__)
_INSTANCE_LOOKUP = select(
    _INSTANCES.c.id, _INSTANCES.c.digest, _INSTANCES.c.file_missing, _INSTANCES.c.version
).where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
_INSTANCE_INSERT = insert(_INSTANCES)

TOUCH_INTERVAL = timedelta(seconds=1)
"""How stale a study's/series' ``last_received_at`` may be; the stability sweep adds it."""


class StoreOutcome(Enum):
    """What indexing an instance did."""

    STORED = "STORED"
    DUPLICATE = "DUPLICATE"
    """Same SOP Instance UID, identical bytes: nothing changed."""
    REPLACED = "REPLACED"
    """Same SOP Instance UID, different bytes: the new version replaced the old."""


def study_lookup_keys(node_key: bytes, header: InstanceHeader) -> dict[str, str | None]:
    """What a transfer request can name a study by, as stored: keyed hashes and the date."""
    date = header.study_date
    return {
        "accession_key": keyed_hash(node_key, header.accession_number)
        if header.accession_number
        else None,
        "patient_key": keyed_hash(node_key, header.patient_id) if header.patient_id else None,
        "study_date": date if date and len(date) == 8 and date.isdigit() else None,
    }


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


class _InstanceWork:
    """Indexing one instance: a unit of session work the routine lane can also take."""

    __slots__ = ("record", "writer")

    def __init__(self, writer: IndexWriter, record: InstanceRecord) -> None:
        self.writer = writer
        self.record = record

    def __call__(self, session: Session) -> StoreOutcome:
        return self.writer._apply_instance(session, self.record)


_Work = Callable[[Session], Any]

# The instance columns the routine lane writes, in a fixed order.
_LANE_COLUMNS = (
    "study_id",
    "series_id",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "modality",
    "calling_ae_title",
    "called_ae_title",
    "peer_address",
    "association_id",
    "received_at",
    "size_bytes",
    "digest",
    "path",
    "version",
    "state",
    "file_missing",
)


class _RoutineLane:
    """New instance rows through a DBAPI connection of the writer's own (module docstring).

    The SQL is built once for the engine's dialect; each value passes through its column
    type's bind processor, as SQLAlchemy would convert it (tested against rows the session
    writes, on SQLite and PostgreSQL).
    """

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        self._engine = engine
        self._sqlite = dialect.name == "sqlite"
        columns = [_INSTANCES.c[name] for name in _LANE_COLUMNS]
        names = [column.name for column in columns]  # the table's own: no outside text
        markers = [f":{name}" if self._sqlite else f"%({name})s" for name in names]
        self._sql = " ".join(
            (
                f"INSERT INTO {_INSTANCES.name} ({', '.join(names)})",
                f"VALUES ({', '.join(markers)})",
                "ON CONFLICT (sop_instance_uid) DO NOTHING",
            )
        )
        self._processors: list[tuple[str, Callable[[Any], Any] | None]] = [
            (column.name, column.type.dialect_impl(dialect).bind_processor(dialect))
            for column in columns
        ]
        self._connection: Any = None

    @staticmethod
    def supports(engine: Engine) -> bool:
        return engine.dialect.name in ("sqlite", "postgresql")

    def parameters(self, values: dict[str, Any]) -> dict[str, Any]:
        return {
            name: (processor(values[name]) if processor is not None else values[name])
            for name, processor in self._processors
        }

    def insert(self, rows: list[dict[str, Any]]) -> bool:
        """Insert new rows in one transaction; False (nothing written) if any row exists.

        Raises on a database error, after rolling back and dropping the connection.
        """
        if self._connection is None:
            self._connection = self._engine.raw_connection()
        connection = self._connection
        cursor = connection.cursor()
        try:
            if self._sqlite:  # FIONA's SQLite connections run in autocommit mode
                cursor.execute("BEGIN IMMEDIATE")
            for row in rows:
                cursor.execute(self._sql, self.parameters(row))
                if cursor.rowcount != 1:  # the SOP instance is indexed already
                    self._rollback(cursor)
                    return False
            if self._sqlite:
                cursor.execute("COMMIT")
            else:
                connection.commit()
            return True
        except BaseException:
            self._rollback(cursor)
            self.close()
            raise
        finally:
            cursor.close()

    def _rollback(self, cursor: Any) -> None:
        with contextlib.suppress(Exception):  # no transaction left to roll back
            if self._sqlite:
                cursor.execute("ROLLBACK")
            else:
                self._connection.rollback()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # a broken connection is discarded
                connection.close()


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
        # UID -> row id of studies and series; only the writer thread touches these.
        self._study_ids: dict[str, int] = {}
        self._series_ids: dict[str, int] = {}
        self._pending_ids: list[tuple[dict[str, int], str, int]] = []
        # (kind, row id) -> when its last_received_at was last written by this writer.
        self._touched: dict[tuple[str, int], datetime] = {}
        self._pending_touches: list[tuple[tuple[str, int], datetime]] = []
        engine = session_factory.kw.get("bind")
        self._lane = (
            _RoutineLane(engine)
            if isinstance(engine, Engine) and _RoutineLane.supports(engine)
            else None
        )
        self._turn = WriteTurn(engine) if isinstance(engine, Engine) else None

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
        if self._lane is not None:
            self._lane.close()
        if self._turn is not None:
            self._turn.close()

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
        return self.submit(_InstanceWork(self, record))

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
                with self._turn.taken() if self._turn is not None else contextlib.nullcontext():
                    self._commit(batch)

    def _commit(self, batch: list[tuple[_Work, Future[Any]]], attempt: int = 1) -> None:
        if attempt == 1 and self._commit_routine(batch):
            return
        self._pending_ids.clear()
        self._pending_touches.clear()
        try:
            with self._session_factory() as session, session.begin():
                results = [work(session) for work, _ in batch]
        except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
            self._pending_ids.clear()
            self._pending_touches.clear()
            if len(batch) > 1:
                # One bad item must not fail its neighbours: retry each on its own.
                for item in batch:
                    self._commit([item])
                return
            if attempt == 1 and isinstance(exc, IntegrityError | OperationalError):
                # Another node inserted the same study/series meanwhile (PostgreSQL
                # shared by several receivers), or the database was busy: try once more.
                if isinstance(exc, IntegrityError):
                    # Or a remembered id is gone: another process deleted the study
                    # (retention, a subject's erasure). Look the ids up again.
                    self._study_ids.clear()
                    self._series_ids.clear()
                    self._touched.clear()
                self._commit(batch, attempt=2)
                return
            log.error("index write failed", error=type(exc).__name__, detail=str(exc)[:300])
            batch[0][1].set_exception(exc)
            return
        for cache, uid, row_id in self._pending_ids:
            if len(cache) > _MAX_CACHED_IDS:
                cache.clear()
            cache[uid] = row_id
        self._pending_ids.clear()
        if len(self._touched) > _MAX_CACHED_IDS:
            self._touched.clear()
        self._touched.update(self._pending_touches)
        self._pending_touches.clear()
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)

    def _commit_routine(self, batch: list[tuple[_Work, Future[Any]]]) -> bool:
        """Commit a batch of routine new instances through the lane; False: not done."""
        if self._lane is None or not all(type(work) is _InstanceWork for work, _ in batch):
            return False
        rows = []
        for work, _ in batch:
            values = self._routine_values(cast(_InstanceWork, work).record)
            if values is None:
                return False
            rows.append(values)
        try:
            if not self._lane.insert(rows):
                return False
        except Exception as exc:  # noqa: BLE001 - the session path retries and reports
            log.warning("index short lane failed", error=type(exc).__name__)
            return False
        for _, future in batch:
            future.set_result(StoreOutcome.STORED)
        return True

    def _routine_values(self, record: InstanceRecord) -> dict[str, Any] | None:
        """The row of a routine instance (module docstring), or None."""
        header = record.header
        study_id = self._study_ids.get(header.study_instance_uid)
        series_id = self._series_ids.get(header.series_instance_uid)
        if (
            study_id is None
            or series_id is None
            or self._touch_due(("study", study_id), record.received_at)
            or self._touch_due(("series", series_id), record.received_at)
        ):
            return None
        return self._instance_values(record, study_id, series_id) | {
            "sop_instance_uid": header.sop_instance_uid,
            "version": 1,
        }

    def _instance_values(
        self, record: InstanceRecord, study_id: int, series_id: int
    ) -> dict[str, Any]:
        header = record.header
        return {
            "study_id": study_id,
            "series_id": series_id,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "modality": header.modality,
            "calling_ae_title": record.calling_ae_title,
            "called_ae_title": record.called_ae_title,
            "peer_address": record.peer_address,
            "association_id": record.association_id,
            "received_at": record.received_at,
            "size_bytes": record.size_bytes,
            "digest": record.digest,
            "path": record.path,
            "state": InstanceState.RECEIVED,
            "file_missing": False,
        }

    # -- the instance upsert ---------------------------------------------------------------

    def _apply_instance(self, session: Session, record: InstanceRecord) -> StoreOutcome:
        """Index one instance with as few statements as possible.

        This runs once per received instance. In the steady state it is a lookup and an
        insert: study and series ids are cached (rows never move, and ids are never reused;
        a row another process deleted shows as a foreign-key error, after which the ids are
        looked up again: see :meth:`_commit`), and their
        ``last_received_at`` is written at most every :data:`TOUCH_INTERVAL` seconds — the
        stability sweep allows for that slack, so a study is never declared stable early,
        and any instance arriving after it was declared stable touches (re-opens) it.
        Counts are taken when a study becomes stable.
        """
        header = record.header
        now = record.received_at
        connection = session.connection()
        existing = connection.execute(
            _INSTANCE_LOOKUP, {"uid": header.sop_instance_uid}
        ).one_or_none()
        if existing is not None and existing.digest == record.digest and not existing.file_missing:
            return StoreOutcome.DUPLICATE
        study_key = keyed_hash(self._node_key, header.study_instance_uid)

        study_id = self._study_id(session, record, study_key)
        if self._due(("study", study_id), now):
            reopened = session.execute(  # type: ignore[attr-defined]  # a CursorResult
                update(Study)
                .where(Study.id == study_id, Study.state == StudyState.STABLE)
                .values(
                    state=StudyState.RECEIVING,
                    reopened_count=Study.reopened_count + 1,
                    last_received_at=now,
                )
            ).rowcount
            if reopened:
                session.add(
                    audit_event(
                        AuditEventType.STUDY_REOPENED,
                        actor=record.calling_ae_title,
                        occurred_at=now,
                        study_key=study_key,
                        association_id=record.association_id,
                    )
                )
            else:
                session.execute(
                    update(Study).where(Study.id == study_id).values(last_received_at=now)
                )
        series_id = self._series_id(session, study_id, header, now)
        if self._due(("series", series_id), now):
            session.execute(
                update(Series)
                .where(Series.id == series_id)
                .values(state=StudyState.RECEIVING, last_received_at=now, metadata_written_at=None)
            )
        values = self._instance_values(record, study_id, series_id)
        if existing is None:
            connection.execute(
                _INSTANCE_INSERT,
                {"sop_instance_uid": header.sop_instance_uid, "version": 1, **values},
            )
            return StoreOutcome.STORED
        replaced = existing.digest != record.digest
        version = existing.version + (1 if replaced else 0)
        session.execute(
            update(Instance).where(Instance.id == existing.id).values(version=version, **values)
        )
        if not replaced:  # same bytes, but the file had gone missing: restored
            return StoreOutcome.STORED
        session.add(
            audit_event(
                AuditEventType.INSTANCE_REPLACED,
                actor=record.calling_ae_title,
                occurred_at=now,
                study_key=study_key,
                association_id=record.association_id,
                version=version,
                previous_digest=existing.digest,
                digest=record.digest,
                file_was_missing=existing.file_missing,
            )
        )
        return StoreOutcome.REPLACED

    def _due(self, key: tuple[str, int], now: datetime) -> bool:
        """Whether a study/series row's ``last_received_at`` must be written now (noted)."""
        if not self._touch_due(key, now):
            return False
        self._pending_touches.append((key, now))
        return True

    def _touch_due(self, key: tuple[str, int], now: datetime) -> bool:
        last = self._touched.get(key)
        return last is None or not timedelta(0) <= now - last < TOUCH_INTERVAL

    def _study_id(self, session: Session, record: InstanceRecord, study_key: str) -> int:
        header = record.header
        study_uid = header.study_instance_uid
        cached = self._study_ids.get(study_uid)
        if cached is not None:
            return cached
        keys = study_lookup_keys(self._node_key, header)
        row_id, created = self._row_id(
            session,
            self._study_ids,
            Study,
            Study.study_instance_uid,
            study_uid,
            {
                "study_instance_uid": study_uid,
                "state": StudyState.RECEIVING,
                "first_received_at": record.received_at,
                "last_received_at": record.received_at,
                "instance_count": 0,
                "reopened_count": 0,
                **keys,
            },
        )
        if created:  # links the study to its patient in the audit trail (both keyed)
            session.add(
                audit_event(
                    AuditEventType.STUDY_RECEIVED,
                    actor=record.calling_ae_title,
                    occurred_at=record.received_at,
                    study_key=study_key,
                    patient_key=keys["patient_key"],
                    association_id=record.association_id,
                    called_ae_title=record.called_ae_title,
                    peer_address=record.peer_address,
                )
            )
        return row_id

    def _series_id(
        self, session: Session, study_id: int, header: InstanceHeader, now: datetime
    ) -> int:
        row_id, _ = self._row_id(
            session,
            self._series_ids,
            Series,
            Series.series_instance_uid,
            header.series_instance_uid,
            {
                "study_id": study_id,
                "series_instance_uid": header.series_instance_uid,
                "modality": header.modality,
                "state": StudyState.RECEIVING,
                "last_received_at": now,
                "instance_count": 0,
            },
        )
        return row_id

    def _row_id(
        self,
        session: Session,
        cache: dict[str, int],
        model: type[Study] | type[Series],
        uid_column: InstrumentedAttribute[str],
        uid: str,
        values: dict[str, Any],
    ) -> tuple[int, bool]:
        """The id of a study/series row (cached, looked up, or inserted), and if inserted."""
        cached = cache.get(uid)
        if cached is not None:
            return cached, False
        row_id = session.scalar(select(model.id).where(uid_column == uid))
        created = row_id is None
        if created:
            row_id = session.scalar(insert(model).values(**values).returning(model.id))
        assert row_id is not None
        self._remember(cache, uid, row_id)
        return row_id, created

    def _remember(self, cache: dict[str, int], uid: str, row_id: int) -> None:
        # Ids are only remembered once their transaction committed (see _commit).
        self._pending_ids.append((cache, uid, row_id))

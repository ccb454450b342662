"""The audit trail's hash chain: every audit row is sealed when its transaction commits.

Each row gets the next chain position ``seq`` (1, 2, 3 … with no gap) and
``row_hash = SHA-256(previous row's row_hash + canonical content of this row)``; the first row
follows :data:`GENESIS`. The single row of ``audit_chain`` holds the last position and hash
(the *head*), so that removing rows at the end is detected too.

Sealing happens in the session's ``before_commit`` hook, after everything else the transaction
does: the head row is taken with ``UPDATE … RETURNING`` (a row lock on PostgreSQL, SQLite's
``BEGIN IMMEDIATE`` already serializes writers) and held for the instant until COMMIT, so
concurrent processes append in one order and no lock is taken after it (no deadlock). The
content is read back from the database before it is hashed, so what is hashed is exactly what
``fiona audit verify`` reads later. The hook is installed on SQLAlchemy's ``Session`` class:
no FIONA session can write an unsealed audit row.

Triggers (:func:`install_guards`) make the tables append-only in the database itself: a sealed
row cannot be changed, no row deleted, the head never moves back. They stop mistakes and
anyone without DDL rights; the chain finds what someone with those rights does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, event, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from fiona.db.models import AuditChainHead, AuditEvent

__all__ = [
    "GENESIS",
    "PLAIN_FIELDS",
    "ChainBreak",
    "ChainReport",
    "content_of",
    "install_guards",
    "remove_guards",
    "row_digest",
    "seal",
    "verify_chain",
]

GENESIS = "0" * 64
"""The "previous hash" of the first row."""
PLAIN_FIELDS = ("actor", "project", "request_id", "study_key", "patient_key", "details")
"""Audit columns hashed (and shown) as they are stored."""

_PENDING = "fiona_audit_pending"
_CONTENT_COLUMNS = (
    AuditEvent.id,
    AuditEvent.seq,
    AuditEvent.row_hash,
    AuditEvent.occurred_at,
    AuditEvent.event_type,
    AuditEvent.actor,
    AuditEvent.project,
    AuditEvent.request_id,
    AuditEvent.study_key,
    AuditEvent.patient_key,
    AuditEvent.details,
)


def content_of(row: Any, seq: int) -> str:
    """The canonical text of an audit row at chain position *seq* (what is hashed).

    JSON with sorted keys and no spaces; the time in UTC with microseconds; the event type by
    its stored name. The row's ``id`` is not part of it (a surrogate key), its position is.
    """
    occurred_at: datetime = row.occurred_at
    event_type = row.event_type
    return json.dumps(
        {
            "seq": seq,
            "occurred_at": occurred_at.astimezone(UTC).isoformat(timespec="microseconds"),
            "event_type": getattr(event_type, "value", event_type),
            **{name: getattr(row, name) for name in PLAIN_FIELDS},
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def row_digest(previous: str, content: str) -> str:
    """SHA-256 (hex) of the previous row's hash followed by this row's canonical content."""
    return hashlib.sha256((previous + content).encode("utf-8")).hexdigest()


def seal(connection: Connection, ids: Sequence[int]) -> list[tuple[int, int, str]]:
    """Chain the audit rows *ids* (in id order) after the head; returns (id, seq, hash).

    Must run in the transaction that inserted them, as its last write before COMMIT.
    """
    # Rows of a rolled-back savepoint are gone: only what the database holds is sealed.
    rows = connection.execute(
        select(*_CONTENT_COLUMNS)
        .where(AuditEvent.id.in_(sorted(ids)), AuditEvent.seq.is_(None))
        .order_by(AuditEvent.id)
    ).all()
    if not rows:
        return []
    head = connection.execute(
        update(AuditChainHead)
        .where(AuditChainHead.id == 1)
        .values(seq=AuditChainHead.seq + len(rows))
        .returning(AuditChainHead.seq, AuditChainHead.row_hash)
    ).one_or_none()
    if head is None:
        raise RuntimeError("the audit chain head is missing: run `fiona db upgrade`")
    previous = head.row_hash
    sealed: list[tuple[int, int, str]] = []
    for position, row in enumerate(rows, start=head.seq - len(rows) + 1):
        previous = row_digest(previous, content_of(row, position))
        sealed.append((row.id, position, previous))
    table = AuditEvent.__table__
    connection.execute(
        update(table)  # type: ignore[arg-type]  # a Table
        .where(table.c.id == bindparam("b_id"))
        .values(seq=bindparam("b_seq"), row_hash=bindparam("b_hash")),
        [{"b_id": i, "b_seq": s, "b_hash": h} for i, s, h in sealed],
    )
    connection.execute(
        update(AuditChainHead).where(AuditChainHead.id == 1).values(row_hash=previous)
    )
    return sealed


# -- the session hooks -----------------------------------------------------------------------


@event.listens_for(Session, "before_flush")
def _collect(session: Session, _context: Any, _instances: Any) -> None:
    new = [obj for obj in session.new if isinstance(obj, AuditEvent)]
    if new:
        session.info.setdefault(_PENDING, []).extend(new)


@event.listens_for(Session, "before_commit")
def _seal_on_commit(session: Session) -> None:
    if not session.info.get(_PENDING) and not any(
        isinstance(obj, AuditEvent) for obj in session.new
    ):
        return
    session.flush()  # collects the last ones; ids are assigned
    pending: list[AuditEvent] = session.info.pop(_PENDING, [])
    by_id = {obj.id: obj for obj in pending if obj.id is not None}
    for row_id, position, digest in seal(session.connection(), list(by_id)):
        set_committed_value(by_id[row_id], "seq", position)
        set_committed_value(by_id[row_id], "row_hash", digest)


@event.listens_for(Session, "after_rollback")
def _forget_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


# -- verification ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainBreak:
    """The first place where the chain does not hold."""

    seq: int | None
    row_id: int | None
    problem: str

    def __str__(self) -> str:
        where = []
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        if self.row_id is not None:
            where.append(f"row id {self.row_id}")
        return f"{', '.join(where) or 'chain'}: {self.problem}"


@dataclass(frozen=True)
class ChainReport:
    rows: int
    head_seq: int
    head_hash: str
    broken: ChainBreak | None
    anchors_checked: int = 0

    @property
    def ok(self) -> bool:
        return self.broken is None


def _rows(connection: Connection, batch: int = 5000) -> Iterator[Any]:
    last = 0
    while True:
        rows = connection.execute(
            select(*_CONTENT_COLUMNS)
            .where(AuditEvent.seq > last)
            .order_by(AuditEvent.seq)
            .limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def verify_chain(connection: Connection, anchors: Mapping[int, str] | None = None) -> ChainReport:
    """Recompute the whole chain; the first break names its row.

    Detects an altered row (its hash no longer matches its content and predecessor), a
    deleted row (a gap in ``seq``), rows moved to other positions, rows added outside the
    chain (no ``seq``), rows removed at the end (the head is further) and a rewritten chain
    that no longer contains an *anchor* (``seq → row_hash`` noted earlier, e.g. from a
    previous ``fiona audit verify``).
    """
    anchors = dict(anchors or {})
    head = connection.execute(select(AuditChainHead.seq, AuditChainHead.row_hash)).one_or_none()
    if head is None:
        return ChainReport(0, 0, GENESIS, ChainBreak(None, None, "the chain head is missing"))
    previous, expected, count, checked = GENESIS, 1, 0, 0

    def report(broken: ChainBreak | None) -> ChainReport:
        return ChainReport(count, head.seq, head.row_hash, broken, checked)

    for row in _rows(connection):
        if row.seq != expected:
            return report(
                ChainBreak(
                    row.seq, row.id, f"rows at seq {expected}..{row.seq - 1} are missing (deleted)"
                )
            )
        digest = row_digest(previous, content_of(row, row.seq))
        if digest != row.row_hash:
            return report(
                ChainBreak(
                    row.seq,
                    row.id,
                    "content or order altered: its hash does "
                    "not match its content and the row before it",
                )
            )
        if row.seq in anchors:
            if anchors.pop(row.seq) != digest:
                return report(
                    ChainBreak(
                        row.seq,
                        row.id,
                        "differs from the anchor: the chain was rewritten up to here",
                    )
                )
            checked += 1
        previous, expected, count = digest, expected + 1, count + 1
    if anchors:
        seq = min(anchors)
        return report(ChainBreak(seq, None, "the anchor's row is not in the chain (deleted)"))
    if count != head.seq or previous != head.row_hash:
        return report(
            ChainBreak(
                count + 1 if count < head.seq else count,
                None,
                f"the chain ends at seq {count} but its head records seq "
                f"{head.seq}: rows at the end were removed or the head "
                "altered",
            )
        )
    stray = connection.execute(
        select(AuditEvent.id).where(AuditEvent.seq.is_(None)).order_by(AuditEvent.id).limit(1)
    ).scalar()
    if stray is not None:
        return report(ChainBreak(None, stray, "written outside the chain (no seq)"))
    return report(None)


# -- append-only guards ----------------------------------------------------------------------

_SQLITE_GUARDS = (
    """CREATE TRIGGER fiona_audit_no_delete BEFORE DELETE ON audit_events
    BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END""",
    """CREATE TRIGGER fiona_audit_no_update BEFORE UPDATE ON audit_events
    WHEN OLD.seq IS NOT NULL
    BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: sealed rows never change'); END""",
    """CREATE TRIGGER fiona_audit_head_forward BEFORE UPDATE ON audit_chain
    WHEN NEW.seq < OLD.seq
    BEGIN SELECT RAISE(ABORT, 'the audit chain head only moves forward'); END""",
    """CREATE TRIGGER fiona_audit_head_no_delete BEFORE DELETE ON audit_chain
    BEGIN SELECT RAISE(ABORT, 'the audit chain head is never deleted'); END""",
)
_SQLITE_DROP = (
    "DROP TRIGGER IF EXISTS fiona_audit_no_delete",
    "DROP TRIGGER IF EXISTS fiona_audit_no_update",
    "DROP TRIGGER IF EXISTS fiona_audit_head_forward",
    "DROP TRIGGER IF EXISTS fiona_audit_head_no_delete",
)
_POSTGRES_GUARDS = (
    """CREATE FUNCTION fiona_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_TABLE_NAME = 'audit_events' THEN
            IF TG_OP = 'UPDATE' AND OLD.seq IS NULL THEN
                RETURN NEW;
            END IF;
            RAISE EXCEPTION 'audit_events is append-only: sealed rows never change';
        END IF;
        IF TG_OP = 'UPDATE' AND NEW.seq >= OLD.seq THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'the audit chain head only moves forward';
    END $$""",
    """CREATE TRIGGER fiona_audit_guard BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION fiona_audit_guard()""",
    """CREATE TRIGGER fiona_audit_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION fiona_audit_guard()""",
    """CREATE TRIGGER fiona_audit_head_guard BEFORE UPDATE OR DELETE ON audit_chain
    FOR EACH ROW EXECUTE FUNCTION fiona_audit_guard()""",
    """CREATE TRIGGER fiona_audit_head_no_truncate BEFORE TRUNCATE ON audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION fiona_audit_guard()""",
)
_POSTGRES_DROP = (
    "DROP TRIGGER IF EXISTS fiona_audit_guard ON audit_events",
    "DROP TRIGGER IF EXISTS fiona_audit_no_truncate ON audit_events",
    "DROP TRIGGER IF EXISTS fiona_audit_head_guard ON audit_chain",
    "DROP TRIGGER IF EXISTS fiona_audit_head_no_truncate ON audit_chain",
    "DROP FUNCTION IF EXISTS fiona_audit_guard()",
)


def install_guards(connection: Connection) -> None:
    """Make the audit tables append-only in the database itself (triggers).

    Sealed audit rows cannot be updated, no audit row can be deleted (or truncated on
    PostgreSQL), and the chain head only moves forward. Whoever can drop triggers can still
    tamper: the hash chain is what finds that. A later SQLite migration that rebuilds
    ``audit_events`` (``batch_alter_table``) drops the triggers: it must install them again.
    """
    statements = _POSTGRES_GUARDS if connection.dialect.name == "postgresql" else _SQLITE_GUARDS
    for statement in statements:
        connection.exec_driver_sql(statement)


def remove_guards(connection: Connection) -> None:
    """Drop the triggers of :func:`install_guards` (migration downgrade; tests that tamper)."""
    statements = _POSTGRES_DROP if connection.dialect.name == "postgresql" else _SQLITE_DROP
    for statement in statements:
        connection.exec_driver_sql(statement)

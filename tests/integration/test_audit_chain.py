"""The audit trail's hash chain: sealed at commit, verified end to end, every tampering found."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.db import AuditChainHead, AuditEvent, AuditEventType, make_engine, upgrade
from fiona.db.chain import GENESIS, remove_guards, verify_chain

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
OLD_ROW = text(
    "INSERT INTO audit_events (occurred_at, event_type, actor, details) "
    "VALUES (:at, 'STUDY_STABLE', 'fiona', :details)"
)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def write_events(engine: Engine, count: int, per_transaction: int = 2) -> None:
    sessions = sessionmaker(engine)
    for start in range(0, count, per_transaction):
        with sessions() as session, session.begin():
            for n in range(start, min(count, start + per_transaction)):
                session.add(
                    audit_event(
                        AuditEventType.STUDY_STABLE,
                        actor="fiona",
                        occurred_at=T0 + timedelta(seconds=n, microseconds=n),
                        study_key=f"{n:032x}",
                        patient_key=f"{n + 1000:032x}",
                        project="BICAM" if n % 2 else None,
                        request_id=n if n % 3 else None,
                        instances=n,
                        nested={"ü": [1, 2.5, None], "n": n},
                    )
                )


def verify(engine: Engine, anchors: dict[int, str] | None = None):  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        return verify_chain(connection, anchors)


def row_ids(engine: Engine) -> list[int]:
    with engine.connect() as connection:
        return list(connection.scalars(select(AuditEvent.id).order_by(AuditEvent.seq)))


def test_rows_are_sealed_in_order_and_the_chain_verifies(engine: Engine) -> None:
    assert verify(engine).ok and verify(engine).rows == 0
    write_events(engine, 7, per_transaction=3)
    report = verify(engine)
    assert report.ok, report.broken
    assert (report.rows, report.head_seq) == (7, 7)
    with engine.connect() as connection:
        rows = connection.execute(select(AuditEvent.seq, AuditEvent.row_hash)).all()
        head = connection.execute(select(AuditChainHead.row_hash)).scalar_one()
    assert sorted(seq for seq, _ in rows) == list(range(1, 8))
    assert len({digest for _, digest in rows} | {GENESIS}) == 8
    assert head == dict(rows)[7]


def test_a_rolled_back_transaction_leaves_no_trace_in_the_chain(engine: Engine) -> None:
    write_events(engine, 2)
    sessions = sessionmaker(engine)
    with sessions() as session:
        session.add(audit_event(AuditEventType.STUDY_STABLE, actor="x", occurred_at=T0))
        session.flush()
        session.rollback()
    write_events(engine, 1)
    report = verify(engine)
    assert report.ok and report.rows == 3


@pytest.mark.parametrize("column", ["details", "actor", "occurred_at", "event_type", "project"])
def test_altering_any_row_fails_verification_at_that_row(engine: Engine, column: str) -> None:
    write_events(engine, 6)
    target = row_ids(engine)[3]
    values = {
        "details": {"instances": 99},
        "actor": "someone else",
        "occurred_at": T0 - timedelta(days=1),
        "event_type": AuditEventType.DELIVERED,
        "project": "OTHER",
    }
    with engine.begin() as connection:
        remove_guards(connection)  # tampering needs DDL rights
        connection.execute(
            update(AuditEvent.__table__)
            .where(AuditEvent.__table__.c.id == target)
            .values({column: values[column]})
        )
    report = verify(engine)
    assert not report.ok
    assert (report.broken.seq, report.broken.row_id) == (4, target)  # type: ignore[union-attr]
    assert "altered" in report.broken.problem  # type: ignore[union-attr]


def test_deleting_a_row_fails_at_the_gap(engine: Engine) -> None:
    write_events(engine, 6)
    ids = row_ids(engine)
    with engine.begin() as connection:
        remove_guards(connection)
        connection.execute(delete(AuditEvent).where(AuditEvent.id == ids[2]))
    broken = verify(engine).broken
    assert broken is not None
    assert (broken.seq, broken.row_id) == (4, ids[3])
    assert "3..3 are missing" in broken.problem


def test_reordering_rows_fails_at_the_first_moved_row(engine: Engine) -> None:
    write_events(engine, 6)
    ids = row_ids(engine)
    with engine.begin() as connection:  # swap positions 2 and 5, hashes and all
        remove_guards(connection)
        connection.execute(text("UPDATE audit_events SET seq = -seq WHERE seq IN (2, 5)"))
        connection.execute(text("UPDATE audit_events SET seq = 5 WHERE seq = -2"))
        connection.execute(text("UPDATE audit_events SET seq = 2 WHERE seq = -5"))
    broken = verify(engine).broken
    assert broken is not None
    assert (broken.seq, broken.row_id) == (2, ids[4])


def test_removing_the_last_rows_or_rewriting_the_chain_is_found(engine: Engine) -> None:
    write_events(engine, 5)
    anchor = verify(engine)
    ids = row_ids(engine)
    with engine.begin() as connection:
        remove_guards(connection)
        connection.execute(delete(AuditEvent).where(AuditEvent.id.in_(ids[3:])))
    broken = verify(engine).broken
    assert broken is not None and "head records seq 5" in broken.problem

    # Whoever also rewinds the head still does not match what an auditor noted earlier.
    with engine.begin() as connection:
        last = connection.execute(select(AuditEvent.row_hash).where(AuditEvent.seq == 3))
        connection.execute(update(AuditChainHead).values(seq=3, row_hash=last.scalar_one()))
    assert verify(engine).ok
    broken = verify(engine, {anchor.head_seq: anchor.head_hash}).broken
    assert broken is not None and broken.seq == 5 and "not in the chain" in broken.problem
    assert verify(engine, {3: verify(engine).head_hash}).anchors_checked == 1


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET actor = 'x' WHERE seq = 2",
        "DELETE FROM audit_events WHERE seq = 3",
        "DELETE FROM audit_events",
        "UPDATE audit_chain SET seq = 1",
        "DELETE FROM audit_chain",
    ],
)
def test_the_database_refuses_changes_to_the_trail(engine: Engine, statement: str) -> None:
    write_events(engine, 4)
    refused = r"append-only|only moves forward|never deleted"
    with pytest.raises(DBAPIError, match=refused), engine.begin() as connection:
        connection.execute(text(statement))
    assert verify(engine).ok and verify(engine).rows == 4


def test_a_row_written_around_the_chain_is_found(engine: Engine) -> None:
    write_events(engine, 2)
    with engine.begin() as connection:  # Core, no session: no seal
        row_id = connection.execute(
            insert(AuditEvent)
            .values(event_type=AuditEventType.DELIVERED, actor="x", occurred_at=T0, details={})
            .returning(AuditEvent.id)
        ).scalar_one()
    broken = verify(engine).broken
    assert broken is not None and broken.row_id == row_id and "outside the chain" in broken.problem


def test_concurrent_writers_build_one_unbroken_chain(engine: Engine) -> None:
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            write_events(engine, 20, per_transaction=1)
        except BaseException as exc:  # noqa: BLE001  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    report = verify(engine)
    assert report.ok, report.broken
    assert report.rows == 120


def test_the_migration_chains_rows_written_before_it(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0006")
        with engine.begin() as connection:
            for n in range(3):
                connection.execute(
                    text(
                        "INSERT INTO audit_events (occurred_at, event_type, actor, details) "
                        "VALUES (:at, 'STUDY_STABLE', 'fiona', :details)"
                    ),
                    {"at": T0 + timedelta(seconds=n), "details": f'{{"n": {n}}}'},
                )
        upgrade(engine)
        report = verify(engine)
        assert report.ok, report.broken
        assert report.rows == 3
        write_events(engine, 2)  # new rows continue the chain
        assert verify(engine).ok and verify(engine).rows == 5
        with Session(engine) as session:
            assert session.scalar(select(AuditEvent.details).where(AuditEvent.seq == 2)) == {"n": 1}
    finally:
        engine.dispose()

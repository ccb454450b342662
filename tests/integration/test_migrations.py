"""The Alembic migrations build exactly the schema the models describe, on both engines, and
upgrading an existing database carries its rows over as the new columns need."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from fiona.db import Base, current_revision, head_revision, make_engine, upgrade

pytestmark = pytest.mark.integration


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
    finally:
        engine.dispose()


def _row(table: sa.Table, **values: Any) -> dict[str, Any]:
    """*values*, plus a plain value for every other required column of *table*."""
    plain: dict[type, Any] = {
        sa.Integer: 1, sa.String: "x", sa.Text: "x", sa.Boolean: False,
        sa.DateTime: datetime(2026, 1, 1, tzinfo=UTC), sa.JSON: {},
    }  # fmt: skip
    row = dict(values)
    for column in table.columns:
        if column.name in row or column.nullable or column.server_default is not None:
            continue
        if column.primary_key and isinstance(column.type, sa.Integer):
            continue  # the database numbers the row
        row[column.name] = next(v for t, v in plain.items() if isinstance(column.type, t))
    return row


def test_upgrading_to_0009_keeps_what_redcap_already_has_and_redoes_the_rest(db_url: str) -> None:
    """Requests and Incoming records written back after their last change count as written;
    the others (changed since, or at the very same moment) are written back once more."""
    engine = make_engine(db_url)
    at = datetime(2026, 11, 1, 12, tzinfo=UTC)
    try:
        upgrade(engine, "0008")
        tables = sa.MetaData()
        tables.reflect(engine, only=["transfer_requests", "studies"])
        requests, studies = tables.tables["transfer_requests"], tables.tables["studies"]
        with engine.begin() as connection:
            for id_, synced in ((1, at + timedelta(seconds=1)), (2, at), (3, None)):
                connection.execute(
                    requests.insert().values(
                        _row(
                            requests,
                            id=id_,
                            updated_at=at,
                            external_synced_at=synced,
                            external_ref=f"r#{id_}",
                        )
                    )
                )
            for id_, written in ((1, at + timedelta(seconds=1)), (2, at - timedelta(seconds=1))):
                connection.execute(
                    studies.insert().values(
                        _row(
                            studies,
                            id=id_,
                            study_instance_uid=f"1.2.{id_}",
                            stable_at=at,
                            incoming_written_at=written,
                        )
                    )
                )
        upgrade(engine)
        with engine.connect() as connection:
            synced = {
                id_: value
                for id_, value in connection.execute(
                    sa.text("SELECT id, external_synced_revision FROM transfer_requests")
                )
            }
            written = {
                id_: value
                for id_, value in connection.execute(
                    sa.text("SELECT id, incoming_written_stable_at FROM studies")
                )
            }
        assert synced == {1: 0, 2: None, 3: None}
        assert written[2] is None and written[1] is not None
    finally:
        engine.dispose()


def test_upgrading_to_0010_takes_the_ledger_as_prepared_from_the_versions_held(
    db_url: str,
) -> None:
    """Rows prepared before 0010 count as prepared from the instance version held at the
    upgrade: a replacement arriving after it is noticed."""
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0009")
        tables = sa.MetaData()
        names = ["studies", "series", "instances", "transfer_requests", "deliveries"]
        tables.reflect(engine, only=names)
        with engine.begin() as connection:
            for name in names:  # every id 1: each row points at the one before
                table = tables.tables[name]
                digest = {"digest": "ab" * 32 if name == "instances" else "cd" * 32}
                digest = digest if "digest" in table.columns else {}
                connection.execute(table.insert().values(_row(table, id=1, **digest)))
        upgrade(engine)
        with engine.connect() as connection:
            digest = connection.scalar(sa.text("SELECT source_digest FROM deliveries"))
        assert digest == "ab" * 32
    finally:
        engine.dispose()


def test_upgrading_to_0011_keeps_every_row_and_never_reuses_a_study_id(db_url: str) -> None:
    """0011 rebuilds the studies and series tables on SQLite (other tables point at them):
    the rows and their ids stay, and the id of a deleted study is not given out again."""
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0010")
        tables = sa.MetaData()
        names = ["studies", "series", "instances"]
        tables.reflect(engine, only=names)
        studies = tables.tables["studies"]
        with engine.begin() as connection:
            for id_ in (1, 2):  # each series and instance points at the same id's study
                own = {
                    "studies": {"study_instance_uid": f"1.2.{id_}"},
                    "series": {"study_id": id_, "series_instance_uid": f"1.3.{id_}"},
                    "instances": {"study_id": id_, "series_id": id_,
                                  "sop_instance_uid": f"1.4.{id_}", "path": f"{id_}.dcm"},
                }  # fmt: skip
                for name in names:
                    table = tables.tables[name]
                    connection.execute(table.insert().values(_row(table, id=id_, **own[name])))
        upgrade(engine)
        with engine.begin() as connection:
            kept = connection.execute(sa.text("SELECT id, study_id FROM instances")).all()
            assert sorted(kept) == [(1, 1), (2, 2)]
            if engine.dialect.name != "sqlite":
                return  # PostgreSQL: a sequence, which never gives an id twice
            for name in reversed(names):
                connection.execute(sa.text(f"DELETE FROM {name} WHERE id = 2"))
            new = connection.execute(
                studies.insert().values(_row(studies, study_instance_uid="1.2.3"))
            ).inserted_primary_key
        assert new is not None and new[0] == 3
    finally:
        engine.dispose()

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

"""Alembic environment: runs against the engine FIONA passes in ``config.attributes``.

On SQLite a migration may rebuild a table (batch mode: create a copy, drop the original,
rename): dropping a table other rows point at fails while foreign keys are enforced, so they
are off during the migrations — a setting SQLite takes only outside a transaction — and
checked (``PRAGMA foreign_key_check``) before the migrations commit.
"""

from __future__ import annotations

from alembic import context

from fiona.db.models import Base

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # pragma: no cover - only through fiona.db.migrate
    raise RuntimeError("run migrations through 'fiona db upgrade'")

with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    raw = connection.connection.driver_connection if sqlite else None
    if raw is not None:
        raw.execute("PRAGMA foreign_keys=OFF")  # autocommit mode: outside any transaction
    try:
        with connection.begin():
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=sqlite,
                compare_type=True,
            )
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise RuntimeError(f"migration left rows pointing nowhere: {broken[:5]}")
    finally:
        if raw is not None:
            raw.execute("PRAGMA foreign_keys=ON")

"""Alembic environment: runs against the engine FIONA passes in ``config.attributes``."""

from __future__ import annotations

from alembic import context

from fiona.db.models import Base

config = context.config
engine = config.attributes.get("engine")
if engine is None:  # pragma: no cover - only through fiona.db.migrate
    raise RuntimeError("run migrations through 'fiona db upgrade'")

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()

"""The database layer: models, engines, migrations."""

from fiona.db.engine import make_engine, make_sessionmaker
from fiona.db.migrate import current_revision, head_revision, upgrade
from fiona.db.models import (
    Association,
    AuditEvent,
    AuditEventType,
    Base,
    Instance,
    InstanceState,
    QuarantinedFile,
    Series,
    Study,
    StudyState,
)

__all__ = [
    "Association",
    "AuditEvent",
    "AuditEventType",
    "Base",
    "Instance",
    "InstanceState",
    "QuarantinedFile",
    "Series",
    "Study",
    "StudyState",
    "current_revision",
    "head_revision",
    "make_engine",
    "make_sessionmaker",
    "upgrade",
]

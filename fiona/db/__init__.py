"""The database layer: models, engines, migrations."""

from fiona.db.engine import make_engine, make_sessionmaker
from fiona.db.migrate import current_revision, head_revision, upgrade
from fiona.db.models import (
    Association,
    AuditChainHead,
    AuditEvent,
    AuditEventType,
    Base,
    CouplingEntry,
    Delivery,
    DeliveryCheck,
    DeliveryState,
    DestinationState,
    Instance,
    InstanceState,
    QuarantinedFile,
    RequestStatus,
    Series,
    Study,
    StudyState,
    TransferRequest,
    User,
    UserRole,
)

# Installs the hooks that seal every audit row into the hash chain at commit.
from fiona.db import chain  # noqa: F401  # isort: skip

__all__ = [
    "Association",
    "AuditChainHead",
    "AuditEvent",
    "AuditEventType",
    "Base",
    "CouplingEntry",
    "Delivery",
    "DeliveryCheck",
    "DeliveryState",
    "DestinationState",
    "Instance",
    "InstanceState",
    "QuarantinedFile",
    "RequestStatus",
    "Series",
    "Study",
    "StudyState",
    "TransferRequest",
    "User",
    "UserRole",
    "current_revision",
    "head_revision",
    "make_engine",
    "make_sessionmaker",
    "upgrade",
]

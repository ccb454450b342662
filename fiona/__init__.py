"""FIONA: a DICOM staging router for research imaging.

Receive (``fiona.scp``) → route (``fiona.router``) → de-identify (``fiona.anonymizer``)
→ forward (``fiona.forwarder``), every hand-off a committed state change in the database.
"""

from fiona.config import FionaConfig, load_config
from fiona.errors import (
    ConfigError,
    DeidentificationError,
    FionaError,
    ForwardError,
    OutOfSpaceError,
    PermanentForwardError,
    RoutingError,
    StorageError,
    TransientForwardError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DeidentificationError",
    "FionaConfig",
    "FionaError",
    "ForwardError",
    "OutOfSpaceError",
    "PermanentForwardError",
    "RoutingError",
    "StorageError",
    "TransientForwardError",
    "__version__",
    "load_config",
]

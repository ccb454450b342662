"""FIONA's exception tree.

Callers branch on the class, never on the message text::

    FionaError
    ├── ConfigError              bad or missing configuration (CLI exit status 2)
    ├── StorageError             the spool cannot take bytes
    │   └── OutOfSpaceError      free space below ``storage.min_free_mb`` or ENOSPC
    ├── RoutingError             (issue 6) a study cannot be routed
    ├── DeidentificationError    (issue 3) a dataset cannot be de-identified
    └── ForwardError             (issue 4) delivery to a destination failed
        ├── TransientForwardError    retry later
        └── PermanentForwardError    quarantine, operator action needed
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeidentificationError",
    "FionaError",
    "ForwardError",
    "OutOfSpaceError",
    "PermanentForwardError",
    "RoutingError",
    "StorageError",
    "TransientForwardError",
]


class FionaError(Exception):
    """Base class of every error FIONA raises on purpose."""


class ConfigError(FionaError):
    """The configuration file is missing, unreadable or invalid.

    Parameters
    ----------
    source : str
        The file the error is in.
    problems : list of tuple[str, str]
        ``(key path, message)`` pairs, e.g. ``("node.port", "must be <= 65535")``.
    """

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {key or '<top>'}: {message}" for key, message in problems]
        super().__init__("\n".join(lines))


class StorageError(FionaError):
    """The spool could not store or move bytes."""


class OutOfSpaceError(StorageError):
    """Free space on the spool is below the configured minimum (PS3.4 status 0xA700)."""


class RoutingError(FionaError):
    """A study could not be routed."""


class DeidentificationError(FionaError):
    """A dataset could not be de-identified."""


class ForwardError(FionaError):
    """Delivery to a destination failed."""


class TransientForwardError(ForwardError):
    """Delivery failed for a reason that may pass; retry with backoff."""


class PermanentForwardError(ForwardError):
    """Delivery failed for a reason that will not pass without an operator."""

"""Operator logs: structlog JSON lines on stdout, with a PHI redaction step.

One canonical line per unit of work; context (association id, hashed study key) is bound
with :mod:`structlog.contextvars`. The redaction processor replaces the value of any key
that names a patient identifier, so a careless ``log.info(..., patient_name=...)`` can
never reach the log. Audit rows (the record of truth) live in the database, not here.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

__all__ = ["configure_logging", "get_logger", "redact_exception", "redact_phi"]

REDACTED = "[redacted]"

# Keys that may carry a patient identifier (DICOM keywords and snake_case spellings).
_PHI_KEY = re.compile(
    r"(patient_?(name|id|birth_?date|birth_?name|address|telephone)|"
    r"other_?patient|mothers?_?birth_?name|birth_?date|issuer_?of_?patient_?id)",
    re.IGNORECASE,
)


def redact_phi(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace the value of every key that names a patient identifier."""
    for key in list(event_dict):
        if _PHI_KEY.search(key):
            event_dict[key] = REDACTED
    return event_dict


def redact_exception(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Render an exception as its type and stack only.

    Exception messages can quote data (pydicom quotes an invalid value, and a PN value is
    PHI), so the message is never logged; the frames and the type locate the problem.
    """
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    exc_type, _exc, tb = exc_info
    if exc_type is None:
        return event_dict
    frames = "".join(traceback.format_tb(tb))
    event_dict["exception"] = f"{frames}{exc_type.__module__}.{exc_type.__qualname__}"
    return event_dict


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send structlog and stdlib logging (pynetdicom, alembic) as JSON lines to stdout."""
    stream = stream or sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_phi,
        redact_exception,
    ]
    structlog.configure(
        # filter_by_level first: a filtered-out debug call costs nothing further.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at DEBUG and each request at INFO: keep its warnings only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # pydicom's warnings can quote element values (a PN value is PHI); FIONA reports data
    # problems through its own checks, with reasons that never contain values.
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger for a module."""
    return structlog.stdlib.get_logger(name)

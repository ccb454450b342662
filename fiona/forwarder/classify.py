"""Every outcome of a delivery attempt, classified in one table.

=========  ===============================================================  ==================
kind       what                                                             then
=========  ===============================================================  ==================
success    0x0000                                                           delivered
warning    0xB000 coercion, 0xB006 elements discarded, 0xB007 data set       delivered, the
           does not match SOP class (and any other 0xBxxx / 0x0001)         warning recorded
transient  association rejected (transient), aborted, timed out, refused,   retry with
           no answer (pynetdicom's empty status), 0xA7xx out of resources,  exponential
           0xA700-0xA7FF, 0xFE00 cancel, an I/O error writing a folder      backoff + jitter
permanent  0xA9xx data set does not match SOP class, 0xCxxx cannot          FAILED with the
           understand, 0x0122 SOP class not supported, 0x0124 not           reason; an
           authorised, association rejected (permanent), no presentation    operator retries
           context the destination accepts, any other status                after the fix
=========  ===============================================================  ==================

Unknown statuses are permanent: retrying something nobody understands only hides it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Kind", "Outcome", "classify_status", "transport_failure"]


class Kind(enum.Enum):
    SUCCESS = "success"
    WARNING = "warning"
    TRANSIENT = "transient"
    PERMANENT = "permanent"

    @property
    def delivered(self) -> bool:
        return self in (Kind.SUCCESS, Kind.WARNING)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The class of one attempt: its kind, a short label (for the ledger) and the reason."""

    kind: Kind
    label: str
    reason: str
    status: int | None = None


_NAMED = {
    0x0000: (Kind.SUCCESS, "success", "stored"),
    0x0001: (Kind.WARNING, "warning", "warning (0x0001)"),
    0xB000: (Kind.WARNING, "warning", "coercion of data elements (0xB000)"),
    0xB006: (Kind.WARNING, "warning", "elements discarded (0xB006)"),
    0xB007: (Kind.WARNING, "warning", "data set does not match SOP class (0xB007)"),
    0x0122: (Kind.PERMANENT, "sop-class-not-supported", "SOP class not supported (0x0122)"),
    0x0124: (Kind.PERMANENT, "not-authorised", "not authorised (0x0124)"),
    0x0211: (Kind.PERMANENT, "unrecognised-operation", "unrecognised operation (0x0211)"),
    0xFE00: (Kind.TRANSIENT, "cancelled", "cancelled by the destination (0xFE00)"),
}


def classify_status(status: int | None) -> Outcome:
    """Classify a C-STORE response status (None: no response at all)."""
    if status is None:
        return Outcome(Kind.TRANSIENT, "no-response", "no response (aborted or timed out)")
    named = _NAMED.get(status)
    if named is not None:
        return Outcome(named[0], named[1], named[2], status)
    text = f"0x{status:04X}"
    if 0xA700 <= status <= 0xA7FF:
        return Outcome(Kind.TRANSIENT, "out-of-resources", f"out of resources ({text})", status)
    if 0xA900 <= status <= 0xA9FF:
        return Outcome(
            Kind.PERMANENT,
            "dataset-mismatch",
            f"data set does not match SOP class ({text})",
            status,
        )
    if 0xC000 <= status <= 0xCFFF:
        return Outcome(Kind.PERMANENT, "cannot-understand", f"cannot understand ({text})", status)
    if 0xB000 <= status <= 0xBFFF:
        return Outcome(Kind.WARNING, "warning", f"warning ({text})", status)
    return Outcome(Kind.PERMANENT, "unknown-status", f"unknown status {text}", status)


def transport_failure(label: str, reason: str, *, permanent: bool = False) -> Outcome:
    """An attempt that failed before or around the DIMSE exchange (association, socket, disk)."""
    return Outcome(Kind.PERMANENT if permanent else Kind.TRANSIENT, label, reason)

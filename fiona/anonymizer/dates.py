"""Date shifting for DA and DT values (TM values are never changed).

* ``YYYYMMDD`` moves by the offset in days; the old ACR-NEMA form ``YYYY.MM.DD`` is read too and
  written in the current form.
* DT keeps everything after the date part: the time, the fraction and the ``&ZZXX`` UTC offset.
  A DT with only a year (``YYYY``) or a year and month (``YYYYMM``) is shifted from the middle
  of that period (2 July, the 15th) and written back with the same precision, so a partial date
  never moves by more than the offset and never gains precision it did not have.
* Ranges (``A-B``) and multiple values (``A\\B``) shift value by value.
* A value that is not a date is dropped (empty), never copied through: it could be anything.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Final

__all__ = ["shift_da", "shift_dt"]

_DA: Final = re.compile(rb"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_DT: Final = re.compile(rb"^(\d{4})(\d{2})?(\d{2})?(.*)$", re.DOTALL)
_DT_REST: Final = re.compile(rb"^(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?([+-]\d{4})?$")


def _add(year: int, month: int, day: int, offset: int) -> dt.date | None:
    try:
        return dt.date(year, month, day) + dt.timedelta(days=offset)
    except (ValueError, OverflowError):
        return None


def _one_da(value: bytes, offset: int) -> bytes:
    match = _DA.match(value)
    if match is None:
        return b""
    new = _add(int(match[1]), int(match[2]), int(match[3]), offset)
    return b"" if new is None else b"%04d%02d%02d" % (new.year, new.month, new.day)


def _one_dt(value: bytes, offset: int) -> bytes:
    match = _DT.match(value)
    if match is None or _DT_REST.match(match[4]) is None:
        return b""
    year, month, day, rest = match[1], match[2], match[3], match[4]
    if month is None:
        new = _add(int(year), 7, 2, offset)
        return b"" if new is None else b"%04d" % new.year + rest
    if day is None:
        new = _add(int(year), int(month), 15, offset)
        return b"" if new is None else b"%04d%02d" % (new.year, new.month) + rest
    new = _add(int(year), int(month), int(day), offset)
    return b"" if new is None else b"%04d%02d%02d" % (new.year, new.month, new.day) + rest


def shift_da(value: bytes, offset: int) -> bytes:
    """Shift a DA value (unpadded result); ranges ``A-B`` shift both ends."""
    out = []
    for item in value.split(b"\\"):
        item = item.strip(b" \x00")
        if b"-" in item:
            out.append(
                b"-".join(_one_da(part, offset) if part else b"" for part in item.split(b"-"))
            )
        else:
            out.append(_one_da(item, offset) if item else b"")
    return b"\\".join(out)


def shift_dt(value: bytes, offset: int) -> bytes:
    """Shift a DT value (unpadded result); the time and UTC offset are kept."""
    out = []
    for item in value.split(b"\\"):
        item = item.strip(b" \x00")
        out.append(_one_dt(item, offset) if item else b"")
    return b"\\".join(out)

"""CID 7050 "De-identification Method": code value → code meaning, from pydicom's copy of PS3.16."""

from __future__ import annotations

from typing import Final

from pydicom.sr.codedict import codes

__all__ = ["METHOD_CODES"]


def _cid7050() -> dict[str, str]:
    found: dict[str, str] = {}
    for keyword in codes.DCM.dir("Option") + codes.DCM.dir("ConfidentialityProfile"):
        code = getattr(codes.DCM, keyword)
        if code.value.startswith("1131") and 113100 <= int(code.value) <= 113112:
            found[code.value] = code.meaning
    return dict(sorted(found.items()))


METHOD_CODES: Final[dict[str, str]] = _cid7050()

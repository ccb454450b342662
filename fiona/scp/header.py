"""Read the few header values the receive stage needs, without loading pixel data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

__all__ = ["HeaderError", "InstanceHeader", "read_header", "read_series_header"]


class HeaderError(ValueError):
    """The file is not a DICOM dataset FIONA can index (the reason is safe to log)."""


_INDEX_TAGS = [
    Tag(kw)
    for kw in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
    )
]

# Written to the per-series metadata file (FIONA convention, read by other tools).
SERIES_KEYWORDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "StudyDescription",
    "SeriesDescription",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
    "SeriesNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "BodyPartExamined",
    "ImageType",
)


@dataclass(frozen=True)
class InstanceHeader:
    """What the index records of one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00").strip()
    return text or None


def read_header(path: Path | str) -> InstanceHeader:
    """Read the UIDs and Modality of a DICOM file (Part 10, with file meta).

    Raises
    ------
    HeaderError
        The file cannot be parsed or lacks a Study/Series/SOP Instance UID.
    """
    try:
        ds = dcmread(
            path, stop_before_pixels=True, specific_tags=_INDEX_TAGS, defer_size="256 KB"
        )
    except (InvalidDicomError, EOFError) as exc:
        raise HeaderError(f"not a DICOM dataset: {type(exc).__name__}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt data
        raise HeaderError(f"cannot parse dataset: {type(exc).__name__}") from None
    try:
        values = {
            "sop_class_uid": _text(ds.get("SOPClassUID")),
            "sop_instance_uid": _text(ds.get("SOPInstanceUID")),
            "study_instance_uid": _text(ds.get("StudyInstanceUID")),
            "series_instance_uid": _text(ds.get("SeriesInstanceUID")),
            "modality": _text(ds.get("Modality")),
            "transfer_syntax_uid": _text(ds.file_meta.get("TransferSyntaxUID")),
        }
    except Exception as exc:  # noqa: BLE001 - value conversion of a corrupt element
        raise HeaderError(f"cannot parse dataset: {type(exc).__name__}") from None
    missing = [
        keyword
        for keyword, key in (
            ("StudyInstanceUID", "study_instance_uid"),
            ("SeriesInstanceUID", "series_instance_uid"),
            ("SOPInstanceUID", "sop_instance_uid"),
            ("SOPClassUID", "sop_class_uid"),
            ("TransferSyntaxUID", "transfer_syntax_uid"),
        )
        if not values[key]
    ]
    if missing:
        raise HeaderError(f"missing {', '.join(missing)}")
    return InstanceHeader(**values)  # type: ignore[arg-type]


def read_series_header(path: Path | str) -> dict[str, Any]:
    """Read the values of :data:`SERIES_KEYWORDS` from one instance, as JSON-able data."""
    ds = dcmread(
        path,
        stop_before_pixels=True,
        specific_tags=[Tag(kw) for kw in SERIES_KEYWORDS],
        defer_size="256 KB",
    )
    out: dict[str, Any] = {}
    for keyword in SERIES_KEYWORDS:
        if keyword not in ds:
            continue
        element = ds[keyword]
        value = element.value
        if element.VM > 1:
            out[keyword] = [str(v) for v in value]
        elif keyword == "SeriesNumber":
            out[keyword] = int(value) if value not in (None, "") else None
        else:
            out[keyword] = _text(value)
    return out

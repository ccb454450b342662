"""Read the few header values the receive stage needs, without loading pixel data."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from fiona.scp.spool import is_valid_uid

__all__ = ["HeaderError", "InstanceHeader", "read_header", "read_series_header"]


class HeaderError(ValueError):
    """The file is not a DICOM dataset FIONA can index (the reason is safe to log)."""


_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}

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
    accession_number: str | None = None
    patient_id: str | None = None
    study_date: str | None = None
    """Only to find the study by (kept as keyed hashes, never logged)."""


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00").strip()
    return text or None


def _check_pixel_data_complete(fp: BinaryIO, ds: Dataset, file_size: int) -> None:
    """Raise if the Pixel Data element's declared length runs past the end of the file.

    ``dcmread(stop_before_pixels=True)`` leaves `fp` at the pixel data element's tag;
    its header is decoded here (PS3.5 7.1) instead of reading the value.
    """
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or ts == DeflatedExplicitVRLittleEndian:
        return  # a deflated stream has no file offsets to compare
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return  # no pixel data (or nothing after the header)
    endian = "<" if ts.is_little_endian else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group, element) not in _PIXEL_TAGS:
        return
    if ts.is_implicit_VR:
        (length,) = struct.unpack(endian + "L", head[4:8])
        header = 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            raise HeaderError("truncated dataset: pixel data header is cut short")
        (length,) = struct.unpack(endian + "L", head[8:12])
        header = 12
    else:
        (length,) = struct.unpack(endian + "H", head[6:8])
        header = 8
    if length != 0xFFFFFFFF and start + header + length > file_size:
        raise HeaderError("truncated dataset: Pixel Data is shorter than its length")


def read_header(path: Path | str) -> InstanceHeader:
    """Read the UIDs and Modality of a DICOM file (Part 10, with file meta).

    Raises
    ------
    HeaderError
        The file cannot be parsed or lacks a Study/Series/SOP Instance UID.
    """
    try:
        with open(path, "rb") as fp:
            ds = dcmread(fp, stop_before_pixels=True)
            _check_pixel_data_complete(fp, ds, os.fstat(fp.fileno()).st_size)
    except HeaderError:
        raise
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
            "accession_number": _text(ds.get("AccessionNumber")),
            "patient_id": _text(ds.get("PatientID")),
            "study_date": _text(ds.get("StudyDate")),
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


def checked_header(path: Path | str) -> InstanceHeader:
    """:func:`read_header`, and the Study, Series and SOP Instance UIDs must be valid UIDs.

    What a C-STORE (or an import, or a quarantine release) must pass; HeaderError otherwise.
    """
    header = read_header(path)
    bad = [
        name
        for name, uid in (
            ("StudyInstanceUID", header.study_instance_uid),
            ("SeriesInstanceUID", header.series_instance_uid),
            ("SOPInstanceUID", header.sop_instance_uid),
        )
        if not is_valid_uid(uid)
    ]
    if bad:
        raise HeaderError(f"invalid {', '.join(bad)}")
    return header

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
from pydicom.uid import AllTransferSyntaxes, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

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
            scanned = _scan_header(fp, os.fstat(fp.fileno()).st_size)
    except OSError:
        scanned = None  # pydicom's read below reports it
    values = _read_with_pydicom(path) if scanned is None else scanned
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


def _read_with_pydicom(path: Path | str) -> dict[str, str | None]:
    """The values :func:`read_header` needs, read by pydicom (any encoding it can read)."""
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
        values: dict[str, str | None] = {
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
    return values


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


# -- the fast path: a plain scan of the bytes for the values read_header needs ----------------
#
# pydicom's dcmread builds a Dataset of every element before the pixel data (~0.5 ms for a
# typical 140-element CT header): a third of the receiving thread's own time per instance.
# The scan below reads only what the index needs from the common encodings (Part 10 file with
# preamble, little endian, explicit or implicit VR, not deflated) and hands anything it does not
# fully understand — or any value pydicom would render differently — to pydicom: it may only
# ever decline, never answer differently (tests/unit/test_header.py compares the two).

_IMPLICIT_LE = "1.2.840.10008.1.2"
_SCAN_TRANSFER_SYNTAXES = frozenset(
    str(uid) for uid in AllTransferSyntaxes if uid.is_little_endian and not uid.is_deflated
)
# tag -> (InstanceHeader field, the VR it is read with). An explicit VR that differs would
# make pydicom read another type: the scan declines. Specific Character Set is no field, but
# pydicom reads it to decode any text, so its VR is checked too.
_WANTED: dict[int, tuple[str | None, bytes]] = {
    0x00080005: (None, b"CS"),
    0x00080016: ("sop_class_uid", b"UI"),
    0x00080018: ("sop_instance_uid", b"UI"),
    0x00080020: ("study_date", b"DA"),
    0x00080050: ("accession_number", b"SH"),
    0x00080060: ("modality", b"CS"),
    0x00100020: ("patient_id", b"LO"),
    0x0020000D: ("study_instance_uid", b"UI"),
    0x0020000E: ("series_instance_uid", b"UI"),
}
_PIXEL_TAG_INTS = frozenset(group << 16 | element for group, element in _PIXEL_TAGS)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_READ_SIZE = 65536
_MAX_SCAN = 16 * 1024 * 1024
_UNPACK_TAG_LENGTH = struct.Struct("<HHL").unpack_from  # implicit VR element header
_UNPACK_EXPLICIT = struct.Struct("<HH2sH").unpack_from  # explicit VR, short form
_UNPACK_UL = struct.Struct("<L").unpack_from
_VR_NAMES = frozenset(vr.value.encode() for vr in VR)


class _DeclineError(Exception):
    """The scan does not handle this file; pydicom decides."""


class _Buffer:
    """The file's leading bytes, read further on demand (the header only, in practice)."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp = fp
        self.size = size
        self.data = fp.read(min(size, _READ_SIZE))

    def need(self, end: int) -> bytes:
        """The buffer, holding at least `end` bytes; decline if the file is shorter."""
        if end > len(self.data):
            if end > self.size or end > _MAX_SCAN:
                raise _DeclineError
            self.data += self.fp.read(max(end - len(self.data), _READ_SIZE))
            if end > len(self.data):
                raise _DeclineError
        return self.data


def _value_text(raw: bytes) -> str | None:
    """A value as pydicom's ``str()`` of it would read after :func:`_text`, or decline."""
    text = raw.rstrip(b"\x00 ").lstrip(b" ")
    if not text:
        return None
    if b"\\" in text or max(text) > 0x7E or min(text) < 0x20:
        raise _DeclineError  # several values, or text whose character set matters
    return text.decode("ascii")


def _scan_elements(
    buf: _Buffer, pos: int, implicit: bool, top: bool, found: dict[str, str | None]
) -> int:
    """Walk the elements from `pos`; return where the walk ended.

    At the top level the walk ends at the pixel data (checked to be complete) or the end of
    the file; inside an item it ends after the item delimiter.
    """
    while True:
        if top and pos == buf.size:
            return pos
        data = buf.need(pos + 8)
        if implicit:
            group, element, length = _UNPACK_TAG_LENGTH(data, pos)
            tag = group << 16 | element
            header = 8
            vr = b"SQ" if length == _UNDEFINED else b""
        else:
            group, element, vr, length = _UNPACK_EXPLICIT(data, pos)
            tag = group << 16 | element
            if tag in (_ITEM_END, _SEQUENCE_END, _ITEM):
                (length,) = _UNPACK_UL(data, pos + 4)
                header, vr = 8, b""
            elif vr in _LONG_VRS:
                (length,) = _UNPACK_UL(buf.need(pos + 12), pos + 8)
                header = 12
            elif vr in _VR_NAMES:
                header = 8
            else:
                raise _DeclineError  # not a VR pydicom knows: it decides what that means
        if tag == _ITEM_END and not top:
            if length != 0:
                raise _DeclineError
            return pos + 8
        if group == 0xFFFE or group == 0x0002:
            raise _DeclineError  # a stray delimiter, or file meta inside the dataset
        if top and tag in _PIXEL_TAG_INTS:
            if length != _UNDEFINED and pos + header + length > buf.size:
                raise _DeclineError  # truncated: pydicom's read names the problem
            return pos
        pos += header
        if length == _UNDEFINED:
            if vr != b"SQ" or tag in _WANTED:
                raise _DeclineError  # undefined-length UN and the like: pydicom's business
            pos = _scan_sequence(buf, pos, implicit)
            continue
        wanted = _WANTED.get(tag) if top else None
        if wanted is not None:
            name, wanted_vr = wanted
            if not implicit and vr != wanted_vr:
                raise _DeclineError
            if name is not None:
                found[name] = _value_text(buf.need(pos + length)[pos : pos + length])
        if pos + length > buf.size:
            raise _DeclineError
        pos += length


def _scan_sequence(buf: _Buffer, pos: int, implicit: bool) -> int:
    """Skip the items of an undefined-length sequence; return the position after it."""
    while True:
        group, element, length = _UNPACK_TAG_LENGTH(buf.need(pos + 8), pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            if length != 0:
                raise _DeclineError
            return pos
        if tag != _ITEM:
            raise _DeclineError
        if length == _UNDEFINED:
            pos = _scan_elements(buf, pos, implicit, False, {})
        else:
            pos += length
            if pos > buf.size:
                raise _DeclineError


def _scan_header(fp: BinaryIO, size: int) -> dict[str, str | None] | None:
    """The :class:`InstanceHeader` values of a common file, or None to let pydicom read it."""
    try:
        buf = _Buffer(fp, size)
        data = buf.need(132 + 12)
        if data[128:132] != b"DICM":
            return None
        pos = 132
        transfer_syntax: str | None = None
        while True:  # the file meta group: always explicit VR little endian
            group, element, vr, length = _UNPACK_EXPLICIT(buf.need(pos + 8), pos)
            if group != 0x0002:
                break
            if vr in _LONG_VRS:
                (length,) = _UNPACK_UL(buf.need(pos + 12), pos + 8)
                pos += 12
            elif vr in _VR_NAMES:
                pos += 8
            else:
                return None
            if length == _UNDEFINED:
                return None
            if element == 0x0010:
                if vr != b"UI":
                    return None
                transfer_syntax = _value_text(buf.need(pos + length)[pos : pos + length])
            pos += length
        if transfer_syntax not in _SCAN_TRANSFER_SYNTAXES:
            return None
        implicit = transfer_syntax == _IMPLICIT_LE
        if implicit and pos + 6 <= size and buf.need(pos + 6)[pos + 4 : pos + 6] in _VR_NAMES:
            return None  # looks explicit after all: pydicom guesses, the scan does not
        found: dict[str, str | None] = {name: None for name, _ in _WANTED.values() if name}
        _scan_elements(buf, pos, implicit, True, found)
    except (_DeclineError, struct.error):
        return None
    found["transfer_syntax_uid"] = transfer_syntax
    return found

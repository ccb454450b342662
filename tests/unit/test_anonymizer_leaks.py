"""Leak scanner: a unique marker in every text element of real inputs; none may reach the output
unless the profile keeps that element.

The inputs are pydicom's bundled test files (nobody on the team wrote them): CT, MR, RT, SR,
compressed, big endian, implicit VR, deflated, private sequences and the character set samples.
Every text element (SH, LO, ST, LT, UT, UC, PN; and private elements whose VR nobody knows) at
every depth gets a marker, written in the file's own character set with a character of that set
around an ASCII core (``ZQ0042X``). The output is searched twice: its raw bytes (inflated when
deflated) and its decoded values.
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from fionatest import TEST_SECRET, dicom_bytes, read_dicom, walk
from pydicom import Dataset, config, dcmread
from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import private_dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pydicom.values import convert_SQ

from fiona.anonymizer import Action, Context, Profile, anonymize_bytes, load_profile, make_scheme

PROFILES = {name: load_profile(name) for name in ("mmiv", "dzhk", "basic")}
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
SAMPLES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "rtstruct.dcm",
    "rtplan.dcm",
    "rtdose.dcm",
    "test-SR.dcm",
    "reportsi.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
    "image_dfl.dcm",
    "priv_SQ.dcm",
    "nested_priv_SQ.dcm",
    "UN_sequence.dcm",
    "waveform_ecg.dcm",
    "examples_overlay.dcm",
)
CHARSET_SAMPLES = (
    "chrArab.dcm",
    "chrFren.dcm",
    "chrFrenMulti.dcm",
    "chrGerm.dcm",
    "chrGreek.dcm",
    "chrH31.dcm",
    "chrH32.dcm",
    "chrHbrw.dcm",
    "chrI2.dcm",
    "chrJapMulti.dcm",
    "chrJapMultiExplicitIR6.dcm",
    "chrKoreanMulti.dcm",
    "chrRuss.dcm",
    "chrSQEncoding.dcm",
    "chrSQEncoding1.dcm",
    "chrX1.dcm",
    "chrX2.dcm",
)
# Characters tried, most exotic first, to put a non-ASCII character of the file's own character
# set around each marker.
DECORATIONS = ("山", "김", "中", "Я", "Ω", "ع", "ש", "é")
ALWAYS_GONE = ("PatientName", "PatientID", "OtherPatientIDs", "ReferringPhysicianName")
ALWAYS_GONE_TAGS = frozenset(int(Tag(keyword)) for keyword in (*ALWAYS_GONE, "InstitutionAddress"))
LEAK_CREATOR = "FIONA LEAK TEST 1.0"
MITRA = "MITRA OBJECT UTF8 ATTRIBUTES 1.0"
ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root: synthetic UIDs only
PRIVATE_NAMES = frozenset(
    {(0x0029, LEAK_CREATOR, 0x03), (0x0033, MITRA, 0x02), (0x0033, MITRA, 0x13)}
)


def _sample(name: str) -> Path:
    if name.startswith("chr"):
        found = get_charset_files(name)
        assert found, f"pydicom charset file {name} is not bundled"
        return Path(found[0])
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not bundled"
    return Path(path)


@dataclass(frozen=True)
class Marker:
    core: str  # the ASCII core searched for
    tag: int
    key: tuple[int, str, int] | None  # (group, creator, element low byte) of a private element
    where: str
    kept: bool  # whether the profile keeps the element (and every sequence above it)


@dataclass(frozen=True)
class _Level:
    """What the walk knows at one depth: the character sets and the private creators."""

    encodings: list[str]
    creators: dict[tuple[int, int], str]


def _decoration(encodings: list[str]) -> str:
    if not encodings:
        return ""
    for char in DECORATIONS:
        with warnings.catch_warnings():
            # pydicom warns (and replaces) where it cannot encode; only that is an error here
            warnings.simplefilter("error", UserWarning)
            try:
                encoded = encode_string(char, encodings)
            except (UserWarning, UnicodeError, LookupError, ValueError):
                continue
        if decode_bytes(encoded, encodings, set()) == char:
            return char
    return ""


def _encodings(ds: Dataset, inherited: list[str]) -> list[str]:
    if "SpecificCharacterSet" not in ds:
        return inherited
    value = ds.SpecificCharacterSet
    names = [value] if isinstance(value, str) else list(value)
    if names == [""]:
        return []
    return convert_encodings(names)


def _creators(ds: Dataset) -> dict[tuple[int, int], str]:
    return {
        (elem.tag.group, elem.tag.element): str(elem.value).strip()
        for elem in ds
        if elem.tag.is_private_creator
    }


def _looks_like_sequence(elem: DataElement) -> bool:
    return (
        elem.VR == "UN"
        and isinstance(elem.value, bytes)
        and elem.value.startswith(b"\xfe\xff\x00\xe0")
    )


def _un_sequences_to_sq(ds: Dataset) -> None:
    """UN values that hold an (implicit VR) sequence become sequences, to plant inside them."""
    for elem in list(ds):
        if _looks_like_sequence(elem):
            ds[elem.tag] = DataElement(
                elem.tag, "SQ", convert_SQ(elem.value, is_implicit_VR=True, is_little_endian=True)
            )
            elem = ds[elem.tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _un_sequences_to_sq(item)


def _add_identity(ds: Dataset, explicit: bool) -> None:
    """Elements every profile must clear, at the top level and nested, plus private blocks."""
    for keyword in (*ALWAYS_GONE, "InstitutionAddress", "StudyDescription", "InstitutionName"):
        if keyword not in ds:
            setattr(ds, keyword, "x")
    block = ds.private_block(0x0029, LEAK_CREATOR, create=True)
    block.add_new(0x01, "LO", "x")
    block.add_new(0x02, "UT", "x")
    if explicit:
        block.add_new(0x03, "PN", "x")  # a person name by its encoded VR
    mitra = ds.private_block(0x0033, MITRA, create=True)
    mitra.add_new(0x02, "PN", "x")  # a person name by pydicom's private dictionary
    mitra.add_new(0x13, "PN", "x")  # mmiv's private_remove
    item = Dataset()
    item.CodeValue = "T-D0050"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "x"
    item.PatientName = "x"
    item.private_block(0x0029, LEAK_CREATOR, create=True).add_new(0x01, "LO", "x")
    ds.AnatomicRegionSequence = Sequence([item])


def _prepared(name: str) -> Dataset:
    ds = dcmread(_sample(name), force=True)
    meta = ds.file_meta  # rtstruct.dcm is a bare dataset, nested_priv_SQ.dcm has no classes
    if not meta.get("TransferSyntaxUID"):
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if not meta.get("MediaStorageSOPClassUID"):
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", SecondaryCaptureImageStorage)
    if not meta.get("MediaStorageSOPInstanceUID"):
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", f"{ROOT}{len(name)}")
    _un_sequences_to_sq(ds)
    _add_identity(ds, not ds.file_meta.TransferSyntaxUID.is_implicit_VR)
    return ds


def _sequence_kept(profile: Profile, elem: DataElement, creator: str | None) -> bool:
    """Whether the engine keeps the sequence *elem* and recurses into it."""
    if elem.tag.is_private:
        return _private_kept(profile, elem, creator)
    rule = profile.rules.get(int(elem.tag))
    if rule is None:
        return _public_default_kept(profile, int(elem.tag))
    return rule.action in (Action.KEEP, Action.CLEAN)


def _public_default_kept(profile: Profile, tag: int) -> bool:
    group = tag >> 16
    if 0x6000 <= group <= 0x601E:
        return not profile.remove_overlays
    if 0x5000 <= group <= 0x501E:
        return not profile.remove_curves
    return not profile.default_remove


def _private_kept(profile: Profile, elem: DataElement, creator: str | None) -> bool:
    """The private policy as rules/profiles/README.md states it."""
    if profile.private_policy == "remove" or creator is None:
        return False
    key = (elem.tag.group, creator, elem.tag.element & 0xFF)
    if key in profile.private_safelist:
        return True
    if profile.private_policy != "keep" or key in profile.private_remove:
        return False
    try:
        known = private_dictionary_VR(int(elem.tag), creator)
    except KeyError:
        known = None
    return elem.VR != "PN" and known != "PN"


def _text_kept(profile: Profile, elem: DataElement, creator: str | None) -> bool:
    if elem.tag.is_private:
        return _private_kept(profile, elem, creator)
    rule = profile.rules.get(int(elem.tag))
    if rule is None:
        return _public_default_kept(profile, int(elem.tag))
    return rule.action == Action.KEEP


def _plant(ds: Dataset, profile: Profile) -> list[Marker]:
    """Put a marker into every text element of *ds* (in place); returns them with their fate."""
    markers: list[Marker] = []

    def visit(item: Dataset, encodings: list[str], path: str, kept: bool) -> None:
        encodings = _encodings(item, encodings)
        decoration = _decoration(encodings)
        creators = _creators(item)
        for elem in item:
            creator = None
            if elem.tag.is_private and not elem.tag.is_private_creator:
                creator = creators.get((elem.tag.group, elem.tag.element >> 8))
            where = f"{path}{elem.tag}"
            if elem.VR == "SQ":
                inner = kept and _sequence_kept(profile, elem, creator)
                for index, child in enumerate(elem.value):
                    visit(child, encodings, f"{where}[{index}].", inner)
                continue
            if elem.tag.is_private_creator or elem.tag == 0x00080005:
                continue
            core = f"ZQ{len(markers):04d}X"
            if elem.VR in TEXT_VRS:
                elem.value = f"{decoration}{core}{decoration}"
                if elem.VR == "PN":
                    elem.value = f"{core}^{decoration or 'Q'}"
            elif elem.VR == "UN" and elem.tag.is_private:
                elem.value = core.encode("ascii") + b" "
            else:
                continue
            alive = kept and _text_kept(profile, elem, creator)
            key = None
            if creator is not None:
                key = (elem.tag.group, creator, elem.tag.element & 0xFF)
            markers.append(Marker(core, int(elem.tag), key, where, alive))

    visit(ds, [], "", True)
    return markers


def _dataset_bytes(data: bytes) -> bytes:
    """The encoded dataset of Part 10 *data*, inflated when deflated."""
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=[])
    start = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    body = data[start:]
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    return body


def _decoded_text(data: bytes) -> str:
    parts = []
    for _path, elem in walk(read_dicom(data)):
        value = elem.value
        if isinstance(value, bytes):
            parts.append(value.decode("latin-1"))
        elif elem.VR != "SQ":
            parts.append(str(value))
    return "\n".join(parts)


@pytest.fixture(autouse=True)
def _lenient_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """The samples are not all valid (and values are compared, not validated, here)."""
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)


def _context() -> Context:
    return Context(
        project="LEAKTEST",
        pseudonym="PSEUDO-0001",
        scheme=make_scheme("hmac", "LEAKTEST", secret=TEST_SECRET),
        date_offset_days=42,
    )


@pytest.mark.parametrize("profile_name", sorted(PROFILES))
@pytest.mark.parametrize("name", SAMPLES + CHARSET_SAMPLES)
def test_no_marker_leaks_unless_the_profile_keeps_its_element(name: str, profile_name: str) -> None:
    profile = PROFILES[profile_name]
    ds = _prepared(name)
    if name in CHARSET_SAMPLES:  # the markers there carry a character of the file's own set
        assert _decoration(_encodings(ds, [])) != ""
    markers = _plant(ds, profile)
    source = dicom_bytes(ds)
    planted = _dataset_bytes(source)
    for marker in markers:  # the scanner sees what it planted
        assert marker.core.encode("ascii") in planted, marker
    out = anonymize_bytes(source, profile, _context()).data
    raw = _dataset_bytes(out)
    text = _decoded_text(out)
    leaks = [m for m in markers if not m.kept and (m.core.encode() in raw or m.core in text)]
    assert leaks == []
    lost = [m for m in markers if m.kept and m.core not in text]
    assert lost == []  # what the profile keeps is kept, so the scan above sees real values
    assert any(m.kept for m in markers)
    gone = [m for m in markers if m.tag in ALWAYS_GONE_TAGS]
    assert len(gone) >= 6  # the five identity elements at the top, PatientName nested
    assert not any(m.kept for m in gone)


def test_private_person_names_never_survive_private_tags_keep() -> None:
    """mmiv keeps private tags, but not a private PN (encoded PN, or PN in the dictionary)."""
    profile = PROFILES["mmiv"]
    assert profile.private_policy == "keep"
    for name in ("CT_small.dcm", "MR_small_implicit.dcm"):
        ds = _prepared(name)
        markers = _plant(ds, profile)
        out = anonymize_bytes(dicom_bytes(ds), profile, _context()).data
        raw = _dataset_bytes(out)
        names = [m for m in markers if m.key in PRIVATE_NAMES]
        kept_private = [m for m in markers if m.key == (0x0029, LEAK_CREATOR, 0x01)]
        assert names and kept_private, name
        for marker in names:
            assert marker.core.encode() not in raw, (name, marker)
        for marker in kept_private:  # the rest of the block is kept
            assert marker.core.encode() in raw, (name, marker)

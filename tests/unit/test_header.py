"""The receive path's header read: the byte scan must agree with pydicom or decline.

`read_header` scans common files itself (a third of the receiving thread's time went to
pydicom's full header parse) and hands everything else to pydicom. A scan that answered
differently from pydicom would index wrong UIDs, so every file pydicom ships, and seeded
mutations of them, are read both ways.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from pathlib import Path

import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from fiona.scp.header import HeaderError, _read_with_pydicom, _scan_header, read_header

# Reporting a failing example, the Hypothesis plugin imports its patch writer (libcst, which
# warns on import): import it now, quietly, so that a failure reads as one and not as an error.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def scan(path: Path) -> dict[str, str | None] | None:
    with open(path, "rb") as fp:
        return _scan_header(fp, os.fstat(fp.fileno()).st_size)


def pydicom_values(path: Path) -> dict[str, str | None] | HeaderError:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _read_with_pydicom(path)
        except HeaderError as exc:
            return exc


def package_files() -> list[Path]:
    return sorted(p for p in TEST_FILES.rglob("*") if p.is_file() and p.suffix != ".py")


def test_the_scan_agrees_with_pydicom_on_every_file_pydicom_ships() -> None:
    scanned = 0
    for path in package_files():
        fast = scan(path)
        if fast is None:
            continue
        scanned += 1
        assert fast == pydicom_values(path), path.name
    assert scanned > 0


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",  # implicit VR little endian
        "JPEG2000.dcm",  # encapsulated pixel data
        "rtplan.dcm",  # nested sequences
        "nested_priv_SQ.dcm",  # private undefined-length sequences
    ],
)
def test_common_encodings_take_the_scan(name: str) -> None:
    fast = scan(TEST_FILES / name)
    assert fast is not None
    assert fast == pydicom_values(TEST_FILES / name)


@pytest.mark.parametrize(
    "name",
    [
        "image_dfl.dcm",  # deflated: only pydicom inflates
        "MR_small_bigendian.dcm",  # big endian
        "ExplVR_LitEndNoMeta.dcm",  # no preamble or file meta
    ],
)
def test_other_encodings_go_to_pydicom(name: str) -> None:
    path = TEST_FILES / name
    assert scan(path) is None
    expected = pydicom_values(path)
    if isinstance(expected, HeaderError):  # no file meta: not a Part 10 file
        with pytest.raises(HeaderError, match="not a DICOM dataset"):
            read_header(path)
    else:
        assert read_header(path).sop_instance_uid == expected["sop_instance_uid"]


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "nested_priv_SQ.dcm"]
)
def test_damaged_files_are_never_read_differently(name: str, tmp_path: Path) -> None:
    """Truncations, flipped bytes and cut-out bytes in the header: scan == pydicom, or decline."""
    original = (TEST_FILES / name).read_bytes()
    rng = random.Random(name)
    header_end = min(len(original), 4000)
    target = tmp_path / "damaged.dcm"
    agreed = 0
    for _ in range(150):
        data = bytearray(original)
        kind = rng.random()
        if kind < 0.3:
            del data[rng.randrange(len(data)) :]
        elif kind < 0.8:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(128, header_end)] = rng.randrange(256)
        else:
            start = rng.randrange(132, header_end)
            del data[start : start + rng.randint(1, 8)]
        target.write_bytes(bytes(data))
        fast = scan(target)
        if fast is not None:
            assert fast == pydicom_values(target), (kind, len(data))
            agreed += 1
    assert agreed > 0


def write(tmp_path: Path, drop: str = "", **values: object) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    if drop:
        delattr(ds, drop)
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_text_whose_character_set_matters_is_read_by_pydicom(tmp_path: Path) -> None:
    path = write(tmp_path, SpecificCharacterSet="ISO_IR 100", PatientID="MÜLLER-1")
    assert scan(path) is None
    assert read_header(path).patient_id == "MÜLLER-1"


def test_values_are_trimmed_as_pydicom_trims_them(tmp_path: Path) -> None:
    path = write(tmp_path, PatientID=" P 1 ", AccessionNumber="", StudyDate="20240131")
    fast = scan(path)
    assert fast is not None
    assert fast == pydicom_values(path)
    assert (fast["patient_id"], fast["accession_number"], fast["study_date"]) == (
        "P 1",
        None,
        "20240131",
    )


def test_a_missing_uid_and_a_cut_pixel_data_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, drop="SeriesInstanceUID")
    assert scan(path) == {**pydicom_values(path), "series_instance_uid": None}
    with pytest.raises(HeaderError, match="missing SeriesInstanceUID"):
        read_header(path)

    cut = tmp_path / "cut.dcm"
    cut.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes()[:-1000])
    with pytest.raises(HeaderError, match="Pixel Data is shorter"):
        read_header(cut)


# -- generated datasets: the scan and pydicom, element by element ------------------------------

_PLAIN = st.text(alphabet=st.sampled_from("0123456789.ABCXYZ^-_ "), min_size=0, max_size=20)
_AWKWARD = st.one_of(
    _PLAIN,
    st.sampled_from(["A\\B", "MÜLLER", " X", "X ", "", "1.2.3\x00", "\t9"]),
)
_WANTED_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyDate",
    "AccessionNumber",
    "Modality",
    "PatientID",
)


def _items(depth: int) -> st.SearchStrategy[list[Dataset]]:
    def item(values: tuple[str, bool, list[Dataset]]) -> Dataset:
        text, undefined, nested = values
        ds = Dataset()
        ds.CodeValue = text or "X"
        ds.StudyInstanceUID = "1.2.3.999"  # nested: must never be taken for the top-level one
        if nested:
            ds.ContentSequence = nested
            ds.ContentSequence.is_undefined_length = undefined
        ds.is_undefined_length_sequence_item = undefined
        return ds

    nested = _items(depth - 1) if depth > 0 else st.just([])
    return st.lists(st.tuples(_PLAIN, st.booleans(), nested).map(item), max_size=2)


def _generated_file(
    tmp_path: Path, data: st.DataObject, *, implicit: bool, awkward: bool, pixels: bool
) -> Path | None:
    ds = Dataset()
    text = _AWKWARD if awkward else _PLAIN
    for keyword in _WANTED_KEYWORDS:
        present = data.draw(st.booleans(), label=f"has {keyword}")
        if present or (keyword.endswith("UID") and not awkward):
            value = data.draw(text, label=keyword)
            if keyword.endswith("UID") and not awkward:
                value = "1.2." + "".join(c for c in value if c.isdigit()) + "9"
            setattr(ds, keyword, value)
    if awkward and data.draw(st.booleans(), label="latin-1"):
        ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = data.draw(_PLAIN, label="name")
    # before the UIDs (group 0008) and after them (group 0040), so that a nested value taken
    # for a top-level one would show
    for keyword in ("ReferencedImageSequence", "ContentSequence"):
        items = data.draw(_items(2), label=keyword)
        if items:
            setattr(ds, keyword, items)
            ds[keyword].is_undefined_length = data.draw(st.booleans())
    ds.add_new(0x00090010, "LO", "FIONA TEST")
    ds.add_new(0x00091001, "OB", bytes(data.draw(st.integers(0, 300))))
    if pixels:
        ds.Rows, ds.Columns, ds.BitsAllocated = 4, 4, 16
        ds.PixelData = bytes(32)
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    path = tmp_path / "generated.dcm"
    try:
        ds.save_as(path, enforce_file_format=True)
    except (ValueError, UnicodeError):
        return None
    return path


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    implicit=st.booleans(),
    awkward=st.booleans(),
    pixels=st.booleans(),
)
def test_generated_datasets_read_the_same_both_ways(
    tmp_path: Path, data: st.DataObject, implicit: bool, awkward: bool, pixels: bool
) -> None:
    """Random headers (present/absent/odd values, nested sequences of either length form,
    private blocks, implicit or explicit VR): the scan equals pydicom or declines — and it
    does answer for plain values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values on purpose
        path = _generated_file(tmp_path, data, implicit=implicit, awkward=awkward, pixels=pixels)
    if path is None:
        return  # pydicom refuses to write this value: nothing to compare
    fast = scan(path)
    if fast is not None:
        assert fast == pydicom_values(path)
    if not awkward:
        assert fast is not None

#!/usr/bin/env python3
"""De-identification benchmark: FIONA's ``mmiv`` profile vs a plain pydicom loop (issue 3).

Runs over a synthetic CT corpus (default 2,000 instances of 512x512 16-bit, ~0.53 MB each,
with a realistic header: patient, study and series attributes, a ReferencedImageSequence and
other sequences, Siemens-, SECTRA- and MITRA-like private blocks, dates, times and a DT). Every
file is read from disk (the page cache, warmed first) and its de-identified Part 10 bytes are
produced in RAM, kept until the next file and then discarded: the MMIV C++ tool's reference
figure (~2,500 files/s single-threaded) is "output in RAM" too.

Variants:

``fiona``
    ``anonymize_bytes(open(f).read(), load_profile("mmiv"), Context(...))`` with the ``mmiv``
    UID scheme and a +42-day offset: the whole profile, at every depth.
``pydicom``
    ``dcmread(path)`` of the full file, the core edits by hand (PatientName/PatientID, the
    study, series, SOP, frame of reference and referenced SOP UIDs hashed (SHA-256), StudyID
    and AccessionNumber hashed, a few dates shifted, a few elements emptied or removed,
    InstitutionName set), ``save_as`` into a ``BytesIO``.
``pydicom-splice``
    The same edits on ``dcmread(..., stop_before_pixels=True)`` of the file's bytes, the
    header written by pydicom and the pixel data element appended as bytes.
``pydicom-defer``
    The same edits on ``dcmread(path, defer_size="64 KB")``; pydicom reads the deferred pixel
    data back from the file when it writes.

Each variant runs in fresh worker processes, once with one worker over the whole corpus and
once with two workers splitting it, alternately over ``--rounds`` rounds (the variant order
rotates from round to round). Each worker first processes ``--warmup`` files of its share
untimed, then waits at a barrier; the rate is files / (last worker's end - first worker's
start). CPU ms/file is the workers' ``process_time``. Before timing, every variant's output for
one file is read back with pydicom and checked (pseudonym written, UIDs changed, pixel data
byte-identical, identifying private elements gone where the variant removes them).

Usage::

    python bench/anonymize.py --count 2000 --rounds 3
    python bench/anonymize.py --count 2000 --rounds 3 --json bench/out/anonymize.json
    python bench/anonymize.py --count 500 --cprofile 30   # cProfile the FIONA loop, one process

The corpus is cached in ``--corpus`` (default ``$TMPDIR/fiona-bench-anonymize-corpus``) and
reused across runs. All values are synthetic: names ``BENCH^...``, UIDs under ``2.25.``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import io
import json
import multiprocessing as mp
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:  # bench/receive.py's helpers
    sys.path.insert(0, str(HERE))

from receive import git_state  # noqa: E402

DEFAULT_CORPUS = Path(tempfile.gettempdir()) / "fiona-bench-anonymize-corpus"
CORPUS_VERSION = 1
ALL_VARIANTS = ("fiona", "pydicom", "pydicom-splice", "pydicom-defer")
PROJECT = "BENCHPROJ"
PSEUDONYM = "BENCHPROJ0001"
DATE_OFFSET = 42
REFERENCE_FILES_PER_S = 2500  # MMIV C++ DICOMAnonymizer, one thread, output in RAM (issue 3)
TARGET_FILES_PER_S = 1500  # issue 3: per core

Runner = Callable[[str], bytes]


# -- corpus -----------------------------------------------------------------------------


def _header_template() -> Any:
    """The per-corpus part of a CT header (per-instance values are set in make_corpus)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"]
    ds.InstanceCreationDate = "20240101"
    ds.InstanceCreationTime = "121502.123000"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = "20240101"
    ds.SeriesDate = "20240101"
    ds.AcquisitionDate = "20240101"
    ds.ContentDate = "20240101"
    ds.AcquisitionDateTime = "20240101121455.250000"
    ds.StudyTime = "120512.000000"
    ds.SeriesTime = "121440.512000"
    ds.AcquisitionTime = "121455.250000"
    ds.ContentTime = "121455.250000"
    ds.AccessionNumber = "BENCHACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "SYNTHETIC"
    ds.InstitutionName = "SYNTHETIC HOSPITAL"
    ds.InstitutionAddress = "1 Synthetic Street^^Nowhere^^0000^XX"
    ds.ReferringPhysicianName = "BENCH^REFERRER"
    ds.StationName = "SYNTHCT01"
    ds.StudyDescription = "CT THORAX (synthetic)"
    code = Dataset()
    code.CodeValue = "BENCH01"
    code.CodingSchemeDesignator = "99SYNTH"
    code.CodeMeaning = "CT Thorax synthetic"
    ds.ProcedureCodeSequence = Sequence([code])
    ds.SeriesDescription = "Thorax 1.0 Br40 (synthetic)"
    ds.InstitutionalDepartmentName = "SYNTHETIC RADIOLOGY"
    ds.PerformingPhysicianName = "BENCH^PERFORMER"
    ds.OperatorsName = "BENCH^OPERATOR"
    ds.ManufacturerModelName = "SYNTHETIC CT 128"
    ds.PatientName = "BENCH^SYNTHETIC^PATIENT"
    ds.PatientID = "BENCH0001"
    ds.IssuerOfPatientID = "BENCH ISSUER"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.OtherPatientIDs = "BENCH0001X"
    ds.PatientAge = "054Y"
    ds.PatientSize = 1.75
    ds.PatientWeight = 70.0
    ds.PatientAddress = "2 Synthetic Road^^Nowhere"
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL_CT"
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.DataCollectionDiameter = 500
    ds.DeviceSerialNumber = "00000"
    ds.SoftwareVersions = "SYNTH 1.0"
    ds.ProtocolName = "Thorax_synthetic"
    ds.ReconstructionDiameter = 360
    ds.DistanceSourceToDetector = 1085.6
    ds.DistanceSourceToPatient = 595
    ds.GantryDetectorTilt = 0
    ds.TableHeight = 150
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = 220
    ds.Exposure = 110
    ds.FilterType = "FLAT"
    ds.GeneratorPower = 26
    ds.FocalSpots = 1.2
    ds.DateOfLastCalibration = "20231215"
    ds.TimeOfLastCalibration = "070000"
    ds.ConvolutionKernel = "Br40d"
    ds.PatientPosition = "FFS"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.6
    ds.TotalCollimationWidth = 38.4
    ds.TableSpeed = 46
    ds.TableFeedPerRotation = 23
    ds.SpiralPitchFactor = 0.6
    ds.DataCollectionCenterPatient = [0.0, -150.0, -200.0]
    ds.ReconstructionTargetCenterPatient = [0.0, -150.0, -200.0]
    ds.CTDIvol = 7.5
    phantom = Dataset()
    phantom.CodeValue = "113691"
    phantom.CodingSchemeDesignator = "DCM"
    phantom.CodeMeaning = "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = Sequence([phantom])
    ds.StudyID = "BENCH1"
    ds.AcquisitionNumber = 2
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 512
    ds.Columns = 512
    ds.PixelSpacing = [0.703125, 0.703125]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = [40, 400]
    ds.WindowWidth = [400, 1500]
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenterWidthExplanation = ["WINDOW1", "WINDOW2"]
    ds.LossyImageCompression = "00"
    ds.RequestedProcedureDescription = "CT THORAX (synthetic)"
    ds.PerformedProcedureStepStartDate = "20240101"
    ds.PerformedProcedureStepStartTime = "120512"
    ds.PerformedProcedureStepID = "BENCHPPS1"
    ds.PerformedProcedureStepDescription = "CT THORAX (synthetic)"
    request = Dataset()
    request.RequestedProcedureID = "BENCHREQ1"
    request.ScheduledProcedureStepID = "BENCHSPS1"
    request.ScheduledProcedureStepDescription = "CT THORAX (synthetic)"
    ds.RequestAttributesSequence = Sequence([request])

    # Private blocks: a SECTRA-like identity block (removed by mmiv), Siemens-like CT and CSA
    # blocks (kept), a MITRA-like person name (removed).
    sectra = ds.private_block(0x0009, "SECTRA_Ident_01", create=True)
    sectra.add_new(0x01, "SH", "BENCHREQ1")
    sectra.add_new(0x02, "SH", "BENCHEXAM1")
    coad = ds.private_block(0x0019, "SIEMENS CT VA0  COAD", create=True)
    for offset, vr, value in (
        (0x10, "DS", "0.0"),
        (0x11, "DS", "1.0"),
        (0x12, "DS", "500.0"),
        (0x13, "DS", "2.0"),
        (0x90, "DS", "38.4"),
        (0x92, "DS", "0.6"),
        (0x93, "DS", "595"),
        (0x96, "DS", "1085.6"),
        (0xB0, "DS", "1.0"),
        (0xB1, "SH", "SYNTH"),
        (0xB2, "DS", "0.5"),
        (0xB3, "DS", "23"),
    ):
        coad.add_new(offset, vr, value)
    med = ds.private_block(0x0021, "SIEMENS MED", create=True)
    med.add_new(0x11, "DS", ["0", "0"])
    med.add_new(0x20, "IS", "2")
    csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    csa.add_new(0x08, "CS", "IMAGE NUM 4")
    csa.add_new(0x09, "LO", "20240101")
    csa.add_new(0x10, "OB", bytes(range(256)) * 24)  # 6 KB synthetic "CSA" blob
    csa.add_new(0x18, "CS", "SERIES NUM 4")
    csa.add_new(0x19, "LO", "20240101")
    csa.add_new(0x20, "OB", bytes(range(255, -1, -1)) * 16)
    mitra = ds.private_block(0x0033, "MITRA OBJECT UTF8 ATTRIBUTES 1.0", create=True)
    mitra.add_new(0x13, "PN", "BENCH^SYNTHETIC^PATIENT")
    return ds


def make_corpus(folder: Path, count: int) -> tuple[list[Path], dict[str, Any]]:
    """Create (or reuse) `count` synthetic CT instances in `folder`; their paths and facts.

    bench/receive.py's builder writes a minimal header; this one writes a realistic CT header
    with the same geometry and pixel data (~0.53 MB a file).
    """
    marker = folder.with_name(folder.name + ".json")
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("version") == CORPUS_VERSION and info.get("count", 0) >= count:
            files = [folder / name for name in info["files"][:count]]
            if all(p.exists() for p in files):
                return files, info
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    print(f"generating {count} synthetic CT instances in {folder} ...", file=sys.stderr)
    rng = np.random.default_rng(20240601)
    base = rng.integers(0, 4096, size=(512, 512), dtype=np.uint16)
    prefix = "2.25."  # UUID-derived UIDs: synthetic, never clash with real ones
    study_uid = generate_uid(prefix)
    frame_uid = generate_uid(prefix)
    localizer_uids = [generate_uid(prefix) for _ in range(2)]
    per_series = 500
    series_uids = [generate_uid(prefix) for _ in range((count + per_series - 1) // per_series)]
    ds = _header_template()
    ds.StudyInstanceUID = study_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.IrradiationEventUID = generate_uid(prefix)
    refs = []
    for uid in localizer_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = uid
        refs.append(item)
    ds.ReferencedImageSequence = Sequence(refs)
    names: list[str] = []
    t0 = time.monotonic()
    for i in range(count):
        sop_uid = generate_uid(prefix)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1338.1")
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uids[i // per_series]
        ds.SeriesNumber = 2 + i // per_series
        ds.InstanceNumber = i % per_series + 1
        z = -1.0 * (i % per_series)
        ds.ImagePositionPatient = [-180.0, -330.0, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceLocation = z
        ds.PixelData = np.roll(base, i * 7, axis=0).tobytes()
        name = f"CT{i + 1:06d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        names.append(name)
    sizes = sorted({(folder / n).stat().st_size for n in names[:10]})
    info = {
        "version": CORPUS_VERSION,
        "count": count,
        "study_instance_uid": study_uid,
        "top_level_elements": len(ds),
        "file_bytes": sizes,
        "files": names,
    }
    marker.write_text(json.dumps(info))
    print(f"corpus ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return [folder / n for n in names], info


# -- the variants -------------------------------------------------------------------------


def _fiona_runner() -> Runner:
    from fiona.anonymizer import Context, anonymize_bytes, load_profile, make_scheme

    profile = load_profile("mmiv")
    ctx = Context(
        project=PROJECT,
        pseudonym=PSEUDONYM,
        scheme=make_scheme("mmiv", PROJECT),
        date_offset_days=DATE_OFFSET,
    )

    def run(path: str) -> bytes:
        with open(path, "rb") as fh:
            data = fh.read()
        return anonymize_bytes(data, profile, ctx).data

    return run


def _hash_uid(value: str) -> str:
    """A deterministic, always valid UID for *value* (``2.25.`` + 128 bits of SHA-256).

    One SHA-256 per UID like FIONA's schemes; not MMIV's digits, whose invalid UIDs (a
    component starting with 0) would make pydicom warn on every assignment.
    """
    digest = hashlib.sha256((value + PROJECT).encode("ascii")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _short_hash(value: str) -> str:
    return hashlib.sha256(value.encode("ascii")).hexdigest().translate(_HEX_TO_DIGITS)[:16]


_HEX_TO_DIGITS = str.maketrans("abcdef", "012345")


def _shift(value: str) -> str:
    if len(value) < 8:
        return ""
    day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])) + dt.timedelta(DATE_OFFSET)
    return day.strftime("%Y%m%d") + value[8:]


# Elements the hand-written loop removes / empties (a subset of what mmiv does).
_REMOVE_TAGS = (
    0x00080081,  # InstitutionAddress
    0x00081010,  # StationName
    0x00081040,  # InstitutionalDepartmentName
    0x00081050,  # PerformingPhysicianName
    0x00081070,  # OperatorsName
    0x00100021,  # IssuerOfPatientID
    0x00101000,  # OtherPatientIDs
    0x00101040,  # PatientAddress
    0x00400253,  # PerformedProcedureStepID
    0x00400275,  # RequestAttributesSequence
    0x00091001,  # SECTRA_Ident_01 request number
    0x00091002,  # SECTRA_Ident_01 examination number
    0x00331013,  # MITRA patient name
)
_DATE_KEYWORDS = (
    "InstanceCreationDate",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "AcquisitionDateTime",
    "PerformedProcedureStepStartDate",
    "DateOfLastCalibration",
)


def _pydicom_edit(ds: Any) -> None:
    """The core edits of a plain pydicom read-modify-write de-identification."""
    ds.PatientName = PSEUDONYM
    ds.PatientID = PSEUDONYM
    ds.PatientBirthDate = ""
    ds.ReferringPhysicianName = ""
    ds.InstitutionName = PROJECT
    new_sop = _hash_uid(ds.SOPInstanceUID)
    ds.SOPInstanceUID = new_sop
    ds.file_meta.MediaStorageSOPInstanceUID = new_sop
    study = ds.StudyInstanceUID
    ds.StudyInstanceUID = _hash_uid(study)
    ds.SeriesInstanceUID = _hash_uid(ds.SeriesInstanceUID)
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = _hash_uid(ds.FrameOfReferenceUID)
    for item in ds.get("ReferencedImageSequence", []):
        item.ReferencedSOPInstanceUID = _hash_uid(item.ReferencedSOPInstanceUID)
    ds.StudyID = _short_hash(study + PROJECT)
    ds.AccessionNumber = _short_hash(ds.AccessionNumber)
    for keyword in _DATE_KEYWORDS:
        value = ds.get(keyword)
        if value:
            setattr(ds, keyword, _shift(str(value)))
    for tag in _REMOVE_TAGS:
        if tag in ds:
            del ds[tag]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "bench pydicom loop"


def _pydicom_runner() -> Runner:
    from pydicom import dcmread

    def run(path: str) -> bytes:
        ds = dcmread(path)
        _pydicom_edit(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    return run


def _pydicom_splice_runner() -> Runner:
    from pydicom import dcmread

    def run(path: str) -> bytes:
        with open(path, "rb") as fh:
            data = fh.read()
        source = io.BytesIO(data)
        ds = dcmread(source, stop_before_pixels=True)
        pixels_at = source.tell()  # pydicom rewinds to the pixel data element's header
        _pydicom_edit(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.write(memoryview(data)[pixels_at:])
        return buffer.getvalue()

    return run


def _pydicom_defer_runner() -> Runner:
    from pydicom import dcmread

    def run(path: str) -> bytes:
        ds = dcmread(path, defer_size="64 KB")
        _pydicom_edit(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    return run


RUNNERS: dict[str, Callable[[], Runner]] = {
    "fiona": _fiona_runner,
    "pydicom": _pydicom_runner,
    "pydicom-splice": _pydicom_splice_runner,
    "pydicom-defer": _pydicom_defer_runner,
}


def check_variant(name: str, path: Path) -> list[str]:
    """Problems with one variant's output for *path* (empty: it de-identified the file)."""
    from pydicom import dcmread

    original = dcmread(path)
    out = RUNNERS[name]()(str(path))
    if RUNNERS[name]()(str(path)) != out:
        return ["output is not deterministic"]
    with warnings.catch_warnings():
        # The mmiv scheme reproduces MMIV's UIDs, some with a component starting with 0 (on
        # purpose, see fiona/anonymizer/uids.py); pydicom warns about those when it reads them.
        warnings.simplefilter("ignore", UserWarning)
        ds = dcmread(io.BytesIO(out))
        ds.StudyInstanceUID  # noqa: B018 - decode the elements inside the filter
    problems = []
    if str(ds.PatientName) != PSEUDONYM or ds.PatientID != PSEUDONYM:
        problems.append("pseudonym not written")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if ds.get(keyword) in (None, original.get(keyword)):
            problems.append(f"{keyword} not replaced")
    if ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID:
        problems.append("file meta SOP instance UID differs from the dataset's")
    if ds.StudyDate != _shift(original.StudyDate):
        problems.append(f"StudyDate {ds.StudyDate} not shifted by {DATE_OFFSET} days")
    if ds.PixelData != original.PixelData:
        problems.append("pixel data changed")
    for tag in (0x00091001, 0x00331013, 0x00081070, 0x00400275):
        if tag in ds:
            problems.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) survived")
    if original.SOPInstanceUID.encode() in out or b"BENCH^SYNTHETIC" in out:
        problems.append("an original identifier is still in the bytes")
    return problems


# -- timing -------------------------------------------------------------------------------


def _worker(
    variant: str, files: list[str], warmup: int, barrier: Barrier, conn: Connection
) -> None:
    try:
        run = RUNNERS[variant]()
        for path in files[:warmup]:
            run(path)
        barrier.wait(600)
        cpu0 = time.process_time()
        t0 = time.monotonic()
        total = 0
        for path in files:
            out = run(path)  # the output is kept in RAM until the next file, then dropped
            total += len(out)
        t1 = time.monotonic()
        cpu1 = time.process_time()
        conn.send({"t0": t0, "t1": t1, "cpu_s": cpu1 - cpu0, "bytes": total, "files": len(files)})
    except BaseException as exc:  # noqa: BLE001 - report to the parent, never hang it
        barrier.abort()
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


@dataclass
class RoundResult:
    variant: str
    workers: int
    round: int
    files: int
    seconds: float
    files_per_s: float
    cpu_ms_per_file: float
    output_mb: float
    loadavg_1m: float
    ok: bool
    problem: str = ""


def run_round(variant: str, workers: int, rnd: int, files: list[Path], warmup: int) -> RoundResult:
    ctx = mp.get_context("fork")
    paths = [str(p) for p in files]
    shares = [paths[k::workers] for k in range(workers)]  # interleaved: equal work per worker
    barrier = ctx.Barrier(workers + 1)
    procs, conns = [], []
    for share in shares:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(variant, share, warmup, barrier, child))
        proc.start()
        child.close()
        procs.append(proc)
        conns.append(parent)
    reports: list[dict[str, Any]] = []
    problem = ""
    try:
        barrier.wait(600)
    except Exception as exc:  # noqa: BLE001 - a worker failed during set-up or warm-up
        problem = f"barrier: {type(exc).__name__}"
    for conn in conns:
        try:
            reports.append(conn.recv())
        except EOFError:
            reports.append({"error": "worker died"})
    for proc in procs:
        proc.join(60)
    errors = [r["error"] for r in reports if "error" in r]
    if errors or problem:
        failed = "; ".join(errors) or problem
        return RoundResult(variant, workers, rnd, len(files), 0, 0, 0, 0, 0, False, failed)
    seconds = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
    n = sum(r["files"] for r in reports)
    return RoundResult(
        variant=variant,
        workers=workers,
        round=rnd,
        files=n,
        seconds=round(seconds, 3),
        files_per_s=round(n / seconds, 1),
        cpu_ms_per_file=round(sum(r["cpu_s"] for r in reports) * 1000 / n, 3),
        output_mb=round(sum(r["bytes"] for r in reports) / 1e6, 1),
        loadavg_1m=os.getloadavg()[0],
        ok=n == len(files),
        problem="" if n == len(files) else f"processed {n} of {len(files)}",
    )


def summarise(
    results: list[RoundResult], variants: list[str], workers: list[int]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for w in workers:
        base: float | None = None
        for name in variants:
            mine = [r for r in results if r.variant == name and r.workers == w and r.ok]
            row: dict[str, Any] = {"variant": name, "workers": w, "rounds_ok": len(mine)}
            if mine:
                rates = [r.files_per_s for r in mine]
                row.update(
                    median_files_per_s=round(statistics.median(rates), 1),
                    min_files_per_s=min(rates),
                    max_files_per_s=max(rates),
                    median_files_per_s_per_worker=round(statistics.median(rates) / w, 1),
                    median_cpu_ms_per_file=round(
                        statistics.median(r.cpu_ms_per_file for r in mine), 3
                    ),
                )
                if name == "pydicom":
                    base = row["median_files_per_s"]
            rows.append(row)
        # FIONA / pydicom: ratio of the medians and the median of the same-round ratios.
        plain = {
            r.round: r.files_per_s
            for r in results
            if r.variant == "pydicom" and r.workers == w and r.ok
        }
        for row in rows:
            if row["workers"] != w or "median_files_per_s" not in row or not base:
                continue
            row["ratio_to_pydicom"] = round(row["median_files_per_s"] / base, 2)
            per_round = [
                r.files_per_s / plain[r.round]
                for r in results
                if r.variant == row["variant"] and r.workers == w and r.ok and r.round in plain
            ]
            if per_round:
                row["median_round_ratio_to_pydicom"] = round(statistics.median(per_round), 2)
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, cpus: int) -> None:
    print(
        f"\n{args.count} files, {args.rounds} round(s), {cpus} CPU(s); output in RAM; "
        f"reference: MMIV C++ ~{REFERENCE_FILES_PER_S} files/s one thread, "
        f"target >= {TARGET_FILES_PER_S} files/s per core"
    )
    print(
        "| variant | workers | files/s median (min-max) | files/s per worker | "
        "x pydicom (per-round median) | CPU ms/file | rounds ok |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["rounds_ok"]:
            print(f"| {r['variant']} | {r['workers']} | failed | | | | 0 |")
            continue
        ratio = r.get("ratio_to_pydicom")
        ratio_s = (
            f"{ratio:.2f} ({r.get('median_round_ratio_to_pydicom', 0):.2f})"
            if ratio is not None
            else "-"
        )
        print(
            f"| {r['variant']} | {r['workers']} | {r['median_files_per_s']:.0f} "
            f"({r['min_files_per_s']:.0f}-{r['max_files_per_s']:.0f}) | "
            f"{r['median_files_per_s_per_worker']:.0f} | {ratio_s} | "
            f"{r['median_cpu_ms_per_file']:.2f} | {r['rounds_ok']}/{args.rounds} |"
        )


def run_cprofile(files: list[Path], top: int, warmup: int) -> None:
    """cProfile the FIONA loop in this process (one core) and print the top entries."""
    run = _fiona_runner()
    paths = [str(p) for p in files]
    for path in paths[:warmup]:
        run(path)
    profiler = cProfile.Profile()
    t0 = time.monotonic()
    profiler.enable()
    for path in paths:
        run(path)
    profiler.disable()
    seconds = time.monotonic() - t0
    print(
        f"cProfile: {len(paths)} files in {seconds:.2f} s under the profiler "
        f"({len(paths) / seconds:.0f} files/s; the profiler itself slows the loop)"
    )
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import pydicom

    import fiona

    return {
        "fiona_package": str(Path(fiona.__file__).parent),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--count", type=int, default=2000, help="files in the corpus (default 2000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per variant (default 3)")
    p.add_argument(
        "--variants",
        default=",".join(ALL_VARIANTS),
        help=f"comma-separated subset of {','.join(ALL_VARIANTS)}",
    )
    p.add_argument(
        "--workers",
        default="1,2",
        help="comma-separated worker process counts to run (default 1,2)",
    )
    p.add_argument(
        "--warmup", type=int, default=20, help="untimed files per worker first (default 20)"
    )
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="corpus cache folder")
    p.add_argument("--json", type=Path, help="write per-round results and summary here")
    p.add_argument(
        "--cprofile",
        type=int,
        metavar="N",
        default=0,
        help="instead of timing, cProfile the FIONA loop over the corpus and print the top N",
    )
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in RUNNERS]
    if unknown or not variants:
        p.error(f"unknown variants {unknown}; choose from {ALL_VARIANTS}")
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not workers or min(workers) < 1 or max(workers) > args.count:
        p.error("--workers must be >= 1 and <= --count")

    files, info = make_corpus(args.corpus, args.count)
    for f in files:  # warm the page cache: every variant reads the corpus from memory
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass
    if args.cprofile:
        run_cprofile(files, args.cprofile, args.warmup)
        return 0
    for name in variants:
        problems = check_variant(name, files[0])
        if problems:
            print(f"{name}: output check failed: {'; '.join(problems)}", file=sys.stderr)
            return 1
    facts = machine()
    print(
        f"{facts['cpus']} CPUs ({facts['cpus_usable']} usable), {facts['cpu_model']}; "
        f"Python {facts['python']}, pydicom {facts['pydicom']}; FIONA {git_state()}; "
        f"corpus {len(files)} files of {info.get('file_bytes')} bytes, "
        f"{info.get('top_level_elements')} top-level elements; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    started = dt.datetime.now(dt.UTC)
    results: list[RoundResult] = []
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(variants)  # rotate: no variant always runs first
        for name in variants[k:] + variants[:k]:
            for w in workers if rnd % 2 else workers[::-1]:
                rr = run_round(name, w, rnd, files, args.warmup)
                results.append(rr)
                status = "ok" if rr.ok else f"FAILED: {rr.problem}"
                print(
                    f"round {rnd} {name:15s} workers {w}  {rr.files_per_s:7.1f} files/s  "
                    f"{rr.seconds:6.2f} s  cpu {rr.cpu_ms_per_file:6.3f} ms/file  "
                    f"load {rr.loadavg_1m:4.2f}  {status}",
                    flush=True,
                )
    rows = summarise(results, variants, workers)
    print_table(rows, args, facts["cpus"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "started_utc": started.isoformat(timespec="seconds"),
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "fiona_tree": git_state(),
                    "machine": facts,
                    "corpus": {k: v for k, v in info.items() if k != "files"},
                    "reference_files_per_s": REFERENCE_FILES_PER_S,
                    "target_files_per_s_per_core": TARGET_FILES_PER_S,
                    "args": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                    "summary": rows,
                    "rounds": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

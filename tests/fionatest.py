"""Helpers shared by FIONA's tests: synthetic DICOM, real peers, free ports."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

DCMTK = Path("/usr/bin")  # pynetdicom installs Python apps of the same names on PATH


def sample_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not bundled"
    return Path(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_ct(
    study_uid: str,
    series_uid: str,
    *,
    sop_uid: str | None = None,
    size: int = 64,
    patient_id: str = "SYNTH-0001",
    patient_name: str = "Synthetic^Patient",
    instance_number: int = 1,
    seed: int = 0,
) -> Dataset:
    """A small synthetic CT image (no real patient)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.Modality = "CT"
    ds.Manufacturer = "FIONA-TEST"
    ds.StudyDescription = "synthetic study"
    ds.SeriesDescription = "synthetic series"
    ds.StudyDate = ds.SeriesDate = "20240102"
    ds.StudyTime = ds.SeriesTime = "101112"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def write_study(folder: Path, n_series: int, per_series: int, **kwargs: Any) -> list[Path]:
    """Write a synthetic study as files; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    paths = []
    for s in range(n_series):
        series_uid = generate_uid()
        for i in range(per_series):
            ds = make_ct(study_uid, series_uid, instance_number=i + 1, seed=s * 1000 + i, **kwargs)
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    with open(path, "rb") as handle:
        dcmread(handle, stop_before_pixels=True, specific_tags=[])
    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[meta_end:]


def storescu(
    port: int,
    files: list[Path],
    *,
    called: str = "FIONA",
    calling: str = "STORESCU",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Send with dcmtk storescu; it exits 0 even on failures, so read its output."""
    return subprocess.run(
        [
            str(DCMTK / "storescu"),
            "-v",
            "-aet",
            calling,
            "-aec",
            called,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TCP_NODELAY": "1"},
        check=False,
    )


def store_failures(result: subprocess.CompletedProcess[str]) -> list[str]:
    out = result.stdout + result.stderr
    return [
        line
        for line in out.splitlines()
        if line.startswith(("E:", "F:")) or ("Store Response" in line and "Success" not in line)
    ]


@dataclass
class FionaServer:
    """A ``fiona serve`` subprocess with its configuration."""

    config_path: Path
    port: int
    storage: Path
    proc: subprocess.Popen[str] | None = None
    log_path: Path = field(default_factory=Path)

    def start(self, timeout: float = 60.0) -> None:
        self.log_path = self.config_path.with_suffix(f".{int(time.time() * 1000)}.log")
        with open(self.log_path, "w") as log:  # the child writes through its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fiona", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        # Wait for the "listening" log line rather than probing the port: a bare TCP
        # connection holds an association slot until the ACSE timeout.
        deadline = time.monotonic() + timeout
        while '"event": "listening"' not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"fiona serve exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fiona serve did not start:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def events(self, event: str) -> list[dict[str, Any]]:
        """The log's complete JSON lines whose event is `event`, in order."""
        lines = self.log().split("\n")[:-1]  # the last piece may be a line being written
        marker = json.dumps({"event": event})[1:-1]
        return [json.loads(line) for line in lines if marker in line]

    def wait_for(self, event: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until the log holds `count` lines of `event` (every worker "listening", say);
        returns them all (fewer if the time ran out)."""
        deadline = time.monotonic() + timeout
        while len(found := self.events(event)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fiona", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=check,
        )


def write_config(folder: Path, db_url: str, **sections: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {
        "node": {"port": free_port()},
        "storage": {"path": "spool", "min_free_mb": 1},
        "database": {"url": db_url},
        "stable_after_seconds": 2,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = folder / "fiona.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- de-identification (issue 3) ---------------------------------------------------------------

TEST_SECRET = b"synthetic-test-secret-0123456789"  # not a real key: tests only


def dicom_bytes(ds: Dataset) -> bytes:
    """A dataset (with its file meta) as Part 10 bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_dicom(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data))


def walk(ds: Dataset, path: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], DataElement]]:
    """Every element at every depth, with the tags of the sequences it is nested in."""
    for elem in ds:
        yield path, elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from walk(item, (*path, int(elem.tag)))


def dcmdump_problems(data: bytes) -> list[str]:
    """dcmtk's dcmdump warnings and errors ("W:"/"E:" lines) about Part 10 *data*."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file.dcm"
        path.write_bytes(data)
        result = subprocess.run(
            [str(DCMTK / "dcmdump"), str(path)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=60,
            check=False,
        )
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if line.startswith(("W:", "E:", "F:"))]
    if result.returncode != 0:
        problems.append(f"dcmdump exit status {result.returncode}")
    return problems

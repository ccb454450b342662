"""CLI commands a PACS admin runs: db upgrade, import, status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fionatest import FionaServer, sample_file, write_study
from pydicom import dcmread

pytestmark = pytest.mark.integration


@pytest.fixture
def node(make_server, db_url: str) -> FionaServer:  # type: ignore[no-untyped-def]
    return make_server(db_url)


def test_db_upgrade_is_idempotent(node: FionaServer) -> None:
    first = node.cli("db", "upgrade")
    assert "was empty" in first.stdout
    second = node.cli("db", "upgrade")
    assert "was empty" not in second.stdout and "database at" in second.stdout


def test_import_folder_like_a_dvd(node: FionaServer, tmp_path: Path) -> None:
    dvd = tmp_path / "dvd"
    files = write_study(dvd / "DICOM" / "ST1", 2, 3)
    shutil.copy(sample_file("MR_small.dcm"), dvd / "DICOM" / "IM0001")  # no suffix
    (dvd / "README.TXT").write_text("Viewer instructions")
    shutil.copy(sample_file("DICOMDIR"), dvd / "DICOMDIR")
    bad = dvd / "DICOM" / "broken.dcm"
    bad.write_bytes(files[0].read_bytes()[:-2000])

    result = node.cli("import", str(dvd), "--calling-ae", "DVD", check=False)
    assert result.returncode == 1  # one file failed
    assert "stored 7" in result.stdout
    assert "failed 1" in result.stdout
    assert "skipped 2 non-DICOM" in result.stdout
    assert "README.TXT: not a DICOM Part 10 file" in result.stderr
    assert "DICOMDIR: DICOMDIR" in result.stderr
    assert "broken.dcm: 0xC210" in result.stderr

    report = json.loads(node.cli("status", "--json").stdout)
    assert report["instances"] == 7
    assert report["quarantined"] == 1
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        stored = (
            node.storage
            / "incoming"
            / ds.StudyInstanceUID
            / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm"
        )
        assert stored.read_bytes() == path.read_bytes()

    again = node.cli("import", str(dvd / "DICOM" / "ST1"), check=False)
    assert "duplicate 6" in again.stdout  # re-import changes nothing
    assert json.loads(node.cli("status", "--json").stdout)["instances"] == 7
    # The import and status processes left no temporary folder of theirs behind.
    assert not list((node.storage / "tmp").iterdir())


def test_status_human_readable(node: FionaServer) -> None:
    out = node.cli("status").stdout
    assert "instances:   0" in out and "free disk:" in out

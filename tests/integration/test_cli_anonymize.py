"""``fiona anonymize``: what a project admin runs on a folder of studies (a DVD, an export)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fionatest import DCMTK, sample_file, write_config, write_study
from pydicom import config, dcmread

VECTORS = Path(__file__).resolve().parents[1] / "data" / "mmiv-vectors"


def fiona(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fiona", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
    )


def outputs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def test_standalone_mmiv_run_names_outputs_by_new_uids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)  # MMIV UIDs
    source = tmp_path / "in"
    shutil.copytree(VECTORS, source)
    result = fiona(
        "anonymize", "--profile", "mmiv", "--uid-scheme", "mmiv", "--project", "TEST",
        "--pseudonym", "PSEUDO001", str(source), str(tmp_path / "out"),
    )  # fmt: skip
    assert "anonymized 6 files (3 studies)" in result.stdout
    assert "1 skipped" in result.stdout and "expected.json: not a DICOM file" in result.stderr
    files = outputs(tmp_path / "out")
    assert len(files) == 6
    for path in files:
        ds = dcmread(path)
        assert path.relative_to(tmp_path / "out").parts == (
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            f"{ds.SOPInstanceUID}.dcm",
        )
        assert ds.PatientID == "PSEUDO001" and ds.InstitutionName == "TEST"
    # a1's study UID, verified against the MMIV C++ tool
    assert any(
        p.parts[-3] == "1.3.6.1.4.1.45037.012326804111308714049145909837257751171684254"
        for p in files
    )
    # The inputs are only read.
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in VECTORS.iterdir())


def test_config_project_with_hmac_is_repeatable_and_valid(tmp_path: Path) -> None:
    config_path = write_config(
        tmp_path / "node",
        "sqlite:///fiona.db",
        projects={"BICAM": {"ae_titles": ["BICAM"], "profile": "basic", "uid_scheme": "hmac"}},
    )
    source = tmp_path / "in"
    write_study(source, 2, 2)
    args = ["anonymize", "--config", str(config_path), "--project", "BICAM",
            "--pseudonym", "BICAM001", str(source), str(tmp_path / "out")]  # fmt: skip
    first = fiona(*args)
    assert "anonymized 4 files (1 studies) with profile basic v1" in first.stdout
    assert "UID scheme hmac" in first.stdout
    secret = tmp_path / "node" / "spool" / "secrets" / "BICAM.key"
    assert secret.exists() and secret.stat().st_mode & 0o077 == 0
    before = {p: p.read_bytes() for p in outputs(tmp_path / "out")}
    second = fiona(*args)  # the same secret: the same UIDs, byte-identical files
    assert "anonymized 0 files" in second.stdout and "4 already there" in second.stdout
    assert {p: p.read_bytes() for p in outputs(tmp_path / "out")} == before
    for path in before:
        ds = dcmread(path)
        assert ds.StudyInstanceUID.startswith("2.25.")
        assert ds.PatientID == "BICAM001" and ds.PatientName == "BICAM001"
        assert ds.PatientIdentityRemoved == "YES"
        dump = subprocess.run(
            [str(DCMTK / "dcmdump"), "-dc", str(path)], capture_output=True, text=True, check=True
        )
        assert not [
            line for line in (dump.stdout + dump.stderr).splitlines() if line[:2] in ("W:", "E:")
        ]
    assert secret.read_text() not in first.stdout + first.stderr


def test_files_that_cannot_be_processed_are_reported_and_kept(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(sample_file("CT_small.dcm"), source / "good.dcm")
    shutil.copy(sample_file("MR_truncated.dcm"), source / "cut.dcm")
    result = fiona(
        "anonymize", "--profile", "basic", "--uid-scheme", "mmiv-hex", "--project", "LEGACY",
        "--pseudonym", "L001", str(source), str(tmp_path / "out"), check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "1 failed" in result.stdout
    assert "cut.dcm: malformed dataset" in result.stderr
    assert (source / "cut.dcm").read_bytes() == sample_file("MR_truncated.dcm").read_bytes()
    assert len(outputs(tmp_path / "out")) == 1


def test_single_file_to_a_named_output(tmp_path: Path) -> None:
    target = tmp_path / "anon.dcm"
    fiona(
        "anonymize", "--profile", "dzhk", "--uid-scheme", "mmiv", "--project", "DZHK",
        "--pseudonym", "bdms_123", str(sample_file("MR_small.dcm")), str(target),
    )  # fmt: skip
    ds = dcmread(target)
    assert ds.PatientName == "bdms_123"
    original = dcmread(sample_file("MR_small.dcm"))
    assert ds.StudyDate == original.StudyDate  # dzhk keeps dates
    assert ds.SOPInstanceUID != original.SOPInstanceUID


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "mmiv"], "--profile needs --uid-scheme"),
        (["--profile", "mmiv", "--uid-scheme", "hmac"], "--uid-scheme hmac needs --secret-file"),
        (["--profile", "nope", "--uid-scheme", "mmiv"], "no built-in profile 'nope'"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = fiona(
        "anonymize", *args, "--project", "TEST", "--pseudonym", "P1",
        str(sample_file("CT_small.dcm")), str(tmp_path / "out"), check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_project_in_config_exits_2(tmp_path: Path) -> None:
    config_path = write_config(tmp_path / "node", "sqlite:///fiona.db")
    result = fiona(
        "anonymize", "--config", str(config_path), "--project", "NOPE", "--pseudonym", "P1",
        str(sample_file("CT_small.dcm")), str(tmp_path / "out"), check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no project 'NOPE'" in result.stderr

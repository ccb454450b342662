"""``fiona report tags``: a study's original and de-identified elements side by side."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fionatest import make_ct, write_config
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fiona.config import load_config
from fiona.scp.ingest import ReceiveFacts
from fiona.scp.server import open_node_services

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _mmiv_uids_may_be_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)


def fiona(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fiona", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tags_report_shows_every_element_and_flags_what_survived(
    tmp_path: Path, clock: object
) -> None:
    config_path = write_config(
        tmp_path / "node",
        f"sqlite:///{tmp_path}/node/fiona.db",
        projects={
            "BICAM": {"profile": "mmiv", "uid_scheme": "mmiv"},
            "OTHER": {"profile": "basic", "uid_scheme": "mmiv"},
        },
    )
    config = load_config(config_path)
    study_uid, series = generate_uid(), [generate_uid(), generate_uid()]
    files = []
    for index, series_uid in enumerate(series):
        for number in (1, 2):
            ds = make_ct(
                study_uid,
                series_uid,
                patient_id="PLANTED4711",
                patient_name="Plantedname^Secretia",
                instance_number=number,
            )
            ds.SeriesDescription = "follow-up Plantedname" if index == 0 else "localizer"
            item = Dataset()
            item.ReferencedSOPClassUID = ds.SOPClassUID
            item.ReferencedSOPInstanceUID = "1.2.3.4.5"
            ds.ReferencedImageSequence = [item]
            block = ds.private_block(0x0029, "ACME 1.0", create=True)
            block.add_new(0x10, "LO", "operator Plantedname")
            path = tmp_path / f"{series_uid}-{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    services = open_node_services(config, clock)  # type: ignore[arg-type]
    try:
        facts = ReceiveFacts("MR3", "FIONA", "127.0.0.1", "assoc-1")
        for path in files:
            tmp = services.spool.tmp / path.name
            shutil.copyfile(path, tmp)
            services.ingestor.ingest(tmp, facts)
    finally:
        services.close()

    refused = fiona(config_path, "report", "tags", "--study-uid", study_uid)
    assert refused.returncode == 2 and "give --project" in refused.stderr
    shown = fiona(
        config_path, "report", "tags", "--study-uid", study_uid, "--project", "BICAM", "--json"
    )
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["project"] == "BICAM"
    assert [s["series_instance_uid"] for s in report["series"]] == series
    assert all(s["instances"] == 2 for s in report["series"])
    rows = {row["path"]: row for row in report["series"][0]["elements"]}

    def fate(path: str) -> tuple[str, str | None, str | None]:
        row = rows[path]
        return row["change"], row["original"], row["deidentified"]

    assert fate("(0010,0020)") == ("changed", "PLANTED4711", "PSEUDONYM")
    assert fate("(0008,103E)") == ("kept", "follow-up Plantedname", "follow-up Plantedname")
    change, original, new = fate("(0020,000D)")
    assert change == "changed" and original == study_uid and new and new != study_uid
    assert fate("(0008,1140)[0].(0008,1150)")[0] == "kept"  # nested, by path
    assert fate("(0008,1140)[0].(0008,1155)")[0] == "changed"
    private = rows["(0029,1010)"]
    assert private["name"] == "private (ACME 1.0)" and private["change"] == "kept"
    assert rows["(7FE0,0010)"]["original"].startswith("<")  # pixel data by length and digest
    assert "(0010,0030)" in rows  # the birth date, whatever the profile makes of it

    # The human view marks kept values and can show only them.
    kept = fiona(
        config_path, "report", "tags", "--study-uid", study_uid, "--project", "BICAM", "--only-kept"
    )
    assert kept.returncode == 0, kept.stderr
    assert "follow-up Plantedname" in kept.stdout and "operator Plantedname" in kept.stdout
    assert "PLANTED4711" not in kept.stdout  # PatientID was changed: not listed
    strict = json.loads(
        fiona(
            config_path, "report", "tags", "--study-uid", study_uid, "--project", "OTHER", "--json"
        ).stdout
    )
    strict_rows = {row["path"]: row for row in strict["series"][0]["elements"]}
    assert strict_rows["(0029,1010)"]["change"] == "removed"  # basic drops private elements

    missing = fiona(config_path, "report", "tags", "--study-uid", "1.2.3", "--project", "BICAM")
    assert missing.returncode == 1 and "holds no such study" in missing.stderr

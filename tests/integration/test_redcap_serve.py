"""End to end: project admins work in REDCap (the local fake), ``fiona serve`` does the rest.

A study sent to FIONA shows up as an Incoming record; a transfer added in REDCap reaches the
research PACS (a real Orthanc) and REDCap shows it sent with the new StudyInstanceUID; a bad
pseudonym is held with the reason; a transfer for a study not received yet waits for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fionatest import write_study
from forwarding import Node, dicom_destination
from peers import Orthanc
from pydicom import config as pydicom_config
from pydicom import dcmread
from redcap_fake import TOKEN, FakeRedcap

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _mmiv_uids_may_be_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)


def test_redcap_transfers_reach_the_pacs_and_redcap_shows_how_they_went(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    token = tmp_path / "redcap.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    with FakeRedcap() as fake, Orthanc(tmp_path / "pacs") as pacs:
        node = node_factory(
            {"research-pacs": dicom_destination(pacs)},
            project={"pseudonym_pattern": r"^BICAM\d{3}$"},
            requests={
                "source": "redcap",
                "poll_seconds": 0.5,
                "redcap": {"url": fake.url, "token_file": str(token)},
            },
        )
        files = write_study(tmp_path / "study", 1, 3)
        other = write_study(tmp_path / "other", 1, 1)
        node.send(files + other)
        uid = dcmread(files[0]).StudyInstanceUID
        other_uid = dcmread(other[0]).StudyInstanceUID
        node.until("no Incoming record", lambda: fake.base(uid).get("study_aetitle_sender"))
        record = fake.base(uid)
        assert record["study_aetitle_sender"] == "STORESCU"
        assert record["study_aetitle_addressed"] == "FIONA"
        assert fake.series(uid)[1]["series_num_files"] == "3"

        # The project admin asks for two transfers: one right, one with a bad pseudonym; and one
        # for a study the modality has not sent yet.
        good = fake.add_transfer(uid, transfer_project_name="BICAM", transfer_name="BICAM042",
                                 transfer_event_name="baseline")  # fmt: skip
        bad = fake.add_transfer(other_uid, transfer_project_name="BICAM", transfer_name="bicam-7")
        later = write_study(tmp_path / "later", 1, 2)
        later_uid = dcmread(later[0]).StudyInstanceUID
        early = fake.add_transfer(later_uid, transfer_project_name="BICAM",
                                  transfer_name="BICAM043")  # fmt: skip

        node.until("not sent", lambda: fake.transfer(uid, good).get("transfer_status") == "sent")
        row = fake.transfer(uid, good)
        assert row["transfer_date"] and row.get("transfer_error___2", "0") == "0"
        assert pacs.wait_for_instances(3) == 3
        found = pacs.instances_of_study(row["transfer_mapped_uid"])
        assert len(found) == 3
        assert pacs.instance_tags(found[0]["ID"])["PatientID"] == "BICAM042"

        node.until("not held",
              lambda: fake.transfer(other_uid, bad).get("transfer_status") == "held")  # fmt: skip
        held = fake.transfer(other_uid, bad)
        assert "does not match the project's pattern" in held["transfer_error_message"]
        assert held["transfer_error___4"] == "1" and "transfer_date" not in held

        def status_of_early() -> str:
            return fake.transfer(later_uid, early).get("transfer_status", "")

        node.until("not waiting", lambda: status_of_early() == "waiting-for-data")
        node.send(later)
        node.until("late study not sent", lambda: status_of_early() == "sent")
        assert pacs.wait_for_instances(5) == 5

        # The admin corrects the held pseudonym in REDCap: it is checked again and goes.
        fake.edit_transfer(other_uid, bad, transfer_name="BICAM044")
        node.until("fixed not sent",
              lambda: fake.transfer(other_uid, bad).get("transfer_status") == "sent")  # fmt: skip
        assert "transfer_error_message" not in fake.transfer(other_uid, bad)
        assert pacs.wait_for_instances(6) == 6
        assert TOKEN not in node.server.log()

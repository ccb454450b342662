"""``fiona request …`` against a running ``fiona serve`` and a real research PACS (Orthanc).

The operator's view: requests are added, listed, retried, cancelled, re-sent and imported with
the CLI; what reaches the PACS is checked through Orthanc's REST API or a scripted SCP.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fionatest import write_study
from forwarding import Node, dicom_destination
from peers import Orthanc, ScriptedSCP
from pydicom import config as pydicom_config
from pydicom import dcmread

from fiona.db import AuditEventType, RequestStatus

pytestmark = pytest.mark.integration

PATTERN = {"pseudonym_pattern": r"^BICAM\d{3}$"}


@pytest.fixture(autouse=True)
def _mmiv_uids_may_be_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)


def listed(node: Node, *args: str) -> list[dict[str, Any]]:
    output = node.server.cli("request", "list", "--json", *args).stdout
    rows: list[dict[str, Any]] = json.loads(output)
    return rows


def added_id(output: str) -> int:
    assert output.startswith("request "), output
    return int(output.split()[1])


def test_request_added_after_the_study_arrives_reaches_the_pacs(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with Orthanc(tmp_path / "pacs") as pacs:
        node = node_factory({"research-pacs": dicom_destination(pacs)}, project=PATTERN)
        files = write_study(tmp_path / "study", 1, 3)
        node.send(files)
        uid = dcmread(files[0]).StudyInstanceUID
        out = node.server.cli("request", "add", "--study-uid", uid, "--project", "BICAM",
                              "--pseudonym", "BICAM042", "--event", "baseline").stdout  # fmt: skip
        request_id = added_id(out)
        request = node.wait_request(request_id, RequestStatus.SENT, RequestStatus.FAILED,
                                    RequestStatus.HELD)  # fmt: skip
        assert request.status == RequestStatus.SENT, node.server.log()
        assert pacs.wait_for_instances(3) == 3
        found = pacs.instances_of_study(request.transfer_mapped_uid or "")
        assert len(found) == 3
        assert pacs.instance_tags(found[0]["ID"])["PatientID"] == "BICAM042"
        (row,) = listed(node, "--project", "BICAM", "--status", "sent")
        assert row["id"] == request_id and row["pseudonym"] == "BICAM042"
        assert row["event"] == "baseline" and row["new_study_instance_uid"]
        created = node.audit(AuditEventType.REQUEST_CREATED)[0]
        assert created.details["source"] == "cli" and created.actor


def test_request_added_before_the_study_waits_then_goes(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        files = write_study(tmp_path / "study", 1, 2)
        uid = dcmread(files[0]).StudyInstanceUID
        out = node.server.cli("request", "add", "--study-uid", uid, "--project", "BICAM",
                              "--pseudonym", "BICAM007").stdout  # fmt: skip
        request_id = added_id(out)
        node.wait_request(request_id, RequestStatus.WAITING_FOR_DATA)
        node.send(files)
        assert node.wait_request(request_id, RequestStatus.SENT).status == RequestStatus.SENT
        assert len(set(scp.stored_uids())) == 2


def test_bad_pseudonym_is_held_with_the_reason_and_goes_after_the_fix(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)}, project=PATTERN)
        files = write_study(tmp_path / "study", 1, 2)
        node.send(files)
        uid = dcmread(files[0]).StudyInstanceUID
        result = node.server.cli("request", "add", "--study-uid", uid, "--project", "BICAM",
                                 "--pseudonym", "bicam-7")  # fmt: skip
        assert "it will be held" in result.stderr
        request_id = added_id(result.stdout)
        request = node.wait_request(request_id, RequestStatus.HELD)
        assert "does not match the project's pattern" in (request.transfer_error_message or "")
        shown = node.server.cli("request", "list").stdout
        assert "held" in shown and "does not match" in shown
        assert scp.calls == []  # nothing left FIONA
        # The operator cancels the wrong request and adds the right one.
        assert "cancelled" in node.server.cli("request", "cancel", str(request_id)).stdout
        fixed = added_id(node.server.cli("request", "add", "--study-uid", uid, "--project",
                                         "BICAM", "--pseudonym", "BICAM007").stdout)  # fmt: skip
        assert node.wait_request(fixed, RequestStatus.SENT).status == RequestStatus.SENT
        assert listed(node, "--status", "cancelled")[0]["id"] == request_id
        cancelled = node.audit(AuditEventType.REQUEST_CANCELLED)
        assert len(cancelled) == 1 and cancelled[0].details["previous"] == "held"


def test_add_refuses_unknown_projects_and_bad_uids(node_factory: Callable[..., Node]) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        bad = node.server.cli("request", "add", "--study-uid", "1.2.3", "--project", "NOPE",
                              "--pseudonym", "X", check=False)  # fmt: skip
        assert bad.returncode == 2 and "project 'NOPE' is not configured" in bad.stderr
        bad = node.server.cli("request", "add", "--study-uid", "1.2.x", "--project", "BICAM",
                              "--pseudonym", "X", check=False)  # fmt: skip
        assert bad.returncode == 2 and "not a valid UID" in bad.stderr
        assert listed(node) == []
        missing = node.server.cli("request", "cancel", "99", check=False)
        assert missing.returncode == 1 and "no transfer request 99" in missing.stderr


def test_csv_import_is_all_or_nothing(tmp_path: Path, node_factory: Callable[..., Node]) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        files_a = write_study(tmp_path / "a", 1, 1)
        files_b = write_study(tmp_path / "b", 1, 1)
        uid_a, uid_b = (dcmread(f[0]).StudyInstanceUID for f in (files_a, files_b))
        header = "study_instance_uid,transfer_project_name,transfer_name,transfer_event_name\n"
        broken = tmp_path / "broken.csv"
        broken.write_text(header + f"{uid_a},BICAM,BICAM001,baseline\n{uid_b},OTHER,BICAM002,\n")
        result = node.server.cli("request", "import", str(broken), check=False)
        assert result.returncode == 2
        assert "line 3: project 'OTHER' is not configured" in result.stderr
        assert listed(node) == []  # the good line was not imported either
        good = tmp_path / "good.csv"
        good.write_text(header + f"{uid_a},BICAM,BICAM001,baseline\n{uid_b},BICAM,BICAM002,\n")
        assert "2 requests added" in node.server.cli("request", "import", str(good)).stdout
        node.send(files_a + files_b)
        rows = listed(node)
        assert {row["pseudonym"] for row in rows} == {"BICAM001", "BICAM002"}
        for row in rows:
            node.wait_request(row["id"], RequestStatus.SENT)
        assert len(set(scp.stored_uids())) == 2


def test_resend_sends_the_study_again_as_a_new_request(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        files = write_study(tmp_path / "study", 1, 2)
        node.send(files)
        first = node.request(dcmread(files[0]).StudyInstanceUID)
        node.wait_request(first, RequestStatus.SENT)
        out = node.server.cli("request", "resend", str(first)).stdout
        second = int(out.rsplit(maxsplit=1)[-1])
        request = node.wait_request(second, RequestStatus.SENT)
        assert request.transfer_name == "BICAM001"
        deadline = time.monotonic() + 10
        while len(scp.calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(scp.calls) == 4  # every instance twice, the same new UIDs both times
        assert len(set(scp.stored_uids())) == 2
        assert len(node.ledger(first)) == 2 and len(node.ledger(second)) == 2
        resent = node.audit(AuditEventType.REQUEST_CHANGED)[0]
        assert resent.details == {"action": "resend", "resent_as": second}


def test_cancel_while_retrying_stops_every_delivery(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP(default_status=0xA700) as scp:  # out of resources: retried, not stored
        node = node_factory({"pacs": dicom_destination(scp)})
        files = write_study(tmp_path / "study", 1, 3)
        node.send(files)
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        scp.wait_for_calls(3)
        node.server.cli("request", "cancel", str(request_id))
        deadline = time.monotonic() + 30
        while any(row.state.value == "IN_FLIGHT" for row in node.ledger(request_id)):
            assert time.monotonic() < deadline, node.server.log()
            time.sleep(0.05)  # a batch already on the wire finishes
        calls = len(scp.calls)
        scp.script(statuses=[], default_status=0x0000)  # the PACS recovers: too late
        time.sleep(3)  # several retry periods (FAST: 0.3-1 s)
        assert len(scp.calls) == calls and scp.stored_uids() == []
        ledger = node.ledger(request_id)
        assert ledger and all(row.state.value == "FAILED" for row in ledger)
        assert {row.last_error_class for row in ledger} <= {"cancelled"}
        assert node.wait_request(request_id, RequestStatus.CANCELLED)
        assert not any((node.server.storage / "prepared").rglob("*.dcm"))


def restamp(files: list[Path], **values: str) -> None:
    """Set header values of a written study (synthetic data)."""
    for path in files:
        ds = dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


def test_study_named_by_accession_or_by_patient_and_date(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        wanted = write_study(tmp_path / "wanted", 1, 2)
        other = write_study(tmp_path / "other", 1, 2)
        by_date = write_study(tmp_path / "by-date", 1, 1)
        restamp(wanted, AccessionNumber="ACC-0001", PatientID="SYNTH-0001")
        restamp(other, AccessionNumber="ACC-0002", PatientID="SYNTH-0001", StudyDate="20240103")
        restamp(by_date, AccessionNumber="", PatientID="SYNTH-0042", StudyDate="20240105")
        # Added before the study arrives: it waits, then finds the study by its number.
        out = node.server.cli("request", "add", "--accession", "ACC-0001",
                              "--project", "BICAM", "--pseudonym", "BICAM001").stdout  # fmt: skip
        first = added_id(out)
        node.wait_request(first, RequestStatus.WAITING_FOR_DATA)
        node.send(wanted + other + by_date)
        request = node.wait_request(first, RequestStatus.SENT)
        assert request.study_instance_uid == dcmread(wanted[0]).StudyInstanceUID
        second = added_id(node.server.cli("request", "add", "--patient-id", "SYNTH-0042",
                                          "--study-date", "20240105", "--project", "BICAM",
                                          "--pseudonym", "BICAM002").stdout)  # fmt: skip
        request = node.wait_request(second, RequestStatus.SENT)
        assert request.study_instance_uid == dcmread(by_date[0]).StudyInstanceUID
        assert len(set(scp.stored_uids())) == 3  # the other study was not sent
        created = [event.details for event in node.audit(AuditEventType.REQUEST_CREATED)]
        assert [d["named_by"] for d in created] == ["accession", "patient-and-date"]
        assert "ACC-0001" not in json.dumps(created) and "SYNTH-0042" not in json.dumps(created)
        assert "ACC-0001" not in node.server.log() and "SYNTH-0042" not in node.server.log()


def test_an_ambiguous_accession_number_is_held_never_guessed(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        one, two = write_study(tmp_path / "one", 1, 1), write_study(tmp_path / "two", 1, 1)
        restamp(one + two, AccessionNumber="ACC-0009")
        node.send(one + two)
        request_id = added_id(node.server.cli("request", "add", "--accession", "ACC-0009",
                                              "--project", "BICAM", "--pseudonym",
                                              "BICAM009").stdout)  # fmt: skip
        request = node.wait_request(request_id, RequestStatus.HELD)
        assert "more than one received study has this AccessionNumber" in (
            request.transfer_error_message or ""
        )
        assert scp.calls == []
        bad = node.server.cli("request", "add", "--accession", "ACC-0009", "--study-uid", "1.2",
                              "--project", "BICAM", "--pseudonym", "X", check=False)  # fmt: skip
        assert bad.returncode == 2 and "name the study one way" in bad.stderr

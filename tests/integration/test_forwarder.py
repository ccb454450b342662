"""Forwarding to real peers: Orthanc as the research PACS, dcmtk storescp, a scripted SCP.

Each test runs ``fiona serve`` as a subprocess (``node_factory``, see ``tests/forwarding.py``),
sends a study with dcmtk ``storescu``, adds a transfer request through FIONA's own API and waits
for the delivery ledger to settle.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from fionatest import FionaServer, sample_file, write_study
from forwarding import Node, dicom_destination
from peers import HANG, Orthanc, ScriptedSCP, StoreSCP
from pydicom import config as pydicom_config
from pydicom import dcmread

from fiona.anonymizer import Context, anonymize_bytes, load_profile, make_scheme
from fiona.db import (
    AuditEvent,
    AuditEventType,
    Delivery,
    DeliveryState,
    RequestStatus,
    TransferRequest,
)

pytestmark = pytest.mark.integration

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(autouse=True)
def _mmiv_uids_may_be_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    """About 1 MMIV UID in 8 has a component starting with 0; the research PACS holds them."""
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)


def expected_mmiv(path: Path, project: str = "BICAM", pseudonym: str = "BICAM001") -> Any:
    context = Context(project=project, pseudonym=pseudonym, scheme=make_scheme("mmiv", project),
                      date_offset_days=42)  # fmt: skip
    return dcmread(
        io.BytesIO(anonymize_bytes(path.read_bytes(), load_profile("mmiv"), context).data)
    )


def test_study_arrives_deidentified_in_orthanc_and_storescp(
    tmp_path: Path, db_url: str, node_factory: Callable[..., Node]
) -> None:
    with Orthanc(tmp_path / "pacs") as pacs, StoreSCP(tmp_path / "scp") as scp:
        node = node_factory(
            {"research-pacs": dicom_destination(pacs), "archive": dicom_destination(scp)},
            db_url=db_url,
        )
        files = write_study(tmp_path / "study", 2, 3)
        node.send(files)
        original = dcmread(files[0])
        request_id = node.request(original.StudyInstanceUID)
        request = node.wait_request(request_id, RequestStatus.SENT, RequestStatus.PARTIAL,
                                    RequestStatus.FAILED)  # fmt: skip
        assert request.status == RequestStatus.SENT, node.server.log()
        pacs.wait_for_instances(6)
        scp.wait_for_files(6)
        spooled = node.server.storage / "incoming" / original.StudyInstanceUID
        expected = expected_mmiv(
            spooled / original.SeriesInstanceUID / f"{original.SOPInstanceUID}.dcm"
        )
        assert request.transfer_mapped_uid == expected.StudyInstanceUID
        found = pacs.instances_of_study(expected.StudyInstanceUID)
        assert len(found) == 6
        tags = pacs.instance_tags(found[0]["ID"])
        assert tags["PatientID"] == "BICAM001" and tags["PatientName"] == "BICAM001"
        assert tags["InstitutionName"] == "BICAM"
        assert tags["StudyInstanceUID"] == expected.StudyInstanceUID
        assert original.PatientID not in json.dumps(tags)
        sops = {dcmread(p).SOPInstanceUID for p in scp.files()}
        assert expected.SOPInstanceUID in sops
        ledger = node.ledger(request_id)
        assert len(ledger) == 12
        assert all(row.state == DeliveryState.DELIVERED and row.last_status == 0 for row in ledger)
        assert all(row.attempts == 1 and row.acknowledged_at is not None for row in ledger)
        assert node.audit(AuditEventType.DEIDENTIFIED)[0].details["profile"] == "mmiv"
        status = json.loads(node.server.cli("status", "--json").stdout)
        assert status["destinations"]["research-pacs"]["delivered"] == 6
        assert status["requests"]["sent"] == 1
        shown = node.server.cli("transfers", "--request", str(request_id)).stdout
        assert "sent" in shown and shown.count("DELIVERED") == 12


def test_destination_down_at_first_gets_everything_once_it_is_up(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    pacs = Orthanc(tmp_path / "pacs")  # configured, not started
    node = node_factory({"research-pacs": dicom_destination(pacs)})
    files = write_study(tmp_path / "study", 1, 4)
    node.send(files)
    request_id = node.request(dcmread(files[0]).StudyInstanceUID)

    def breaker_opened() -> bool:
        return bool(node.audit(AuditEventType.BREAKER_OPENED))

    deadline = time.monotonic() + 30
    while not breaker_opened():
        assert time.monotonic() < deadline, node.server.log()
        time.sleep(0.1)
    ledger = node.ledger(request_id)
    waiting = (DeliveryState.PENDING, DeliveryState.IN_FLIGHT)
    assert all(row.state in waiting for row in ledger)  # nothing given up, nothing lost
    assert {row.last_error_class for row in ledger} - {None} == {"unreachable"}
    with pacs:  # the research PACS comes up; nobody touches FIONA
        request = node.wait_request(request_id, RequestStatus.SENT, timeout=60)
        assert request.status == RequestStatus.SENT
        assert pacs.wait_for_instances(4) == 4
    assert node.audit(AuditEventType.BREAKER_CLOSED)
    # What was tried while the PACS was down went again (an instance that streamed in after
    # the breaker opened waited without being tried).
    tried_while_down = {row.id for row in ledger if row.attempts}
    assert tried_while_down
    after = {row.id: row.attempts for row in node.ledger(request_id)}
    assert all(after[row_id] >= 2 for row_id in tried_while_down)


def test_rejected_sop_class_fails_permanently_with_the_reason(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with StoreSCP(tmp_path / "scp", reject_sop_classes=[CT_IMAGE]) as scp:
        node = node_factory({"archive": dicom_destination(scp)})
        files = write_study(tmp_path / "study", 1, 2)
        node.send(files)
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        request = node.wait_request(request_id, RequestStatus.FAILED, RequestStatus.SENT)
        assert request.status == RequestStatus.FAILED
        assert request.transfer_error == "sending"
        assert "does not accept CT Image Storage" in (request.transfer_error_message or "")
        ledger = node.ledger(request_id)
        assert all(row.state == DeliveryState.FAILED for row in ledger)
        assert all(row.attempts == 1 for row in ledger)  # permanent: not hammered
        assert scp.files() == []
        assert len(node.audit(AuditEventType.DELIVERY_FAILED)) == 2
        shown = node.server.cli("transfers", "--request", str(request_id)).stdout
        assert "no-context" in shown and "does not accept CT Image Storage" in shown


def test_out_of_resources_is_retried_until_stored(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP(statuses=[0xA700, 0xA700, 0xA702]) as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        files = write_study(tmp_path / "study", 1, 3)
        node.send(files)
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        request = node.wait_request(request_id, RequestStatus.SENT, RequestStatus.FAILED)
        assert request.status == RequestStatus.SENT
        assert len(set(scp.stored_uids())) == 3
        ledger = node.ledger(request_id)
        assert sum(row.attempts for row in ledger) == 6  # three out-of-resources answers
        assert all(row.state == DeliveryState.DELIVERED for row in ledger)


def test_permanent_status_then_operator_retry_after_the_fix(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP(statuses=[0xC000], default_status=0x0000) as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        files = write_study(tmp_path / "study", 1, 2)
        node.send(files)
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        request = node.wait_request(request_id, RequestStatus.PARTIAL, RequestStatus.SENT,
                                    RequestStatus.FAILED)  # fmt: skip
        assert request.status == RequestStatus.PARTIAL
        assert "cannot understand (0xC000)" in (request.transfer_error_message or "")
        # The refused bytes (de-identified) wait in the outgoing quarantine with the reason.
        shown = json.loads(node.server.cli("transfers", "--request", str(request_id),
                                           "--json").stdout)  # fmt: skip
        failed = [row for row in shown["deliveries"] if row["state"] == "FAILED"]
        assert len(failed) == 1 and failed[0]["quarantined"]
        kept = Path(failed[0]["quarantined"])
        assert dcmread(kept).SOPInstanceUID == failed[0]["sop_instance_uid"]
        assert dcmread(kept).PatientID == "BICAM001"
        sidecar = json.loads(kept.with_suffix(".json").read_text())
        assert sidecar["status"] == 0xC000 and sidecar["destination"] == "pacs"
        assert "cannot understand" in sidecar["reason"]
        retried = node.server.cli("transfers", "--request", str(request_id), "--retry")
        assert "1 failed deliveries are due again" in retried.stdout
        assert "1 refused instances released" in retried.stdout
        assert not kept.exists()
        request = node.wait_request(request_id, RequestStatus.SENT)
        assert len(set(scp.stored_uids())) == 2
        assert node.audit(AuditEventType.DELIVERY_RETRIED)[0].details["instances"] == 1
        # Prepared files go once nothing needs them any more.
        prepared = node.server.storage / "prepared"
        deadline = time.monotonic() + 10
        while any(prepared.rglob("*.dcm")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(prepared.rglob("*.dcm"))


def test_profile_changed_before_sending_fails_then_retry_prepares_again(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP(default_status=0xA700) as scp:  # out of resources: nothing gets in
        node = node_factory({"pacs": dicom_destination(scp)})
        files = write_study(tmp_path / "study", 1, 2)
        node.send(files)
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        scp.wait_for_calls(1)
        old_digests = {row.digest for row in node.ledger(request_id)}
        node.server.stop()
        # The project's date offset is corrected while the deliveries wait.
        raw = yaml.safe_load(node.server.config_path.read_text())
        raw["projects"]["BICAM"]["date_offset_days"] = 7
        node.server.config_path.write_text(yaml.safe_dump(raw))
        scp.script(statuses=[], default_status=0x0000)
        node.server.start()
        request = node.wait_request(request_id, RequestStatus.FAILED)
        assert request.transfer_error == "de-identification"
        assert "differ from those prepared" in (request.transfer_error_message or "")
        assert scp.stored_uids() == []  # never the bytes the ledger did not record
        retried = node.server.cli("transfers", "--request", str(request_id), "--retry")
        assert "2 failed deliveries are due again" in retried.stdout
        request = node.wait_request(request_id, RequestStatus.SENT)
        ledger = node.ledger(request_id)
        assert len(ledger) == 2 and all(row.state == DeliveryState.DELIVERED for row in ledger)
        assert not {row.digest for row in ledger} & old_digests  # prepared again
        assert len(set(scp.stored_uids())) == 2
        retry_audit = node.audit(AuditEventType.DELIVERY_RETRIED)[0].details
        assert retry_audit["prepared_again"] == 2


def test_kill9_while_forwarding_resends_what_was_in_flight(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP(statuses=[0x0000, HANG], hang_seconds=60) as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        files = write_study(tmp_path / "study", 1, 4)
        node.send(files)
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        scp.wait_for_calls(2)  # the second C-STORE hangs: FIONA is mid-batch
        node.server.kill9()
        scp.script(statuses=[], default_status=0x0000)
        node.server.start()
        request = node.wait_request(request_id, RequestStatus.SENT)
        assert request.status == RequestStatus.SENT
        assert len(set(scp.stored_uids())) == 4
        ledger = node.ledger(request_id)
        assert all(row.state == DeliveryState.DELIVERED for row in ledger)
        assert max(row.attempts for row in ledger) == 2  # the resend shows in the ledger
        hung = scp.calls[1].sop_instance_uid
        assert [call.sop_instance_uid for call in scp.calls].count(hung) >= 2


def test_late_series_sends_only_the_new_instances(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        files = write_study(tmp_path / "study", 2, 2)
        first, late = files[:2], files[2:]
        node.send(first)
        uid = dcmread(files[0]).StudyInstanceUID
        request_id = node.request(uid)
        node.wait_request(request_id, RequestStatus.SENT)
        assert len(scp.calls) == 2
        node.send(late)
        deadline = time.monotonic() + 60
        while len(scp.stored()) < 4:
            assert time.monotonic() < deadline, node.server.log()
            time.sleep(0.1)
        request = node.wait_request(request_id, RequestStatus.SENT)
        assert len(scp.calls) == 4  # the first series was not sent again
        assert len(node.ledger(request_id)) == 4
        assert {row.new_study_instance_uid for row in node.ledger(request_id)} == {
            request.transfer_mapped_uid
        }


def test_a_replaced_instance_flows_on_again_in_its_new_version(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    """The modality corrects an instance after the study was sent (same SOP Instance UID,
    other bytes): the new version goes to the destination too, under the same new UIDs, and
    the ledger and the audit say so."""
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        files = write_study(tmp_path / "study", 1, 2)
        node.send(files)
        uid = dcmread(files[0]).StudyInstanceUID
        request_id = node.request(uid)
        node.wait_request(request_id, RequestStatus.SENT)
        before = {row.new_sop_instance_uid: row.digest for row in node.ledger(request_id)}
        assert len(scp.stored()) == 2
        corrected = dcmread(files[0])
        corrected.PixelData = bytes(len(corrected.PixelData))  # the technician re-exported it
        corrected.save_as(tmp_path / "corrected.dcm", enforce_file_format=True)
        node.send([tmp_path / "corrected.dcm"])
        node.until("the new version to arrive", lambda: len(scp.stored()) == 3)
        resent = scp.stored()[-1]
        original = next(
            c for c in scp.stored()[:2] if c.sop_instance_uid == resent.sop_instance_uid
        )
        assert resent.dataset != original.dataset
        assert resent.dataset.endswith(corrected.PixelData)
        request = node.wait_request(request_id, RequestStatus.SENT)
        rows = {row.new_sop_instance_uid: row for row in node.ledger(request_id)}
        assert len(rows) == 2 and rows[resent.sop_instance_uid].state == DeliveryState.DELIVERED
        assert rows[resent.sop_instance_uid].digest != before[resent.sop_instance_uid]
        assert {r.new_study_instance_uid for r in rows.values()} == {request.transfer_mapped_uid}
        time.sleep(1.0)
        assert len(scp.stored()) == 3  # the unchanged instance was not sent again
        assert node.audit(AuditEventType.INSTANCE_REPLACED)


def test_compressed_study_passes_through_or_is_decompressed_for_an_uncompressed_pacs(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    implicit_only = ["1.2.840.10008.1.2"]
    with (
        Orthanc(tmp_path / "j2k") as takes,
        Orthanc(tmp_path / "raw", ae_title="RAWONLY", uncompressed_only=True) as raw,
        ScriptedSCP(ae_title="IMPLICIT", transfer_syntaxes=implicit_only) as neither,
    ):
        node = node_factory(
            {
                "takes": dicom_destination(takes),
                "raw": dicom_destination(raw),
                "neither": dicom_destination(neither),
            }
        )
        source = sample_file("JPEG2000.dcm")
        node.send([source], extra=("-xw",))  # propose JPEG 2000
        request_id = node.request(dcmread(source).StudyInstanceUID)
        request = node.wait_request(
            request_id, RequestStatus.PARTIAL, RequestStatus.SENT, RequestStatus.FAILED
        )
        assert request.status == RequestStatus.PARTIAL
        by_destination = {row.destination: row for row in node.ledger(request_id)}
        assert by_destination["takes"].state == DeliveryState.DELIVERED
        assert by_destination["raw"].state == DeliveryState.DELIVERED
        assert by_destination["neither"].state == DeliveryState.FAILED
        assert "accepts neither JPEG 2000" in (by_destination["neither"].last_error or "")
        original = dcmread(source)
        as_received = dcmread(io.BytesIO(takes.instance_file(takes.instance_ids()[0])))
        assert as_received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert as_received.PixelData == original.PixelData  # compressed bytes passed through
        decompressed = dcmread(io.BytesIO(raw.instance_file(raw.instance_ids()[0])))
        assert decompressed.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        original.decompress()
        assert decompressed.PixelData == original.PixelData
        assert decompressed.PatientID == "BICAM001"


DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def test_stow_rs_to_orthanc_dicomweb(tmp_path: Path, node_factory: Callable[..., Node]) -> None:
    plugin = {"Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    with Orthanc(tmp_path / "web", extra_config=plugin) as pacs:
        node = node_factory(
            {
                "web": {"kind": "dicomweb", "url": f"{pacs.url}/dicom-web", "batch_size": 2},
                "wrong-path": {"kind": "dicomweb", "url": f"{pacs.url}/no-such-root"},
            },
            uid_scheme="hmac",
        )
        files = write_study(tmp_path / "study", 2, 3)
        node.send(files)
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        request = node.wait_request(
            request_id, RequestStatus.PARTIAL, RequestStatus.SENT, RequestStatus.FAILED
        )
        assert request.status == RequestStatus.PARTIAL  # one destination cannot work
        assert pacs.wait_for_instances(6) == 6
        found = pacs.instances_of_study(request.transfer_mapped_uid or "")
        assert len(found) == 6
        assert pacs.instance_tags(found[0]["ID"])["PatientID"] == "BICAM001"
        by_destination: dict[str, list[Delivery]] = {}
        for row in node.ledger(request_id):
            by_destination.setdefault(row.destination, []).append(row)
        assert all(row.state == DeliveryState.DELIVERED for row in by_destination["web"])
        wrong = by_destination["wrong-path"]
        assert all(row.state == DeliveryState.FAILED for row in wrong)
        assert {row.last_error_class for row in wrong} == {"http-refused"}
        assert "HTTP 404" in (wrong[0].last_error or "")


def test_verification_counts_what_the_pacs_holds(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    find = {"DicomAlwaysAllowFind": True}
    with Orthanc(tmp_path / "pacs", extra_config=find) as pacs:
        node = node_factory({"pacs": dicom_destination(pacs, verify=True)}, uid_scheme="hmac")
        files = write_study(tmp_path / "study", 2, 3)
        node.send(files[:3])
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        node.wait_request(request_id, RequestStatus.SENT)

        def checks() -> list[AuditEvent]:
            return node.audit(AuditEventType.DELIVERY_VERIFIED)

        deadline = time.monotonic() + 30
        while not checks():
            assert time.monotonic() < deadline, node.server.log()
            time.sleep(0.1)
        first = checks()[0].details
        assert (first["expected"], first["found"], first["ok"]) == (3, 3, True)
        # Someone deletes an instance in the PACS; the late series triggers the next check.
        gone = pacs.instance_ids()[0]
        requests.delete(f"{pacs.url}/instances/{gone}", timeout=30).raise_for_status()
        node.send(files[3:])
        deadline = time.monotonic() + 60
        while len(checks()) < 2:
            assert time.monotonic() < deadline, node.server.log()
            time.sleep(0.1)
        second = checks()[1].details
        assert (second["expected"], second["found"], second["ok"]) == (6, 5, False)
        request = node.wait_request(request_id, RequestStatus.SENT)
        assert request.transfer_error == "verification"
        assert "holds 5 of the 6 instances delivered" in (request.transfer_error_message or "")


def test_a_request_waiting_for_its_study_streams_it_while_it_arrives(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)}, uid_scheme="hmac")
        config = node.server.config_path
        raw = config.read_text().replace("stable_after_seconds: 2", "stable_after_seconds: 30")
        config.write_text(raw)  # a long quiet period: delivery must not wait for it
        node.server.stop()
        node.server.start()
        files = write_study(tmp_path / "study", 1, 4)
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        node.send(files[:2])
        scp.wait_for_stored(2, timeout=30)  # delivered while the study is still arriving
        with node.sessions() as session:
            request = session.get(TransferRequest, request_id)
            assert request is not None and request.status == RequestStatus.PROCESSING
        node.send(files[2:])
        scp.wait_for_stored(4, timeout=30)
        time.sleep(1.0)  # the study is not stable for 30 s: the request stays open
        with node.sessions() as session:
            request = session.get(TransferRequest, request_id)
            assert request is not None and request.status == RequestStatus.PROCESSING
        assert len(node.ledger(request_id)) == 4
        assert all(row.state == DeliveryState.DELIVERED for row in node.ledger(request_id))


def forwarder_pids(server: FionaServer) -> list[int]:
    """Live ``fiona serve --forwarder`` children of the server's primary process."""
    assert server.proc is not None
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(child)
        for child in children
        if b"--forwarder" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
    ]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.05)


def test_forwarder_process_is_restarted_and_dies_with_the_primary(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)})
        wait_for(lambda: len(forwarder_pids(node.server)) == 1, "the forwarder process")
        first = forwarder_pids(node.server)[0]
        os.kill(first, signal.SIGKILL)
        # The primary notices and starts a new one; the study still goes out.
        wait_for(lambda: forwarder_pids(node.server) not in ([], [first]), "a new forwarder")
        files = write_study(tmp_path / "study", 1, 2)
        node.send(files)
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        assert node.wait_request(request_id, RequestStatus.SENT).status == RequestStatus.SENT
        assert "forwarder exited; restarting" in node.server.log()
        second = forwarder_pids(node.server)[0]
        node.server.kill9()
        # No sender of the old generation may outlive a crashed node.
        wait_for(lambda: not Path(f"/proc/{second}").exists(), "the orphaned forwarder to die")


def test_forwarding_inside_the_receiving_process_when_configured(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)},
                            forwarding={"separate_process": False})  # fmt: skip
        files = write_study(tmp_path / "study", 1, 3)
        node.send(files)
        request_id = node.request(dcmread(files[0]).StudyInstanceUID)
        assert node.wait_request(request_id, RequestStatus.SENT).status == RequestStatus.SENT
        assert forwarder_pids(node.server) == []
        assert len(set(scp.stored_uids())) == 3


def test_sender_associations_leave_every_response_to_the_waiting_sender(tmp_path: Path) -> None:
    """pynetdicom's reactor can steal a C-STORE response (see ``senders._scu_only``)."""
    from pynetdicom import AE

    from fiona.config import DicomDestination
    from fiona.forwarder.senders import associate

    with ScriptedSCP() as scp:
        ae = AE(ae_title="FIONA")
        ae.add_requested_context(CT_IMAGE)
        ae.dimse_timeout = 5  # without the guard the blocking get below waits this long
        destination = DicomDestination.model_validate(dicom_destination(scp))
        assoc = associate(ae, destination)
        assert assoc.is_established
        try:
            marker = (1, object())
            assoc.dimse.msg_queue.put(marker)
            time.sleep(0.05)  # the association reactor polls every millisecond
            assert assoc.dimse.get_msg(block=False) == (None, None)  # the reactor's poll
            assert assoc.dimse.get_msg(block=True) is marker  # still there for the sender
            files = write_study(tmp_path / "study", 1, 1)
            assert assoc.send_c_store(dcmread(files[0])).Status == 0x0000
        finally:
            assoc.release()

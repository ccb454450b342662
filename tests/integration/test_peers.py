"""Self-tests of the real-peer fixtures in tests/peers.py, with real senders."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from fionatest import dataset_bytes, read_dicom, sample_file, store_failures, storescu
from peers import (
    ABORT,
    HANG,
    REJECT_PERMANENT,
    REJECT_TRANSIENT,
    Orthanc,
    ScriptedSCP,
    StoreSCP,
    is_listening,
    poll,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CT = sample_file("CT_small.dcm")
MR = sample_file("MR_small.dcm")
J2K = sample_file("JPEG2000.dcm")  # JPEG 2000 (lossy syntax): storescu needs -xw


def uid_of(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(dcmread(path, stop_before_pixels=True)[keyword].value)


# -- Orthanc ------------------------------------------------------------------------------------


def test_orthanc_receives_and_rest_shows_it(tmp_path: Path) -> None:
    with Orthanc(tmp_path / "pacs", ae_title="PACS") as pacs:
        assert is_listening(pacs.dicom_port)
        result = storescu(pacs.dicom_port, [CT], called="PACS")
        assert store_failures(result) == [], result.stdout + result.stderr
        assert pacs.wait_for_instances(1, timeout=10) == 1

        study_uid = uid_of(CT, "StudyInstanceUID")
        studies = pacs.studies()
        assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == [study_uid]
        assert "PatientID" in studies[0]["PatientMainDicomTags"]
        instances = pacs.instances_of_study(study_uid)
        assert len(instances) == 1
        orthanc_id = instances[0]["ID"]
        assert instances[0]["MainDicomTags"]["SOPInstanceUID"] == uid_of(CT)
        assert pacs.instance_tags(orthanc_id)["SOPInstanceUID"] == uid_of(CT)
        stored = read_dicom(pacs.instance_file(orthanc_id))
        assert stored.SOPInstanceUID == uid_of(CT)
        assert pacs.instances_of_study("1.2.3.4.5.6.7.8.9") == []

        # Without restrictions it takes JPEG 2000 as well.
        result = storescu(pacs.dicom_port, [J2K], called="PACS", extra=("-xw",))
        assert store_failures(result) == [], result.stdout + result.stderr
        assert pacs.wait_for_instances(2, timeout=10) == 2
    assert not pacs.running
    assert not is_listening(pacs.dicom_port)


def test_orthanc_uncompressed_only_refuses_jpeg2000(tmp_path: Path) -> None:
    with Orthanc(tmp_path / "pacs", uncompressed_only=True) as pacs:
        config = pacs.config()
        assert config["AcceptedTransferSyntaxes"] == [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.2",
        ]
        assert config["Jpeg2000TransferSyntaxAccepted"] is False

        result = storescu(pacs.dicom_port, [J2K], called="ORTHANC", extra=("-xw",))
        assert store_failures(result), result.stdout + result.stderr
        result = storescu(pacs.dicom_port, [CT], called="ORTHANC")
        assert store_failures(result) == [], result.stdout + result.stderr
        assert pacs.wait_for_instances(1, timeout=10) == 1
        assert [pacs.instance_tags(i)["SOPInstanceUID"] for i in pacs.instance_ids()] == [
            uid_of(CT)
        ]


def test_orthanc_restart_keeps_storage_and_port(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "pacs", ae_title="PACS", check_called_aet=True)
    try:
        pacs.start()
        port, first_pid = pacs.dicom_port, pacs.pid
        wrong = storescu(port, [CT], called="NOT-PACS")
        assert store_failures(wrong), "DicomCheckCalledAet should refuse another called AE"
        result = storescu(port, [CT], called="PACS")
        assert store_failures(result) == [], result.stdout + result.stderr
        pacs.wait_for_instances(1, timeout=10)

        assert pacs.stop() == 0
        assert not is_listening(port)
        down = storescu(port, [MR], called="PACS")
        assert store_failures(down)  # connection refused while it is down

        pacs.start()
        assert pacs.pid != first_pid
        assert pacs.dicom_port == port
        assert pacs.count_instances() == 1
        result = storescu(port, [MR], called="PACS")
        assert store_failures(result) == [], result.stdout + result.stderr
        assert pacs.wait_for_instances(2, timeout=10) == 2
    finally:
        pacs.stop()


# -- dcmtk storescp -----------------------------------------------------------------------------


def test_storescp_receives_and_restarts_on_same_port(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "scp", ae_title="ARCHIVE") as scp:
        result = storescu(scp.port, [CT], called="ARCHIVE")
        assert store_failures(result) == [], result.stdout + result.stderr
        [received] = scp.wait_for_files(1, timeout=10)
        assert uid_of(received) == uid_of(CT)
        # +B keeps the bytes as sent; storescu itself drops CT_small's trailing padding.
        sent = dataset_bytes(CT)
        kept = dataset_bytes(received)
        assert sent[: len(kept)] == kept
        assert sent[len(kept) : len(kept) + 4] == b"\xfc\xff\xfc\xff"  # (FFFC,FFFC)

        # Default: uncompressed only, so JPEG 2000 finds no accepted context ...
        result = storescu(scp.port, [J2K], called="ARCHIVE", extra=("-xw",))
        assert store_failures(result), result.stdout + result.stderr

        port = scp.port
        scp.stop()
        assert not is_listening(port)
        # ... until it is restarted (same port, same folder) accepting everything.
        scp.accept_all = True
        scp.start()
        assert scp.port == port
        result = storescu(port, [J2K], called="ARCHIVE", extra=("-xw",))
        assert store_failures(result) == [], result.stdout + result.stderr
        files = scp.wait_for_files(2, timeout=10)
        assert sorted(uid_of(f) for f in files) == sorted([uid_of(CT), uid_of(J2K)])


def test_storescp_rejects_a_sop_class(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "scp", reject_sop_classes=[CTImageStorage]) as scp:
        config = scp.association_config()
        assert f"{MRImageStorage}\\Accepted" in config
        assert f"{CTImageStorage}\\" not in config

        result = storescu(scp.port, [CT], called="STORESCP")
        failures = store_failures(result)
        assert any("No presentation context" in line for line in failures), failures
        result = storescu(scp.port, [MR], called="STORESCP")
        assert store_failures(result) == [], result.stdout + result.stderr
        [received] = scp.wait_for_files(1, timeout=10)
        assert uid_of(received) == uid_of(MR)
        assert scp.files() == [received]


# -- scripted pynetdicom SCP --------------------------------------------------------------------


def scu(dimse_timeout: float = 10, ae_title: str = "FIONA") -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.network_timeout = 10
    ae.dimse_timeout = dimse_timeout
    return ae


def test_scripted_statuses(tmp_path: Path) -> None:
    with ScriptedSCP(statuses=[0xA700, 0xA700, 0x0000, 0xC000]) as peer:
        assoc = scu().associate("127.0.0.1", peer.port, ae_title="SCRIPTED")
        assert assoc.is_established
        answers = [int(assoc.send_c_store(CT).Status) for _ in range(5)]
        assoc.release()
    assert answers == [0xA700, 0xA700, 0x0000, 0xC000, 0x0000]
    assert [call.number for call in peer.calls] == [1, 2, 3, 4, 5]
    assert {call.association for call in peer.calls} == {1}
    assert {call.calling_ae_title for call in peer.calls} == {"FIONA"}
    assert peer.calls[0].sop_instance_uid == uid_of(CT)
    assert peer.calls[0].transfer_syntax == ExplicitVRLittleEndian
    assert peer.calls[0].dataset == dataset_bytes(CT)
    assert [call.stored for call in peer.calls] == [False, False, True, False, True]
    assert peer.stored_uids() == [uid_of(CT)] * 2


def test_scripted_association_rejections_then_accept() -> None:
    script = [REJECT_TRANSIENT, REJECT_PERMANENT]
    with ScriptedSCP(associations=script, require_calling_aet=["FIONA"]) as peer:
        # A stranger is turned away without using up the script.
        stranger = scu(ae_title="STRANGER").associate("127.0.0.1", peer.port, ae_title="SCRIPTED")
        assert stranger.is_rejected
        assert stranger.acceptor.primitive.diagnostic == 0x03  # calling AE not recognized
        ae = scu()
        results = []
        for _ in range(2):
            assoc = ae.associate("127.0.0.1", peer.port, ae_title="SCRIPTED")
            assert assoc.is_rejected
            rsp = assoc.acceptor.primitive
            results.append((rsp.result, rsp.result_source, rsp.diagnostic))
        assoc = ae.associate("127.0.0.1", peer.port, ae_title="SCRIPTED")
        assert assoc.is_established
        assert int(assoc.send_c_store(MR).Status) == 0
        assoc.release()
        assert results == [(0x02, 0x01, 0x01), (0x01, 0x01, 0x01)]
        answers = [a.answer for a in peer.associations_seen]
        assert answers == [(0x01, 0x01, 0x03), "transient", "permanent", "accept"]
        [call] = peer.wait_for_stored(1, timeout=5)
        assert call.association == 4
        assert call.sop_instance_uid == uid_of(MR)

        # The script can change mid-test: reject everything from now on.
        peer.script(default_association=REJECT_TRANSIENT)
        assert ae.associate("127.0.0.1", peer.port, ae_title="SCRIPTED").is_rejected


def test_scripted_abort_on_second_store_and_restart() -> None:
    with ScriptedSCP(statuses=[0x0000, ABORT]) as peer:
        assoc = scu().associate("127.0.0.1", peer.port, ae_title="SCRIPTED")
        assert int(assoc.send_c_store(CT).Status) == 0
        second = assoc.send_c_store(MR)
        assert "Status" not in second  # no response: the association was aborted
        poll(lambda: assoc.is_aborted, 5, "the A-ABORT at the sender")
        assert [call.answer for call in peer.calls] == [0x0000, ABORT]

        port = peer.port
        peer.restart()
        assert peer.port == port
        assoc = scu().associate("127.0.0.1", port, ae_title="SCRIPTED")
        assert int(assoc.send_c_store(MR).Status) == 0
        assoc.release()
        assert peer.stored_uids() == [uid_of(CT), uid_of(MR)]
        assert [call.association for call in peer.calls] == [1, 1, 2]


def test_scripted_hang_trips_the_senders_dimse_timeout() -> None:
    with ScriptedSCP(statuses=["HANG"]) as peer:  # names are case-insensitive
        assoc = scu(dimse_timeout=1).associate("127.0.0.1", peer.port, ae_title="SCRIPTED")
        assert "Status" not in assoc.send_c_store(CT)
        poll(lambda: assoc.is_aborted, 5, "the sender to abort")
    assert not peer.running


def test_scripted_stop_closes_a_connection_that_never_spoke() -> None:
    # A peer that connected but sent no A-ASSOCIATE-RQ yet (state Sta2) cannot be aborted
    # by pynetdicom; stop() must still end it without killing the reactor thread.
    with ScriptedSCP() as peer, socket.create_connection(("127.0.0.1", peer.port)) as silent:
        assoc = poll(lambda: peer._ae.active_associations, 5, "the connection at the SCP")[0]
        peer.stop()
        silent.settimeout(5)
        assert silent.recv(1) == b""  # closed by the SCP
        assoc.join(5)
        assert not assoc.is_alive()
        assert assoc.dul.state_machine.current_state == "Sta1"


def test_scripted_refuses_unknown_answers() -> None:
    with pytest.raises(ValueError, match="unknown C-STORE answer"):
        ScriptedSCP(statuses=["busy"])
    with pytest.raises(ValueError, match="unknown association answer"):
        ScriptedSCP(associations=["maybe"])
    peer = ScriptedSCP()
    with pytest.raises(ValueError, match="unknown C-STORE answer"):
        peer.script(statuses=[0x10000])
    peer.script(statuses=["Abort", HANG, 0xA700])
    assert peer._statuses == [ABORT, HANG, 0xA700]

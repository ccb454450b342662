"""The audit trail as an auditor and a data-protection officer use it, on a running node.

A planted participant's two studies go through receive → request → de-identify → deliver
(a real Orthanc) for two projects; another patient's study stays beside them. Then:
the chain verifies, ``fiona audit`` finds the participant's events and only theirs, the
subject report names the right projects, pseudonyms and UIDs (those Orthanc holds), the planted
PatientID and PatientName appear nowhere in the audit table or the logs, ``--forget`` removes
the originals and keeps the trail, and tampering with a row makes ``fiona audit verify`` fail.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fionatest import write_study
from forwarding import Node, dicom_destination
from peers import Orthanc
from pydicom import config as pydicom_config
from pydicom import dcmread
from sqlalchemy import select, text

from fiona.db import AuditEvent, AuditEventType, RequestStatus, Study, TransferRequest
from fiona.db.chain import remove_guards, verify_chain
from fiona.reports import ForgetRefusedError, Subject, forget_subject, resolve_subject
from fiona.requests import cancel_request, create_request
from fiona.scp.ingest import ReceiveFacts
from fiona.scp.server import NodeServices

pytestmark = pytest.mark.integration

PATIENT_ID = "PLANTED4711"
PATIENT_NAME = "Plantedname^Secretia"
OTHER_ID = "OTHER0815"
PLANTED = ("PLANTED4711", "Plantedname", "Secretia", "OTHER0815")


@pytest.fixture(autouse=True)
def _mmiv_uids_may_be_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)


def audit_dump(node: Node) -> str:
    with node.engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM audit_events ORDER BY seq")).all()
    return "\n".join(repr(tuple(row)) for row in rows)


def test_full_run_is_audited_reported_and_forgotten_without_leaking_identifiers(
    tmp_path: Path, db_url: str, node_factory: Callable[..., Node]
) -> None:
    # db_url before node_factory: the node stops before its PostgreSQL schema is dropped (in
    # the other order the drop raced the node's last writes: a deadlock at teardown).
    with Orthanc(tmp_path / "pacs") as pacs:
        node = node_factory(
            {"research-pacs": dicom_destination(pacs)},
            db_url=db_url,
            more_projects={
                "HEART": {
                    "destinations": ["research-pacs"],
                    "profile": "mmiv",
                    "uid_scheme": "mmiv",
                },
            },
        )
        first = write_study(tmp_path / "a", 2, 2, patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
        second = write_study(tmp_path / "b", 1, 3, patient_id=PATIENT_ID, patient_name=PATIENT_NAME)
        other = write_study(tmp_path / "c", 1, 2, patient_id=OTHER_ID, patient_name="Other^Person")
        uid = {
            name: dcmread(files[0]).StudyInstanceUID
            for name, files in (("a", first), ("b", second), ("c", other))
        }
        for files in (first, second, other):
            node.send(files, calling="MODALITY1")
        requests = {
            "a": node.request(uid["a"], "BICAM", "BICAM007"),
            "b": node.request(uid["b"], "HEART", "HEART01"),
            "c": node.request(uid["c"], "BICAM", "BICAM008"),
        }
        for request_id in requests.values():
            done = node.wait_request(request_id, RequestStatus.SENT, RequestStatus.FAILED)
            assert done.status == RequestStatus.SENT, node.server.log()
        assert pacs.wait_for_instances(9) == 9

        # Every step left its event; the chain over all of them verifies.
        for kind in (
            AuditEventType.ASSOCIATION_ACCEPTED,
            AuditEventType.STUDY_RECEIVED,
            AuditEventType.STUDY_STABLE,
            AuditEventType.REQUEST_CREATED,
            AuditEventType.DEIDENTIFIED,
            AuditEventType.DELIVERED,
            AuditEventType.REQUEST_COMPLETED,
            AuditEventType.CONFIGURATION_LOADED,
        ):
            assert node.audit(kind), kind
        (loaded,) = node.audit(AuditEventType.CONFIGURATION_LOADED)
        assert len(loaded.details["sha256"]) == 64 and len(loaded.details["profiles"]["mmiv"]) == 64
        logged = [
            json.loads(line)
            for line in node.server.log().splitlines()
            if '"audit chain head"' in line
        ]
        assert logged and logged[0]["seq"] >= 1  # an anchor outside the database, at start-up
        verified = node.server.cli("audit", "verify", "--anchor", logged[0]["anchor"])
        assert verified.stdout.startswith("audit chain OK: "), verified.stdout
        assert "1 anchors matched" in verified.stdout
        head = verified.stdout.splitlines()[1].removeprefix("head: ")

        # The routing log of one participant: their studies' events, and only those.
        lines = node.server.cli("audit", "--patient-id", PATIENT_ID, "--json").stdout
        events = [json.loads(line) for line in lines.splitlines()]
        by_type: dict[str, list[dict]] = {}
        for event in events:
            by_type.setdefault(event["event"], []).append(event)
        assert len(by_type["STUDY_RECEIVED"]) == 2
        assert {e["actor"] for e in by_type["STUDY_RECEIVED"]} == {"MODALITY1"}
        assert sorted(e["request_id"] for e in by_type["DEIDENTIFIED"]) == sorted(
            [requests["a"], requests["b"]]
        )
        assert {e["request_id"] for e in events if e["request_id"]} == {
            requests["a"],
            requests["b"],
        }
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        one_study = node.server.cli("audit", "--study-uid", uid["c"]).stdout
        assert (
            f"request={requests['c']}" in one_study and f"request={requests['a']}" not in one_study
        )
        heart_only = node.server.cli("audit", "--project", "HEART", "--csv").stdout.splitlines()
        assert heart_only[0].startswith("seq,occurred_at,event,actor,project")
        assert all(",HEART," in line for line in heart_only[1:]) and len(heart_only) > 3

        # The subject report: the two projects, pseudonyms, original and new UIDs, the PACS.
        shown = json.loads(
            node.server.cli("report", "subject", "--patient-id", PATIENT_ID, "--json").stdout
        )
        assert shown["projects"] == ["BICAM", "HEART"]
        reported = {r["request_id"]: r for r in shown["requests"]}
        assert set(reported) == {requests["a"], requests["b"]}
        for name, pseudonym, instances in (("a", "BICAM007", 4), ("b", "HEART01", 3)):
            entry = reported[requests[name]]
            assert (entry["pseudonym"], entry["original_study_uid"]) == (pseudonym, uid[name])
            with node.sessions() as session:
                stored = session.get(TransferRequest, requests[name])
                assert stored is not None
            assert entry["new_study_uid"] == stored.transfer_mapped_uid
            held = pacs.instances_of_study(entry["new_study_uid"])
            assert len(held) == instances
            assert pacs.instance_tags(held[0]["ID"])["PatientID"] == pseudonym
            (dest,) = entry["destinations"]
            assert (dest["destination"], dest["acknowledged"]) == ("research-pacs", instances)
            assert len(dest["new_series_uids"]) == (2 if name == "a" else 1)
        assert {s["original_study_uid"] for s in shown["studies"]} == {uid["a"], uid["b"]}

        # No planted identifier anywhere in the audit trail, the logs, or the routing log.
        everything = "\n".join([audit_dump(node), node.server.log(), lines, one_study])
        for planted in PLANTED:
            assert planted not in everything, planted

        # Right to erasure: the UIDs to delete at the PACS, then the originals are gone.
        forgotten = node.server.cli(
            "report", "subject", "--patient-id", PATIENT_ID, "--forget", "--yes"
        )
        assert "to delete at the destinations" in forgotten.stdout
        for name in ("a", "b"):
            new_uid = reported[requests[name]]["new_study_uid"]
            assert f"StudyInstanceUID {new_uid}" in forgotten.stdout
        assert "2 studies, 7 instances removed" in forgotten.stderr
        spool = node.config.storage.path / "incoming"
        assert not (spool / uid["a"]).exists() and not (spool / uid["b"]).exists()
        assert (spool / uid["c"]).exists()
        with node.sessions() as session:
            left = set(session.scalars(select(Study.study_instance_uid)))
            unlinked = session.get(TransferRequest, requests["a"])
            assert unlinked is not None
        assert left == {uid["c"]}
        assert unlinked.study_instance_uid is None and unlinked.transfer_name == "BICAM007"
        (gone,) = node.audit(AuditEventType.SUBJECT_FORGOTTEN)
        assert gone.details["instances_removed"] == 7

        # The trail still answers, and still verifies against the head noted before.
        after = json.loads(
            node.server.cli("report", "subject", "--patient-id", PATIENT_ID, "--json").stdout
        )
        assert after["projects"] == ["BICAM", "HEART"] and after["forgotten_at"]
        assert {r["new_study_uid"] for r in after["requests"]} == {
            reported[requests["a"]]["new_study_uid"],
            reported[requests["b"]]["new_study_uid"],
        }
        assert node.server.cli("audit", "verify", "--anchor", head).returncode == 0
        for planted in PLANTED:
            assert planted not in audit_dump(node) + node.server.log(), planted

        # Tampering: one changed row, and verify names it.
        with node.sessions() as session, session.begin():
            target = session.scalars(
                select(AuditEvent).where(AuditEvent.event_type == AuditEventType.DELIVERED)
            ).first()
            assert target is not None
            seq = target.seq
        with node.engine.begin() as connection:
            remove_guards(connection)  # someone with DDL rights
            connection.execute(
                text("UPDATE audit_events SET actor = 'nobody' WHERE seq = :seq"), {"seq": seq}
            )
        broken = node.server.cli("audit", "verify", check=False)
        assert broken.returncode == 1
        assert f"BROKEN at seq {seq}," in broken.stdout


def test_forget_is_refused_while_a_request_may_still_send(
    services: NodeServices, tmp_path: Path
) -> None:
    facts = ReceiveFacts("CT01", "FIONA", "127.0.0.1", "assoc-1")
    files = write_study(tmp_path / "s", 1, 2, patient_id=PATIENT_ID)
    study_uid = dcmread(files[0]).StudyInstanceUID
    for path in files:
        tmp = services.spool.tmp / path.name
        shutil.copyfile(path, tmp)
        services.ingestor.ingest(tmp, facts)
    now = services.clock()
    with services.session_factory() as session, session.begin():
        request_id = create_request(
            session,
            study_instance_uid=study_uid,
            project="BICAM",
            pseudonym="BICAM001",
            requested_by="admin",
            now=now,
            node_key=services.node_key,
        ).id

    def subject() -> Subject:
        with services.session_factory() as session:
            return resolve_subject(session, services.node_key, patient_id=PATIENT_ID)

    assert subject().request_ids == {request_id}
    with pytest.raises(ForgetRefusedError, match=f"requests {request_id} are still open"):
        forget_subject(
            services.session_factory, services.spool.root, services.node_key, subject(), "dpo", now
        )
    assert (services.spool.incoming / study_uid).exists()  # nothing removed

    cancel_request(services.session_factory, request_id, now, "dpo")
    done = forget_subject(
        services.session_factory, services.spool.root, services.node_key, subject(), "dpo", now
    )
    assert (done.studies, done.instances, done.requests) == (1, 2, 1)
    assert not (services.spool.incoming / study_uid).exists()
    patient_key = subject().patient_key
    with services.session_factory() as session:
        assert session.scalars(select(Study)).all() == []
        (gone,) = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == AuditEventType.SUBJECT_FORGOTTEN)
        ).all()
        assert gone.actor == "dpo" and gone.patient_key == patient_key
        assert verify_chain(session.connection()).ok
    # What FIONA still knows of the person: the trail, by keyed hash only.
    assert subject().request_ids == {request_id} and subject().study_uids == set()

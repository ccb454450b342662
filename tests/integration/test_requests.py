"""Transfer requests move on only for configured, active projects with destinations."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from fiona.config import FionaConfig
from fiona.db import AuditEvent, AuditEventType, RequestStatus, TransferRequest
from fiona.requests import activate_requests, create_request, retry_request
from fiona.scp.server import NodeServices

pytestmark = pytest.mark.integration


PACS = {"pacs": {"kind": "folder", "path": "/nonexistent"}}
OK = {"destinations": ["pacs"]}


@pytest.mark.parametrize(
    ("projects", "pseudonym", "reason"),
    [
        ({}, "BICAM001", "project 'BICAM' is not configured"),
        ({"BICAM": {**OK, "active": False}}, "BICAM001", "BICAM is not active"),
        ({"BICAM": {}}, "BICAM001", "BICAM has no destinations"),
        (
            {"BICAM": {**OK, "pseudonym_pattern": r"^BICAM\d{3}$"}},
            "Nordmann",
            r"does not match the project's pattern ^BICAM\d{3}$",
        ),
        ({"BICAM": OK}, "  ", "the pseudonym is empty"),
        (
            {"BICAM": {**OK, "approval": {"reference": "REK 1", "end": "2001-12-31"}}},
            "BICAM001",
            "outside its approval window (REK 1): … to 2001-12-31",
        ),
        (
            {"BICAM": {**OK, "approval": {"start": "2999-01-01"}}},
            "BICAM001",
            "outside its approval window: 2999-01-01 to …",
        ),
    ],
)
def test_a_request_fiona_may_not_act_on_is_held_with_the_reason(
    services: NodeServices, projects: dict[str, object], pseudonym: str, reason: str
) -> None:
    config = FionaConfig.model_validate({"destinations": PACS, "projects": projects})
    now = services.clock()
    with services.session_factory() as session, session.begin():
        request_id = create_request(
            session, study_instance_uid="1.2.3", project="BICAM", pseudonym=pseudonym,
            requested_by="admin", now=now, node_key=services.node_key,
        ).id  # fmt: skip
    assert activate_requests(services.session_factory, config, services.node_key, now) == []
    with services.session_factory() as session:
        request = session.get(TransferRequest, request_id)
        assert request is not None
        assert request.status == RequestStatus.HELD
        assert request.transfer_error == "held"
        assert reason in (request.transfer_error_message or "")
        audit = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == AuditEventType.REQUEST_HELD)
        ).one()
        assert audit.request_id == request_id and reason in audit.details["reason"]
        assert pseudonym not in str(audit.details) or not pseudonym.strip()
    # The operator fixes the configuration and retries: the request is checked again.
    fixed = FionaConfig.model_validate({"destinations": PACS, "projects": {"BICAM": OK}})
    message = retry_request(
        services.session_factory, request_id, services.clock(), "admin", services.spool.root
    )
    assert "held → new" in message
    activate_requests(services.session_factory, fixed, services.node_key, services.clock())
    with services.session_factory() as session:
        request = session.get(TransferRequest, request_id)
        assert request is not None
        expected = RequestStatus.HELD if not pseudonym.strip() else RequestStatus.WAITING_FOR_DATA
        assert request.status == expected
        changed = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == AuditEventType.REQUEST_CHANGED)
        ).one()
        assert changed.actor == "admin" and changed.details["action"] == "retry"


def test_a_request_for_a_study_not_received_waits(services: NodeServices) -> None:
    config = FionaConfig.model_validate(
        {
            "destinations": {"pacs": {"kind": "folder", "path": "/nonexistent"}},
            "projects": {"BICAM": {"destinations": ["pacs"]}},
        }
    )
    now = services.clock()
    with services.session_factory() as session, session.begin():
        request_id = create_request(
            session, study_instance_uid="1.2.3", project="BICAM", pseudonym="BICAM001",
            requested_by="admin", now=now, node_key=services.node_key,
        ).id  # fmt: skip
    assert activate_requests(services.session_factory, config, services.node_key, now) == []
    with services.session_factory() as session:
        request = session.get(TransferRequest, request_id)
        assert request is not None and request.status == RequestStatus.WAITING_FOR_DATA


def test_a_request_finds_its_study_by_keyed_accession_or_patient_and_date(
    services: NodeServices, tmp_path: Path
) -> None:
    from fionatest import make_ct
    from pydicom.uid import generate_uid

    from fiona.db import Study
    from fiona.scp.ingest import ReceiveFacts

    ds = make_ct(generate_uid(), generate_uid(), patient_id="SYNTH-0077")
    ds.AccessionNumber = "ACC-0077"
    path = tmp_path / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    tmp = services.spool.tmp / "in.dcm"
    tmp.write_bytes(path.read_bytes())
    services.ingestor.ingest(tmp, ReceiveFacts("CT01", "FIONA", "127.0.0.1", "assoc-1"))
    with services.session_factory() as session:
        study = session.scalars(select(Study)).one()
        assert study.accession_key and "ACC-0077" not in study.accession_key  # keyed, not clear
        assert study.study_date == ds.StudyDate
    config = FionaConfig.model_validate({"destinations": PACS, "projects": {"BICAM": OK}})
    now = services.clock()
    with services.session_factory() as session, session.begin():
        by_accession = create_request(session, accession_number="ACC-0077", project="BICAM",
                                      pseudonym="BICAM001", requested_by="admin", now=now,
                                      node_key=services.node_key).id  # fmt: skip
        by_patient = create_request(session, patient_id="SYNTH-0077", study_date=ds.StudyDate,
                                    project="BICAM", pseudonym="BICAM001", requested_by="admin",
                                    now=now, node_key=services.node_key).id  # fmt: skip
        wrong_date = create_request(session, patient_id="SYNTH-0077", study_date="19990101",
                                    project="BICAM", pseudonym="BICAM001", requested_by="admin",
                                    now=now, node_key=services.node_key).id  # fmt: skip
    ready = activate_requests(services.session_factory, config, services.node_key, now)
    assert sorted(ready) == sorted([by_accession, by_patient])
    with services.session_factory() as session:
        for request_id in (by_accession, by_patient):
            request = session.get(TransferRequest, request_id)
            assert request is not None and request.study_instance_uid == ds.StudyInstanceUID
        waiting = session.get(TransferRequest, wrong_date)
        assert waiting is not None and waiting.status == RequestStatus.WAITING_FOR_DATA

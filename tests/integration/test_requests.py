"""Transfer requests move on only for configured, active projects with destinations."""

from __future__ import annotations

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
    message = retry_request(services.session_factory, request_id, services.clock(), "admin")
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

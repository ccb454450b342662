"""Transfer requests move on only for configured, active projects with destinations."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from fiona.config import FionaConfig
from fiona.db import AuditEvent, AuditEventType, RequestStatus, TransferRequest
from fiona.requests import activate_requests, create_request
from fiona.scp.server import NodeServices

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("projects", "reason"),
    [
        ({}, "project 'BICAM' is not configured"),
        ({"BICAM": {"active": False, "destinations": ["pacs"]}}, "BICAM is not active"),
        ({"BICAM": {}}, "BICAM has no destinations"),
    ],
)
def test_a_request_that_cannot_proceed_fails_with_the_reason(
    services: NodeServices, projects: dict[str, object], reason: str
) -> None:
    config = FionaConfig.model_validate(
        {
            "destinations": {"pacs": {"kind": "folder", "path": "/nonexistent"}},
            "projects": projects,
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
        assert request is not None
        assert request.status == RequestStatus.FAILED
        assert request.transfer_error == "held"
        assert reason in (request.transfer_error_message or "")
        audit = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == AuditEventType.REQUEST_FAILED)
        ).one()
        assert audit.request_id == request_id and reason in audit.details["reason"]


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

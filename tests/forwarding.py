"""Forwarding test helpers: a ``fiona serve`` with projects and destinations, and its database."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fionatest import FionaServer, store_failures, storescu
from peers import Orthanc, ScriptedSCP, StoreSCP
from sqlalchemy import select

from fiona.audit import utcnow
from fiona.config import load_config
from fiona.db import (
    AuditEvent,
    AuditEventType,
    Delivery,
    RequestStatus,
    TransferRequest,
    make_engine,
    make_sessionmaker,
)
from fiona.keys import load_node_key
from fiona.requests import create_request

FAST = {  # retries and probes in fractions of a second
    "poll_seconds": 0.2,
    "retry_base_seconds": 0.3,
    "retry_cap_seconds": 1.0,
    "breaker_failures": 2,
    "breaker_probe_seconds": 0.5,
}


class Node:
    """A ``fiona serve`` with projects and destinations, and its database."""

    def __init__(self, server: FionaServer) -> None:
        self.server = server
        self.config = load_config(server.config_path)
        self.engine = make_engine(self.config.database.url)
        self.sessions = make_sessionmaker(self.engine)

    def send(self, files: list[Path], called: str = "FIONA", extra: tuple[str, ...] = ()) -> None:
        result = storescu(self.server.port, files, called=called, extra=extra)
        assert result.returncode == 0 and not store_failures(result), result.stdout

    def request(self, study_uid: str, project: str = "BICAM", pseudonym: str = "BICAM001") -> int:
        with self.sessions() as session, session.begin():
            request = create_request(
                session,
                study_instance_uid=study_uid,
                project=project,
                pseudonym=pseudonym,
                requested_by="test",
                now=utcnow(),
                node_key=load_node_key(self.config.storage.path),
            )
            return request.id

    def wait_request(
        self, request_id: int, *statuses: RequestStatus, timeout: float = 60.0
    ) -> TransferRequest:
        deadline = time.monotonic() + timeout
        while True:
            with self.sessions() as session:
                request = session.get(TransferRequest, request_id)
                assert request is not None
                if request.status in statuses:
                    return request
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {request_id} is {request.status}\n{self.server.log()}")
            time.sleep(0.1)

    def ledger(self, request_id: int) -> list[Delivery]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(Delivery).where(Delivery.request_id == request_id).order_by(Delivery.id)
                )
            )

    def audit(self, event_type: AuditEventType) -> list[AuditEvent]:
        with self.sessions() as session:
            return list(
                session.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type))
            )

    def close(self) -> None:
        self.engine.dispose()


def dicom_destination(peer: Orthanc | StoreSCP | ScriptedSCP, **extra: Any) -> dict[str, Any]:
    port = peer.dicom_port if isinstance(peer, Orthanc) else peer.port
    return {"kind": "dicom", "host": "127.0.0.1", "port": port, "ae_title": peer.ae_title, **extra}

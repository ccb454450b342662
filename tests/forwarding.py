"""Forwarding test helpers: a ``fiona serve`` with projects and destinations, and its database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fionatest import FionaServer, store_failures, storescu
from peers import Orthanc, ScriptedSCP, StoreSCP, poll
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

T = TypeVar("T")

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

    def send(
        self,
        files: list[Path],
        called: str = "FIONA",
        extra: tuple[str, ...] = (),
        calling: str = "STORESCU",
    ) -> None:
        result = storescu(self.server.port, files, called=called, calling=calling, extra=extra)
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

    def until(self, what: str, check: Callable[[], T], timeout: float = 60.0) -> T:
        """``check()`` once it is truthy; TimeoutError naming *what*, with the server's log."""
        try:
            return poll(check, timeout, what, interval=0.1)  # type: ignore[no-any-return]
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.server.log()}") from None

    def wait_request(
        self, request_id: int, *statuses: RequestStatus, timeout: float = 60.0
    ) -> TransferRequest:
        def reached() -> TransferRequest | None:
            with self.sessions() as session:
                request = session.get(TransferRequest, request_id)
                assert request is not None
                return request if request.status in statuses else None

        return self.until(f"request {request_id} to be {statuses}", reached, timeout)

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

"""The delivery ledger in one process, on a clock the test moves: late instances and replaced
ones after a request was sent, whatever order their timestamps and commits come in.

The forwarder runs step by step (``run_pipeline_once``, ``send_once``) into a folder
destination, on SQLite and PostgreSQL; the end-to-end paths with real peers are in
``test_forwarder.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fionatest import write_study
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from fiona.config import FionaConfig
from fiona.db import AuditEvent, AuditEventType, Delivery, RequestStatus, TransferRequest
from fiona.forwarder.service import Forwarder
from fiona.requests import create_request
from fiona.scp.ingest import ReceiveFacts
from fiona.scp.server import NodeServices
from fiona.scp.stability import sweep

pytestmark = pytest.mark.integration

FACTS = ReceiveFacts("CT01", "FIONA", "127.0.0.1", "assoc-1")


def forwarder(services: NodeServices, tmp_path: Path) -> Forwarder:
    config = FionaConfig.model_validate(
        {
            "storage": {"path": str(services.spool.root)},
            "destinations": {"pacs": {"kind": "folder", "path": str(tmp_path / "pacs")}},
            "projects": {"BICAM": {"destinations": ["pacs"]}},
        }
    )
    return Forwarder(config, services.session_factory, services.spool.root, services.node_key,
                     services.clock)  # fmt: skip


def receive(services: NodeServices, path: Path) -> None:
    tmp = services.spool.tmp / f"{generate_uid()}.dcm"
    shutil.copyfile(path, tmp)
    services.ingestor.ingest(tmp, FACTS)


def settle(services: NodeServices, node: Forwarder) -> None:
    """Sweep for stability, then prepare and send until nothing is left to do."""
    sweep(services.session_factory, services.spool, services.node_key, services.clock(), 15)
    for _ in range(10):
        node.run_pipeline_once()
        if not node.send_once("pacs"):
            node.run_pipeline_once()  # the roll-up after the last batch
            return
    raise AssertionError("the forwarder did not settle")


def request_of(services: NodeServices) -> TransferRequest:
    with services.session_factory() as session:
        return session.scalars(select(TransferRequest)).one()


def sent_files(tmp_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (tmp_path / "pacs").rglob("*.dcm")}


SentStudy = tuple[Forwarder, list[Path], dict[str, bytes]]


@pytest.fixture
def sent_study(services: NodeServices, tmp_path: Path) -> Iterator[SentStudy]:
    """A two-instance study received, requested for BICAM and sent; what the PACS got."""
    services.spool.claim_tmp()
    files = write_study(tmp_path / "study", 1, 2)
    for path in files:
        receive(services, path)
    with services.session_factory() as session, session.begin():
        create_request(session, study_instance_uid=dcmread(files[0]).StudyInstanceUID,
                       project="BICAM", pseudonym="BICAM001", requested_by="test",
                       now=services.clock(), node_key=services.node_key)  # fmt: skip
    services.clock.advance(60)  # type: ignore[attr-defined]
    node = forwarder(services, tmp_path)
    settle(services, node)
    assert request_of(services).status == RequestStatus.SENT
    sent = sent_files(tmp_path)
    assert len(sent) == 2
    yield node, files, sent
    services.spool.release_tmp()


def test_an_instance_committed_just_after_its_request_completed_is_still_sent(
    services: NodeServices, tmp_path: Path, sent_study: SentStudy
) -> None:
    """Its stamp (taken just before its index commit) is before the request's completion, as
    when the completion read the study between the two: it is sent all the same."""
    node, files, _ = sent_study
    completed = request_of(services).transfer_date
    assert completed is not None
    late = write_study(tmp_path / "late", 1, 1)[0]
    ds = dcmread(late)
    ds.StudyInstanceUID = dcmread(files[0]).StudyInstanceUID
    ds.save_as(late, enforce_file_format=True)
    services.clock.advance(-0.5)  # type: ignore[attr-defined]
    receive(services, late)
    services.clock.advance(0.5)  # type: ignore[attr-defined]
    node.run_pipeline_once()
    node.send_once("pacs")
    assert len(sent_files(tmp_path)) == 3


def test_a_replaced_instance_is_prepared_again_and_its_new_version_sent(
    services: NodeServices, tmp_path: Path, sent_study: SentStudy
) -> None:
    node, files, sent = sent_study
    corrected = dcmread(files[0])
    corrected.PixelData = bytes(len(corrected.PixelData))  # the technician re-exported it
    corrected.save_as(tmp_path / "corrected.dcm", enforce_file_format=True)
    services.clock.advance(1)  # type: ignore[attr-defined]
    receive(services, tmp_path / "corrected.dcm")
    services.clock.advance(60)  # type: ignore[attr-defined]
    settle(services, node)

    now_sent = sent_files(tmp_path)
    assert set(now_sent) == set(sent)  # the same new UIDs: the PACS replaces its copy
    changed = [name for name in sent if now_sent[name] != sent[name]]
    assert len(changed) == 1
    corrected_there = next((tmp_path / "pacs").rglob(changed[0]))
    assert dcmread(corrected_there).PixelData == corrected.PixelData
    request = request_of(services)
    assert request.status == RequestStatus.SENT
    with services.session_factory() as session:
        rows = list(session.scalars(select(Delivery)))
        events = list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.event_type == AuditEventType.DEIDENTIFIED)
            )
        )
    assert len(rows) == 2 and all(row.attempts == 1 for row in rows)
    assert [event.details.get("replaced") for event in events] == [0, 1]

    # Nothing new: a further pass sends nothing.
    services.clock.advance(60)  # type: ignore[attr-defined]
    node.run_pipeline_once()
    assert node.send_once("pacs") == 0

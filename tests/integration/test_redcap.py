"""REDCap as the source of transfer requests, against the local fake REDCap (tests/redcap_fake.py).

The client's failure handling (token, 5xx, empty and garbled bodies, slow answers), the sync
pass (requests in, statuses back with read-back, admins' edits, Incoming records) on SQLite and
PostgreSQL, and the poller's back-off and alerts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fionatest import write_config, write_study
from pydicom import dcmread
from pydicom.uid import generate_uid
from redcap_fake import TOKEN, FakeRedcap, load_dictionary
from sqlalchemy import select

from fiona.config import FionaConfig
from fiona.db import AuditEvent, AuditEventType, RequestStatus, TransferRequest
from fiona.heartbeat import read_beat
from fiona.redcap.client import RedcapClient, RedcapError
from fiona.redcap.poller import RedcapPoller
from fiona.redcap.sync import RedcapSource
from fiona.requests import activate_requests
from fiona.scp.ingest import ReceiveFacts
from fiona.scp.server import NodeServices
from fiona.scp.stability import sweep

pytestmark = pytest.mark.integration

PACS = {"pacs": {"kind": "folder", "path": "/nonexistent"}}


@pytest.fixture
def fake() -> Any:
    with FakeRedcap() as server:
        yield server


def token_file(folder: Path, token: str = TOKEN) -> Path:
    path = folder / "redcap.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def redcap_config(
    fake: FakeRedcap, folder: Path, services: NodeServices, **redcap: Any
) -> FionaConfig:
    return FionaConfig.model_validate(
        {
            "storage": {"path": str(services.spool.root)},
            "destinations": PACS,
            "projects": {"BICAM": {"destinations": ["pacs"], "pseudonym_pattern": r"^BICAM\d{3}$"}},
            "requests": {
                "source": "redcap",
                "redcap": {"url": fake.url, "token_file": str(token_file(folder)), **redcap},
            },
        }
    )


def client(fake: FakeRedcap, token: str = TOKEN, timeout: float = 5.0) -> RedcapClient:
    return RedcapClient(fake.url, lambda: token, timeout=timeout, sleep=lambda _: None)


def source(services: NodeServices, fake: FakeRedcap, folder: Path, **redcap: Any) -> RedcapSource:
    config = redcap_config(fake, folder, services, **redcap)
    return RedcapSource(config, services.session_factory, services.node_key, services.clock,
                        client(fake))  # fmt: skip


def requests_of(services: NodeServices) -> list[TransferRequest]:
    with services.session_factory() as session:
        return list(session.scalars(select(TransferRequest).order_by(TransferRequest.id)))


def forward_moves_it(
    services: NodeServices, status: RequestStatus, mapped_uid: str | None = None
) -> None:
    """The forwarder moves the (only) request on, a second later (``sent``: with its date)."""
    services.clock.advance(1)  # type: ignore[attr-defined]
    with services.session_factory() as session, session.begin():
        request = session.scalars(select(TransferRequest)).one()
        request.status = status
        request.updated_at = services.clock()
        if status == RequestStatus.SENT:
            request.transfer_date = services.clock()
            request.transfer_mapped_uid = mapped_uid


def audit(services: NodeServices, kind: AuditEventType) -> list[AuditEvent]:
    with services.session_factory() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event_type == kind)))


# -- the client --------------------------------------------------------------------------------


def test_a_wrong_token_is_forbidden_at_once_and_never_shown(fake: FakeRedcap) -> None:
    wrong = "F" * 32
    with pytest.raises(RedcapError) as caught:
        client(fake, token=wrong).metadata()
    assert caught.value.kind == "forbidden"
    assert "permissions to use the API" in caught.value.detail  # REDCap's own words
    assert wrong not in str(caught.value) and wrong not in caught.value.detail
    assert len(fake.calls) == 1  # no retry loop
    assert fake.tokens == [wrong]  # the token went in the POST body (the fake reads only that)


@pytest.mark.parametrize("kind", ["status", "empty", "garbage"])
def test_transient_answers_are_retried_then_reported(fake: FakeRedcap, kind: str) -> None:
    fake.fault(kind, 503, times=2)
    assert client(fake).metadata()[0]["field_name"] == "study_instance_uid"
    assert len(fake.calls) == 1  # the two faulty answers came before the call was recorded
    fake.fault(kind, 503, times=3)
    with pytest.raises(RedcapError) as caught:
        client(fake).metadata()
    assert caught.value.kind == "transient"


def test_a_slow_answer_is_a_timeout(fake: FakeRedcap) -> None:
    fake.delay = 1.5
    with pytest.raises(RedcapError) as caught:
        client(fake, timeout=0.3).export_records(["study_instance_uid"])
    assert caught.value.kind == "transient" and "no answer within 0.3 s" in str(caught.value)


def test_a_refused_call_carries_redcaps_message(fake: FakeRedcap) -> None:
    with pytest.raises(RedcapError) as caught:
        client(fake).export_records(["no_such_field"])
    assert caught.value.kind == "refused"
    assert "'no_such_field'" in caught.value.detail


# -- one sync pass -------------------------------------------------------------------------------


def test_a_project_without_fionas_fields_is_refused_naming_them(
    fake: FakeRedcap, services: NodeServices, tmp_path: Path
) -> None:
    fake.metadata = [row for row in load_dictionary() if row["field_name"] != "transfer_status"]
    fake.fields.pop("transfer_status")
    fake.repeating = {"series"}
    with pytest.raises(RedcapError) as caught:
        source(services, fake, tmp_path).sync()
    assert caught.value.kind == "refused"
    assert "fields missing: transfer_status" in caught.value.detail
    assert "instrument transfers (with transfer_project_name) must be repeating" in (
        caught.value.detail
    )
    assert requests_of(services) == []


def test_requests_come_in_statuses_go_back_and_edits_are_taken(
    fake: FakeRedcap, services: NodeServices, tmp_path: Path
) -> None:
    uid = generate_uid()
    good = fake.add_transfer(uid, transfer_project_name="BICAM", transfer_name="BICAM001",
                             transfer_event_name="baseline", transfer_requested_by="anne",
                             transfer_requested_date="2026-11-20 09:30")  # fmt: skip
    bad = fake.add_transfer(uid, transfer_project_name="BICAM", transfer_name="Nordmann")
    broken = fake.add_transfer("not-a-uid", transfer_project_name="BICAM", transfer_name="X")
    redcap = source(services, fake, tmp_path)

    result = redcap.sync()
    assert (result.created, result.rejected) == (2, 1)
    first, second = requests_of(services)
    assert (first.study_instance_uid, first.transfer_name, first.transfer_event_name) == (
        uid, "BICAM001", "baseline"
    )  # fmt: skip
    assert first.source == "redcap" and first.requested_by == "anne"
    assert first.external_ref == f"{uid}#{good}" and second.external_ref == f"{uid}#{bad}"
    assert fake.transfer(uid, good)["transfer_status"] == "new"
    rejected = fake.transfer("not-a-uid", broken)
    assert rejected["transfer_status"] == "failed"
    assert "the record id is not a valid UID" in rejected["transfer_error_message"]
    created = audit(services, AuditEventType.REQUEST_CREATED)
    assert {event.actor for event in created} == {"anne", "redcap"}

    # Nothing changed: the next pass reads, but writes nothing.
    imports = len(fake.calls_of("record", "import"))
    assert redcap.sync().written == 0
    assert len(fake.calls_of("record", "import")) == imports

    # FIONA holds the bad pseudonym; REDCap shows it, with the reason and the "held" flag.
    services.clock.advance(1)  # type: ignore[attr-defined]
    activate_requests(services.session_factory, redcap.config, services.node_key,
                      services.clock())  # fmt: skip
    assert redcap.sync().written == 2
    held = fake.transfer(uid, bad)
    assert held["transfer_status"] == "held" and held["transfer_error___4"] == "1"
    assert "does not match the project's pattern" in held["transfer_error_message"]
    assert fake.transfer(uid, good)["transfer_status"] == "waiting-for-data"

    # The admin fixes the pseudonym in REDCap: FIONA takes the edit, checks the request again,
    # and the message and flag in REDCap are cleared (a blank needs overwriteBehavior=overwrite).
    fake.edit_transfer(uid, bad, transfer_name="BICAM002")
    services.clock.advance(1)  # type: ignore[attr-defined]
    assert redcap.sync().changed == 1
    fixed = fake.transfer(uid, bad)
    assert fixed["transfer_status"] == "new" and "transfer_error_message" not in fixed
    assert fixed["transfer_error___4"] == "0"
    assert requests_of(services)[1].transfer_name == "BICAM002"
    (edit,) = audit(services, AuditEventType.REQUEST_CHANGED)
    assert edit.actor == "redcap" and edit.details["fields"] == ["pseudonym"]
    assert edit.details["previous"] == "held"
    overwrite = [
        c for c in fake.calls_of("record", "import") if c["overwriteBehavior"] == "overwrite"
    ]
    assert overwrite, "blanks must be written with overwriteBehavior=overwrite"


@pytest.mark.parametrize("earlier", [1.0, 0.0])
def test_a_change_committed_after_a_write_back_goes_back_too_whatever_its_timestamp(
    fake: FakeRedcap, services: NodeServices, tmp_path: Path, earlier: float
) -> None:
    """The forwarder's pass takes its time when it starts, the write-back its own when it ends:
    a change stamped before (or at the same moment as) the last write-back but committed after
    it must still reach REDCap — a request held then must not stay "new" there for ever."""
    uid = generate_uid()
    instance = fake.add_transfer(uid, transfer_project_name="BICAM", transfer_name="BICAM001")
    redcap = source(services, fake, tmp_path)
    pass_began = services.clock() - timedelta(seconds=earlier)
    assert redcap.sync().written == 1
    assert fake.transfer(uid, instance)["transfer_status"] == "new"
    with services.session_factory() as session, session.begin():
        request = session.scalars(select(TransferRequest)).one()
        request.status = RequestStatus.HELD
        request.transfer_error = "held"
        request.transfer_error_message = "the destination is paused"
        request.updated_at = pass_began
    assert redcap.sync().written == 1
    row = fake.transfer(uid, instance)
    assert row["transfer_status"] == "held" and row["transfer_error___4"] == "1"
    assert redcap.sync().written == 0  # and once there, it is not written again


def test_an_edit_after_sending_began_is_refused_and_explained(
    fake: FakeRedcap, services: NodeServices, tmp_path: Path
) -> None:
    uid = generate_uid()
    instance = fake.add_transfer(uid, transfer_project_name="BICAM", transfer_name="BICAM001")
    redcap = source(services, fake, tmp_path)
    redcap.sync()
    forward_moves_it(services, RequestStatus.PROCESSING)
    fake.edit_transfer(uid, instance, transfer_name="BICAM009")
    result = redcap.sync()
    assert (result.changed, result.refused_changes) == (0, 1)
    (request,) = requests_of(services)
    assert request.transfer_name == "BICAM001" and request.status == RequestStatus.PROCESSING
    row = fake.transfer(uid, instance)
    assert row["transfer_status"] == "processing"
    assert "changed in REDCap after sending began (pseudonym)" in row["transfer_error_message"]
    (refused,) = audit(services, AuditEventType.REQUEST_CHANGED)
    assert refused.details["action"] == "edit-refused"


def test_a_sent_request_gets_its_transfer_date_and_leaves_the_open_list(
    fake: FakeRedcap, services: NodeServices, tmp_path: Path
) -> None:
    uid = generate_uid()
    instance = fake.add_transfer(uid, transfer_project_name="BICAM", transfer_name="BICAM001")
    redcap = source(services, fake, tmp_path)
    redcap.sync()
    new_uid = generate_uid()
    forward_moves_it(services, RequestStatus.SENT, mapped_uid=new_uid)
    redcap.sync()
    row = fake.transfer(uid, instance)
    assert row["transfer_status"] == "sent" and row["transfer_mapped_uid"] == new_uid
    local = services.clock().astimezone().strftime("%Y-%m-%d %H:%M")
    assert row["transfer_date"] == local
    exports = fake.calls_of("record")
    before = len(exports)
    redcap.sync()
    last_open_read = fake.calls_of("record")[before]
    assert "filterLogic" in last_open_read
    assert len(fake.calls_of("record")) == before + 1  # only the open-request read: nothing to do


def test_incoming_records_show_received_studies_and_late_series(
    fake: FakeRedcap, services: NodeServices, tmp_path: Path
) -> None:
    files = write_study(tmp_path / "study", 2, 2)
    uid = dcmread(files[0]).StudyInstanceUID
    facts = ReceiveFacts("CT01", "FIONA", "127.0.0.1", "assoc-1")

    def receive(paths: list[Path]) -> None:
        for path in paths:
            tmp = services.spool.tmp / f"{generate_uid()}.dcm"
            shutil.copyfile(path, tmp)
            services.ingestor.ingest(tmp, facts)
        services.clock.advance(60)  # type: ignore[attr-defined]
        sweep(services.session_factory, services.spool, services.node_key, services.clock(), 15)

    receive(files)
    redcap = source(services, fake, tmp_path)
    assert redcap.sync().incoming == 1
    record = fake.base(uid)
    assert record["study_aetitle_sender"] == "CT01" and record["study_aetitle_addressed"] == "FIONA"
    assert record["study_patient_id"] == "SYNTH-0001" and record["study_date"] == "20240102"
    series = fake.series(uid)
    assert sorted(series) == [1, 2]
    assert {row["series_num_files"] for row in series.values()} == {"2"}
    assert redcap.sync().incoming == 0  # written once

    late = write_study(tmp_path / "late", 1, 3)
    late_series = generate_uid()
    for path in late:  # a late series of the same study
        ds = dcmread(path)
        ds.StudyInstanceUID = uid
        ds.SeriesInstanceUID = late_series
        ds.save_as(path, enforce_file_format=True)
    receive(late)
    assert redcap.sync().incoming == 1
    series = fake.series(uid)
    assert sorted(series) == [1, 2, 3]
    assert series[3]["series_instance_uid"] == late_series
    assert series[3]["series_num_files"] == "3"


def test_a_series_arriving_while_the_incoming_record_is_written_is_written_too(
    fake: FakeRedcap, services: NodeServices, tmp_path: Path
) -> None:
    """A late series arrives while FIONA writes the study's Incoming record; the sweep that marks
    the study stable again commits after that write, stamped with the same moment: the late
    series must still reach REDCap on a later pass."""
    files = write_study(tmp_path / "study", 1, 2)
    late = write_study(tmp_path / "late", 1, 1)
    uid = dcmread(files[0]).StudyInstanceUID
    ds = dcmread(late[0])
    ds.StudyInstanceUID = uid
    ds.save_as(late[0], enforce_file_format=True)
    facts = ReceiveFacts("CT01", "FIONA", "127.0.0.1", "assoc-1")

    def receive(path: Path) -> None:
        tmp = services.spool.tmp / f"{generate_uid()}.dcm"
        shutil.copyfile(path, tmp)
        services.ingestor.ingest(tmp, facts)

    for path in files:
        receive(path)
    services.clock.advance(60)  # type: ignore[attr-defined]
    sweep(services.session_factory, services.spool, services.node_key, services.clock(), 15)
    redcap = source(services, fake, tmp_path)
    write = redcap.client.import_records

    def slow_write(rows: Any, overwrite: bool = False) -> int:
        receive(late[0])  # the study is receiving again while REDCap is being written
        services.clock.advance(60)  # type: ignore[attr-defined]
        return write(rows, overwrite)

    redcap.client.import_records = slow_write  # type: ignore[method-assign]
    assert redcap.sync().incoming == 1
    redcap.client.import_records = write  # type: ignore[method-assign]
    assert len(fake.series(uid)) == 1
    sweep(services.session_factory, services.spool, services.node_key, services.clock(), 15)
    assert redcap.sync().incoming == 1
    assert len(fake.series(uid)) == 2
    assert redcap.sync().incoming == 0


def test_incoming_records_can_be_turned_off(
    fake: FakeRedcap, services: NodeServices, tmp_path: Path
) -> None:
    redcap = source(services, fake, tmp_path, write_incoming=False)
    fake.metadata = [row for row in load_dictionary() if not row["field_name"].startswith("series")]
    assert redcap.sync().incoming == 0  # and the series fields are not required


# -- the poller --------------------------------------------------------------------------------


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_forbidden_is_one_alert_and_no_retry_loop_until_the_token_changes(
    fake: FakeRedcap, services: NodeServices, tmp_path: Path
) -> None:
    config = redcap_config(fake, tmp_path, services)
    assert config.requests.redcap is not None
    token = config.requests.redcap.token_file
    token.write_text("E" * 32)  # revoked
    ticks = Ticks()
    poller = RedcapPoller(config, services.session_factory, services.node_key, services.clock,
                          monotonic=ticks)  # fmt: skip
    assert poller.poll() is None
    for _ in range(5):  # the schedule keeps ticking: no calls until something changes
        ticks.now += 60
        assert poller.poll() is None
    assert len(fake.calls) == 1
    (alert,) = audit(services, AuditEventType.REQUEST_SOURCE_ALERT)
    assert alert.details["kind"] == "forbidden" and "E" * 32 not in str(alert.details)
    token.write_text(TOKEN)  # the operator puts in the new token
    os.utime(token, (0, 12345))
    assert poller.poll() is not None
    assert poller.alert is None and poller.failures == 0


def test_transient_failures_back_off_and_recover(
    fake: FakeRedcap, services: NodeServices, tmp_path: Path
) -> None:
    config = redcap_config(fake, tmp_path, services)
    ticks = Ticks()
    redcap = RedcapSource(config, services.session_factory, services.node_key, services.clock,
                          client(fake))  # fmt: skip
    poller = RedcapPoller(config, services.session_factory, services.node_key, services.clock,
                          source=redcap, monotonic=ticks)  # fmt: skip
    fake.fault("status", 502, times=6)  # two polls' worth of attempts
    assert poller.poll() is None and poller.failures == 1
    storage = config.storage.path
    failed = read_beat(storage, "redcap-failed")
    assert read_beat(storage, "redcap") is None and failed is not None
    assert failed["kind"] == "transient"  # what the dashboard and /readyz show
    first_wait = poller.next_attempt - ticks.now
    assert 60 <= first_wait <= 120  # poll_seconds 60 · 2, with jitter
    ticks.now += first_wait / 2
    calls = len(fake.calls)
    assert poller.poll() is None and len(fake.calls) == calls  # still waiting
    ticks.now = poller.next_attempt
    assert poller.poll() is None and poller.failures == 2
    assert poller.next_attempt - ticks.now >= first_wait  # waits grow
    ticks.now = poller.next_attempt
    uid = generate_uid()
    fake.add_transfer(uid, transfer_project_name="BICAM", transfer_name="BICAM001")
    woken: list[bool] = []
    poller.on_requests = lambda: woken.append(True)
    result = poller.poll()
    assert result is not None and result.created == 1 and woken == [True]
    assert poller.failures == 0
    assert read_beat(storage, "redcap") is not None
    assert audit(services, AuditEventType.REQUEST_SOURCE_ALERT) == []  # transient: no alert


# -- the operator's command ----------------------------------------------------------------------


def test_fiona_request_sync_says_what_redcap_says(fake: FakeRedcap, tmp_path: Path) -> None:
    token = token_file(tmp_path, "E" * 32)
    path = write_config(
        tmp_path / "node",
        f"sqlite:///{tmp_path}/fiona.db",
        destinations=PACS,
        projects={"BICAM": {"destinations": ["pacs"]}},
        requests={"source": "redcap", "redcap": {"url": fake.url, "token_file": str(token)}},
    )

    def sync() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fiona", "request", "sync", "--config", str(path)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    refused = sync()
    assert refused.returncode == 1
    assert "REDCap refused the token (HTTP 403) (forbidden)" in refused.stderr
    assert "You do not have permissions to use the API" in refused.stderr
    assert "E" * 32 not in refused.stderr + refused.stdout
    token.write_text(TOKEN)
    uid = generate_uid()
    fake.add_transfer(uid, transfer_project_name="BICAM", transfer_name="BICAM001")
    fake.add_transfer("1.2.x", transfer_project_name="BICAM", transfer_name="BICAM002")
    done = sync()
    assert done.returncode == 0, done.stderr
    assert "requests: 1 new, 0 changed, 0 changes refused, 1 not accepted" in done.stdout
    assert "1.2.x#1: the record id is not a valid UID" in done.stderr
    assert fake.transfer(uid)["transfer_status"] == "new"

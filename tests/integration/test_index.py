"""The receive stage against SQLite and PostgreSQL: ingest, duplicates, quarantine,
stability, restart reconciliation, migrations."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fionatest import make_ct, sample_file, write_config
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import delete, func, select, update

from fiona.config import load_config
from fiona.db import current_revision, head_revision
from fiona.db.models import (
    AuditEvent,
    AuditEventType,
    Instance,
    InstanceState,
    QuarantinedFile,
    Series,
    Study,
    StudyState,
)
from fiona.scp.header import InstanceHeader
from fiona.scp.index import InstanceRecord, StoreOutcome
from fiona.scp.ingest import ReceiveFacts, Status
from fiona.scp.recovery import reconcile, recover_folder_of, recover_stopped_folders
from fiona.scp.server import NodeServices, open_node_services
from fiona.scp.spool import Spool
from fiona.scp.stability import sweep

pytestmark = pytest.mark.integration

FACTS = ReceiveFacts("CT01", "FIONA", "127.0.0.1", "assoc-1")


def put(services: NodeServices, source: Path | bytes, name: str = "in.dcm") -> Path:
    """Place bytes in the spool's tmp/ as the SCP's chunked receive would."""
    tmp = services.spool.tmp / f"{generate_uid()}-{name}"
    if isinstance(source, bytes):
        tmp.write_bytes(source)
    else:
        shutil.copyfile(source, tmp)
    return tmp


def save(ds, path: Path) -> Path:  # type: ignore[no-untyped-def]
    ds.save_as(path, enforce_file_format=True)
    return path


def count(services: NodeServices, model: type) -> int:
    with services.session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def audit_types(services: NodeServices) -> list[AuditEventType]:
    with services.session_factory() as session:
        return list(session.scalars(select(AuditEvent.event_type).order_by(AuditEvent.id)))


def test_migrations_reach_head(services: NodeServices) -> None:
    assert current_revision(services.engine) == head_revision()


def test_ingest_stores_exact_bytes_and_indexes(services: NodeServices) -> None:
    source = sample_file("CT_small.dcm")
    result = services.ingestor.ingest(put(services, source), FACTS)
    assert result.status == Status.SUCCESS and result.outcome is StoreOutcome.STORED
    ds = dcmread(source)
    stored = services.spool.instance_path(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    assert stored.read_bytes() == source.read_bytes()
    with services.session_factory() as session:
        row = session.scalars(select(Instance)).one()
        assert row.sop_instance_uid == ds.SOPInstanceUID
        assert row.sop_class_uid == ds.SOPClassUID
        assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
        assert (row.calling_ae_title, row.called_ae_title, row.peer_address) == (
            "CT01",
            "FIONA",
            "127.0.0.1",
        )
        assert row.association_id == "assoc-1"
        assert row.modality == "CT"
        assert row.size_bytes == source.stat().st_size
        assert len(row.digest) == 64
        assert row.state is InstanceState.RECEIVED
        assert row.received_at.tzinfo is not None
        study = session.scalars(select(Study)).one()
        assert study.state is StudyState.RECEIVING


def test_same_instance_twice_is_one_row(services: NodeServices) -> None:
    source = sample_file("CT_small.dcm")
    first = services.ingestor.ingest(put(services, source), FACTS)
    again = services.ingestor.ingest(put(services, source), FACTS)
    assert first.outcome is StoreOutcome.STORED
    assert again.status == Status.SUCCESS and again.outcome is StoreOutcome.DUPLICATE
    assert count(services, Instance) == 1
    assert not list(services.spool.tmp.iterdir())


def test_different_bytes_replace_and_are_recorded(services: NodeServices, tmp_path: Path) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    v1 = save(make_ct(study, series, sop_uid=sop, seed=1), tmp_path / "v1.dcm")
    v2 = save(make_ct(study, series, sop_uid=sop, seed=2), tmp_path / "v2.dcm")
    assert services.ingestor.ingest(put(services, v1), FACTS).outcome is StoreOutcome.STORED
    result = services.ingestor.ingest(put(services, v2), FACTS)
    assert result.outcome is StoreOutcome.REPLACED
    with services.session_factory() as session:
        row = session.scalars(select(Instance)).one()
        assert row.version == 2
        assert Path(services.spool.root / row.path).read_bytes() == v2.read_bytes()
    assert AuditEventType.INSTANCE_REPLACED in audit_types(services)


@pytest.mark.parametrize(
    ("make_bytes", "reason"),
    [
        (lambda p: b"\x00" * 128 + b"DICM" + b"garbage" * 50, "cannot parse|missing"),
        (lambda p: p.read_bytes()[: len(p.read_bytes()) - 3000], "truncated"),
    ],
    ids=["garbage", "truncated"],
)
def test_unparsable_bytes_are_quarantined(services: NodeServices, make_bytes, reason: str) -> None:  # type: ignore[no-untyped-def]
    payload = make_bytes(sample_file("CT_small.dcm"))
    result = services.ingestor.ingest(put(services, payload), FACTS)
    assert result.status == Status.CANNOT_UNDERSTAND
    assert result.comment is not None and result.comment.startswith("quarantined")
    assert count(services, Instance) == 0
    with services.session_factory() as session:
        row = session.scalars(select(QuarantinedFile)).one()
        assert re.search(reason, row.reason)
        kept = services.spool.root / row.path
        assert kept.read_bytes() == payload  # nothing is lost
        sidecar = json.loads(kept.with_suffix(".json").read_text())
        assert sidecar["calling_ae_title"] == "CT01" and sidecar["reason"] == row.reason
    assert AuditEventType.INSTANCE_QUARANTINED in audit_types(services)


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_uids_are_quarantined(services: NodeServices, tmp_path: Path, missing: str) -> None:
    ds = make_ct(generate_uid(), generate_uid())
    delattr(ds, missing)
    path = tmp_path / "x.dcm"
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=False)
    result = services.ingestor.ingest(put(services, path), FACTS)
    assert result.status == Status.CANNOT_UNDERSTAND
    with services.session_factory() as session:
        assert missing in session.scalars(select(QuarantinedFile.reason)).one()


def test_uid_that_would_escape_the_spool_is_quarantined(
    services: NodeServices, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pydicom warns about the UID only in its default mode; an in-process node set earlier
    # in the session (configure_pynetdicom) switches that off process-wide.
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.WARN)
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds = make_ct("../../../../tmp/evil", generate_uid())
    path = save(ds, tmp_path / "evil.dcm")
    result = services.ingestor.ingest(put(services, path), FACTS)
    assert result.status == Status.CANNOT_UNDERSTAND
    assert not list(services.spool.incoming.rglob("*.dcm"))


def test_command_and_dataset_uid_mismatch_is_quarantined(services: NodeServices) -> None:
    result = services.ingestor.ingest(
        put(services, sample_file("CT_small.dcm")), FACTS, expected_sop_instance_uid="1.2.3.4"
    )
    assert result.status == Status.CANNOT_UNDERSTAND
    assert count(services, Instance) == 0


def test_out_of_space_answers_a700_and_keeps_nothing_half(services: NodeServices) -> None:
    full = Spool(services.spool.root, services.spool.free_bytes() // 2**20 + 100)
    services.ingestor.spool = full
    result = services.ingestor.ingest(put(services, sample_file("CT_small.dcm")), FACTS)
    assert result.status == Status.OUT_OF_RESOURCES
    assert "min_free_mb" in (result.comment or "")
    assert count(services, Instance) == 0
    assert not list(services.spool.incoming.rglob("*.dcm"))
    assert AuditEventType.STORE_REFUSED in audit_types(services)


def test_failed_fsync_answers_a700_and_the_resend_is_stored(
    services: NodeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that cannot make the bytes durable gets no success; the retry then works."""
    import errno

    import fiona.scp.ingest as ingest_module

    source = sample_file("CT_small.dcm")

    def broken_fsync(_fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(ingest_module.os, "fsync", broken_fsync)
        failed = services.ingestor.ingest(put(services, source), FACTS)
    assert failed.status == Status.OUT_OF_RESOURCES
    assert "cannot store file" in (failed.comment or "")
    assert not list(services.spool.incoming.rglob("*.dcm"))
    with services.session_factory() as session:
        assert all(row.file_missing for row in session.scalars(select(Instance)))
    assert AuditEventType.STORE_REFUSED in audit_types(services)

    again = services.ingestor.ingest(put(services, source), FACTS)
    assert again.ok
    with services.session_factory() as session:
        (row,) = session.scalars(select(Instance))
        assert not row.file_missing
        assert (services.spool.root / row.path).read_bytes() == source.read_bytes()


def test_stability_sweep_and_reopen(services: NodeServices, clock, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study, series = generate_uid(), generate_uid()
    for i in range(3):
        path = save(make_ct(study, series, instance_number=i + 1, seed=i), tmp_path / f"{i}.dcm")
        assert services.ingestor.ingest(put(services, path), FACTS).ok
    args = (services.session_factory, services.spool, services.node_key)
    clock.advance(5)
    assert sweep(*args, clock(), 10).studies_stable == 0  # still within the window
    clock.advance(5.5)  # 10.5 s: past N, but within the writer's touch slack
    assert sweep(*args, clock(), 10).studies_stable == 0
    clock.advance(1)
    result = sweep(*args, clock(), 10)
    assert (result.studies_stable, result.series_stable, result.metadata_written) == (1, 1, 1)
    with services.session_factory() as session:
        assert session.scalars(select(Study.instance_count)).one() == 3
        assert session.scalars(select(Series.instance_count)).one() == 3
    metadata = json.loads(services.spool.series_metadata_path(study, series).read_text())
    assert metadata["NumFiles"] == 3
    assert metadata["Modality"] == "CT"
    assert metadata["SeriesInstanceUID"] == series
    assert metadata["IncomingConnection"] == [
        {"CallingAETitle": "CT01", "CalledAETitle": "FIONA", "PeerAddress": "127.0.0.1"}
    ]
    assert metadata["ClassifyType"] == []
    assert "PatientName" not in metadata and "PatientID" not in metadata
    assert sweep(*args, clock(), 10).studies_stable == 0  # idempotent

    # A late instance re-opens the study; it is new for the later stages.
    late = save(make_ct(study, series, instance_number=9, seed=9), tmp_path / "late.dcm")
    assert services.ingestor.ingest(put(services, late), FACTS).ok
    with services.session_factory() as session:
        row = session.scalars(select(Study)).one()
        assert row.state is StudyState.RECEIVING and row.reopened_count == 1
        assert session.scalars(select(Series.metadata_written_at)).one() is None
    clock.advance(12)
    assert sweep(*args, clock(), 10).metadata_written == 1
    metadata = json.loads(services.spool.series_metadata_path(study, series).read_text())
    assert metadata["NumFiles"] == 4
    types = audit_types(services)
    assert types.count(AuditEventType.STUDY_STABLE) == 2
    assert AuditEventType.STUDY_REOPENED in types


def test_steady_arrivals_keep_the_study_open(services: NodeServices, clock, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Instances 0.4 s apart for 30 s: never stable while they arrive (the writer writes
    last_received_at at most once a second), stable N + 1 s after the last one."""
    study, series = generate_uid(), generate_uid()
    args = (services.session_factory, services.spool, services.node_key)
    for i in range(75):
        path = save(make_ct(study, series, instance_number=i + 1, seed=i), tmp_path / f"{i}.dcm")
        assert services.ingestor.ingest(put(services, path), FACTS).ok
        assert sweep(*args, clock(), 2).studies_stable == 0, f"stable early at {i}"
        clock.advance(0.4)
    clock.advance(2.7)
    assert sweep(*args, clock(), 2).studies_stable == 1
    with services.session_factory() as session:
        assert session.scalars(select(Study.instance_count)).one() == 75


def test_a_study_deleted_elsewhere_is_received_again(
    services: NodeServices, tmp_path: Path
) -> None:
    """Retention or a subject's erasure deletes a study's rows from another process; the
    same study sent again must be indexed anew, not fail on the ids this writer remembers."""
    study, series = generate_uid(), generate_uid()
    first = save(make_ct(study, series, seed=1), tmp_path / "1.dcm")
    assert services.ingestor.ingest(put(services, first), FACTS).ok
    with services.session_factory() as session, session.begin():
        session.execute(delete(Instance))
        session.execute(delete(Series))
        session.execute(delete(Study))
    for seed in (1, 2):  # the same instance again, and one more of the study
        again = save(make_ct(study, series, seed=seed), tmp_path / f"again-{seed}.dcm")
        result = services.ingestor.ingest(put(services, again), FACTS)
        assert result.ok, result
    with services.session_factory() as session:
        (row,) = session.scalars(select(Study))
        assert row.study_instance_uid == study
        assert session.scalar(select(func.count()).select_from(Instance)) == 2


def test_a_deleted_studys_row_id_is_never_given_to_another_study(
    services: NodeServices, tmp_path: Path
) -> None:
    """A writer that remembers a deleted study's row id must not file that study's instances
    under another study that got the same id (SQLite reuses the largest rowid by default)."""
    deleted, other = generate_uid(), generate_uid()
    series = {uid: generate_uid() for uid in (deleted, other)}
    first = save(make_ct(deleted, series[deleted], seed=1), tmp_path / "1.dcm")
    assert services.ingestor.ingest(put(services, first), FACTS).ok
    with services.session_factory() as session, session.begin():  # retention, elsewhere
        session.execute(delete(Instance))
        session.execute(delete(Series))
        session.execute(delete(Study))
    newcomer = save(make_ct(other, series[other], seed=3), tmp_path / "3.dcm")
    assert services.ingestor.ingest(put(services, newcomer), FACTS).ok
    again = save(make_ct(deleted, series[deleted], seed=2), tmp_path / "2.dcm")
    assert services.ingestor.ingest(put(services, again), FACTS).ok
    with services.session_factory() as session:
        studies = {row.id: row.study_instance_uid for row in session.scalars(select(Study))}
        filed = {
            dcmread(services.spool.root / row.path).StudyInstanceUID: studies[row.study_id]
            for row in session.scalars(select(Instance))
        }
    assert filed == {deleted: deleted, other: other}


def test_reconcile_after_a_crash(services: NodeServices, clock, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study, series = generate_uid(), generate_uid()
    kept = save(make_ct(study, series, seed=1), tmp_path / "kept.dcm")
    gone = save(make_ct(study, series, seed=2), tmp_path / "gone.dcm")
    assert services.ingestor.ingest(put(services, kept), FACTS).ok
    assert services.ingestor.ingest(put(services, gone), FACTS).ok
    # Crash traces: an unindexed file (rename done, commit lost), a half-received
    # temporary file, and a row whose file disappeared.
    orphan = make_ct(study, series, seed=3)
    orphan_path = services.spool.instance_path(study, series, orphan.SOPInstanceUID)
    orphan.save_as(orphan_path, enforce_file_format=True)
    (services.spool.tmp / "partial.dcm").write_bytes(b"half")
    gone_ds = dcmread(gone)
    services.spool.instance_path(study, series, gone_ds.SOPInstanceUID).unlink()

    result = reconcile(services.session_factory, services.spool, services.writer, clock())
    assert (result.temporary_removed, result.files_indexed, result.rows_missing_file) == (1, 1, 1)
    assert not list(services.spool.tmp.iterdir())
    with services.session_factory() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
        assert rows[orphan.SOPInstanceUID].calling_ae_title == "recovered"
        assert rows[gone_ds.SOPInstanceUID].file_missing is True
        assert session.scalar(select(func.count()).select_from(Instance)) == 3
    # A second pass finds nothing new.
    again = reconcile(services.session_factory, services.spool, services.writer, clock())
    assert (again.temporary_removed, again.files_indexed, again.rows_missing_file) == (0, 0, 0)
    # Sending the missing instance again restores it.
    assert services.ingestor.ingest(put(services, gone), FACTS).ok
    with services.session_factory() as session:
        row = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == gone_ds.SOPInstanceUID)
        ).one()
        assert row.file_missing is False


def test_reconcile_redoes_a_rename_the_power_failure_took(  # type: ignore[no-untyped-def]
    services: NodeServices, clock, tmp_path: Path
) -> None:
    """A success was answered with the folder's fsync put off; the power failed before the
    journal held the rename: the bytes are in tmp/ under their temporary name, the row in
    the index. Recovery moves exactly that file into place; other temporary files go (the
    count leaves out empty ones, made ahead for a store that never came)."""
    study, series = generate_uid(), generate_uid()
    sent = save(make_ct(study, series, seed=7), tmp_path / "sent.dcm")
    assert services.ingestor.ingest(put(services, sent), FACTS).ok
    sop_uid = dcmread(sent).SOPInstanceUID
    final = services.spool.instance_path(study, series, sop_uid)
    original = final.read_bytes()
    os.replace(final, services.spool.tmp / "rx-4242-17.dcm")  # the rename, undone
    (services.spool.tmp / "rx-4242-18.dcm").write_bytes(original[:1000])  # cut off
    (services.spool.tmp / "rx-4242-19.dcm").write_bytes(b"")  # made ahead, never used

    result = reconcile(services.session_factory, services.spool, services.writer, clock())
    assert (result.files_restored, result.temporary_removed, result.rows_missing_file) == (
        1,
        1,
        0,
    )
    assert final.read_bytes() == original
    assert not list(services.spool.tmp.iterdir())
    with services.session_factory() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one()
        assert row.file_missing is False
    assert AuditEventType.SPOOL_RECONCILED in audit_types(services)


def _record(study: str, series: str, received_at: datetime, sop_uid: str | None = None) -> Any:
    uid = sop_uid or generate_uid()
    header = InstanceHeader(
        "1.2.840.10008.5.1.4.1.1.2", uid, study, series, "1.2.840.10008.1.2.1", "CT"
    )
    return InstanceRecord(
        header, "CT01", "FIONA", "127.0.0.1", "assoc-1", received_at, 1234, "ab" * 32, f"x/{uid}"
    )


def test_routine_instances_take_the_short_lane_and_store_what_the_session_stores(
    services: NodeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's short lane (plain INSERTs on its own connection) writes the same row as
    the ORM session; whatever it cannot take (a known SOP instance, a due touch, an unknown
    series) goes through the session, in the same order of outcomes."""
    writer = services.writer
    lane = writer._lane
    assert lane is not None  # SQLite and PostgreSQL both have it
    taken: list[tuple[int, bool]] = []  # (rows, written) of every lane transaction
    insert = lane.insert

    def recorded(rows: list[dict[str, Any]]) -> bool:
        written = insert(rows)
        taken.append((len(rows), written))
        return written

    monkeypatch.setattr(lane, "insert", recorded)
    study, series = generate_uid(), generate_uid()
    start = datetime(2026, 12, 4, 21, 0, 0, 123456, tzinfo=UTC)

    first = _record(study, series, start)  # a new study: the session
    assert writer.index_instance(first).result(10) is StoreOutcome.STORED
    assert taken == []
    routine = _record(study, series, start + timedelta(milliseconds=300))
    assert writer.index_instance(routine).result(10) is StoreOutcome.STORED
    assert taken == [(1, True)]
    # The same instance again (identical digest): the lane finds it, the session decides.
    assert writer.index_instance(routine).result(10) is StoreOutcome.DUPLICATE
    # Its twin through the session only, to compare the rows.
    twin = _record(study, series, routine.received_at)
    monkeypatch.setattr(writer, "_lane", None)
    assert writer.index_instance(twin).result(10) is StoreOutcome.STORED
    monkeypatch.setattr(writer, "_lane", lane)
    later = _record(study, series, start + timedelta(seconds=2))  # the touch is due
    assert writer.index_instance(later).result(10) is StoreOutcome.STORED
    assert taken == [(1, True), (1, False)]  # the duplicate tried it; the due touch did not

    skip = ("id", "sop_instance_uid", "path")
    columns = [c.name for c in Instance.__table__.columns if c.name not in skip]
    with services.session_factory() as session:
        rows = {
            row.sop_instance_uid: row
            for row in session.scalars(select(Instance).where(Instance.study_id.is_not(None)))
        }
        fast, slow = rows[routine.header.sop_instance_uid], rows[twin.header.sop_instance_uid]
        assert {c: getattr(fast, c) for c in columns} == {c: getattr(slow, c) for c in columns}
        assert fast.received_at == routine.received_at and fast.state is InstanceState.RECEIVED
        study_row = session.scalars(select(Study)).one()
        assert study_row.last_received_at == later.received_at  # touched by the session


def test_index_writers_of_several_processes_take_turns_on_sqlite(tmp_path: Path, clock) -> None:  # type: ignore[no-untyped-def]
    """Receiving processes sharing one SQLite file queue for it: while another process
    holds the write turn, the writer's commit waits (no success status is answered for an
    instance that is not indexed); the kernel hands the turn on the moment that process
    lets go — here it dies (kill -9), as a crashed worker would."""
    config = load_config(write_config(tmp_path / "node", f"sqlite:///{tmp_path}/fiona.db"))
    services = open_node_services(config, clock)
    try:
        turn = tmp_path / "fiona.db.write-turn"
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time\n"
                f"fd = os.open({str(turn)!r}, os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('held', flush=True)\n"
                "time.sleep(60)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            study, series = generate_uid(), generate_uid()
            pending = services.writer.index_instance(
                _record(study, series, datetime(2026, 12, 5, tzinfo=UTC))
            )
            with pytest.raises(FutureTimeout):
                pending.result(0.5)
            assert count(services, Instance) == 0
        finally:
            holder.kill()
            holder.wait()
        assert pending.result(10) is StoreOutcome.STORED
        assert count(services, Instance) == 1
    finally:
        services.close()


def test_reconcile_goes_through_the_folders_of_processes_that_stopped(  # type: ignore[no-untyped-def]
    services: NodeServices, clock, tmp_path: Path
) -> None:
    """Every receiving process has its own tmp/<pid>. Recovery restores and clears what
    stopped processes left (their folders go too) and loose files of earlier versions, and
    leaves alone the folder of a process that still runs (a `fiona import` beside the
    restart): its files are being written."""
    study, series = generate_uid(), generate_uid()
    sent = save(make_ct(study, series, seed=8), tmp_path / "sent.dcm")
    assert services.ingestor.ingest(put(services, sent), FACTS).ok
    final = services.spool.instance_path(study, series, dcmread(sent).SOPInstanceUID)
    original = final.read_bytes()

    stopped = services.spool.tmp_root / str(_pid_of_a_process_that_ended())
    (stopped / "upload-x").mkdir(parents=True)
    os.replace(final, stopped / "rx-1.dcm")  # a worker's rename the power failure took
    (stopped / "rx-2.dcm").write_bytes(original[:900])  # cut off
    (stopped / "upload-x" / "a.dcm").write_bytes(original[:500])  # an upload cut off
    (services.spool.tmp_root / "rx-3.dcm").write_bytes(b"old")  # an earlier version's
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = services.spool.tmp_root / str(running.pid)
        busy.mkdir()
        (busy / "rx-4.dcm").write_bytes(original[:700])  # being received right now

        result = reconcile(services.session_factory, services.spool, services.writer, clock())
        assert (result.files_restored, result.temporary_removed) == (1, 3)
        assert final.read_bytes() == original
        assert not stopped.exists()
        assert (busy / "rx-4.dcm").read_bytes() == original[:700]
        assert sorted(p.name for p in services.spool.tmp_root.iterdir()) == sorted(
            [str(os.getpid()), str(running.pid)]
        )
    finally:
        running.kill()
        running.wait()


def test_a_folder_left_before_a_reboot_is_recovered_though_its_pid_is_taken_again(  # type: ignore[no-untyped-def]
    services: NodeServices, clock, tmp_path: Path
) -> None:
    """After a power failure and reboot another process may run under the id of a worker of
    the old boot: its folder, last changed before that process started, is recovered all the
    same — and a row an earlier start flagged missing gets its file back."""
    finals, originals = _two_stored(services, tmp_path)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old = services.spool.tmp_root / str(running.pid)  # the old boot's worker's folder
        old.mkdir()
        os.replace(finals[0], old / "rx-1.dcm")  # renames the power failure took
        os.replace(finals[1], old / "rx-2.dcm")
        with services.session_factory() as session, session.begin():  # an earlier start
            session.execute(
                update(Instance)
                .where(Instance.path == services.spool.relative(finals[1]))
                .values(file_missing=True)
            )
        before_boot = time.time() - 3600
        os.utime(old, (before_boot, before_boot))

        result = reconcile(services.session_factory, services.spool, services.writer, clock())
        assert result.files_restored == 2
        assert [final.read_bytes() for final in finals] == originals
        assert not old.exists()
        with services.session_factory() as session:
            assert not any(session.scalars(select(Instance.file_missing)))
    finally:
        running.kill()
        running.wait()


def test_the_folder_of_a_worker_that_died_is_recovered_at_once(  # type: ignore[no-untyped-def]
    services: NodeServices, clock, tmp_path: Path
) -> None:
    """A worker killed between its index commit and its rename: while the node runs on, the
    primary puts the file in place (no restart needed), drops what was cut off, and never
    overwrites a file a sender stored meanwhile."""
    finals, originals = _two_stored(services, tmp_path)
    dead = services.spool.tmp_root / str(_pid_of_a_process_that_ended())
    (dead / "upload-x").mkdir(parents=True)
    os.replace(finals[0], dead / "rx-1.dcm")  # indexed, not yet renamed
    (dead / "rx-2.dcm").write_bytes(originals[1])  # the same instance, already in place
    (dead / "rx-3.dcm").write_bytes(originals[0][:900])  # cut off
    (dead / "upload-x" / "a.dcm").write_bytes(b"")  # made ahead for a store that never came

    restored, removed = recover_folder_of(services.session_factory, services.spool,
                                          int(dead.name), clock())  # fmt: skip
    assert (restored, removed) == (1, 2)
    assert [final.read_bytes() for final in finals] == originals
    assert not dead.exists()
    with services.session_factory() as session:
        (event,) = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == AuditEventType.SPOOL_RECONCILED)
        )
    assert event.details["process"] == int(dead.name)
    assert event.details["files_restored"] == [services.spool.relative(finals[0])]

    # A folder of a process that runs is not touched.
    assert recover_folder_of(services.session_factory, services.spool, os.getpid(), clock()) == (
        0, 0
    )  # fmt: skip
    assert services.spool.tmp.exists()


def test_folders_of_processes_that_stopped_are_recovered_while_the_node_runs(  # type: ignore[no-untyped-def]
    services: NodeServices, clock
) -> None:
    """The primary's minute job: a `fiona import` killed mid-way leaves its folder; it is
    cleared without a restart. Running processes' folders, this one's included, stay."""
    stopped = services.spool.tmp_root / str(_pid_of_a_process_that_ended())
    stopped.mkdir()
    (stopped / "rx-1.dcm").write_bytes(b"\0" * 600)  # cut off
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = services.spool.tmp_root / str(running.pid)
        busy.mkdir()
        (busy / "rx-2.dcm").write_bytes(b"\0" * 700)
        assert recover_stopped_folders(services.session_factory, services.spool, clock()) == 1
        assert not stopped.exists()
        assert (busy / "rx-2.dcm").exists() and services.spool.tmp.exists()
    finally:
        running.kill()
        running.wait()


def _two_stored(services: NodeServices, tmp_path: Path) -> tuple[list[Path], list[bytes]]:
    """Two instances of one series received: their files in place, and their bytes."""
    study, series = generate_uid(), generate_uid()
    files = [save(make_ct(study, series, seed=n), tmp_path / f"{n}.dcm") for n in (1, 2)]
    for path in files:
        assert services.ingestor.ingest(put(services, path), FACTS).ok
    finals = [
        services.spool.instance_path(study, series, dcmread(path).SOPInstanceUID) for path in files
    ]
    return finals, [final.read_bytes() for final in finals]


def _pid_of_a_process_that_ended() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid

"""Routing with a running ``fiona serve``: project AE titles, rules, and studies nothing claims.

Studies are sent with dcmtk ``storescu``; routed ones must reach the research PACS (a real
Orthanc) under the right pseudonym, the others must wait, listed as unassigned, each decision
an audit row.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from fionatest import write_study
from forwarding import Node, dicom_destination
from peers import Orthanc, ScriptedSCP
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from fiona.config import FionaConfig
from fiona.db import (
    AuditEvent,
    AuditEventType,
    DeliveryState,
    Instance,
    RequestStatus,
    Study,
    StudyState,
    TransferRequest,
)
from fiona.requests import create_request
from fiona.router.coupling import coupling_for, import_coupling, parse_coupling_csv
from fiona.router.retention import apply_retention
from fiona.scp.ingest import ReceiveFacts
from fiona.scp.server import NodeServices
from fiona.scp.stability import sweep

pytestmark = pytest.mark.integration

RULES = """
rules:
  - id: mr3-bicam
    match: {calling_ae: MR3, PatientID: 'BICAM\\d{3}'}
    project: BICAM
    pseudonym: PatientID
    event: baseline
"""


@pytest.fixture(autouse=True)
def _mmiv_uids_may_be_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.IGNORE)


def request_of(node: Node, study_uid: str) -> TransferRequest:
    def found() -> TransferRequest | None:
        with node.sessions() as session:
            return session.scalars(
                select(TransferRequest).where(TransferRequest.study_instance_uid == study_uid)
            ).first()

    return node.until("a request for the study", found)


def test_studies_go_by_project_ae_title_or_rule_and_the_rest_wait_unassigned(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    rules = tmp_path / "routing.yaml"
    rules.write_text(RULES)
    with Orthanc(tmp_path / "pacs") as pacs:
        node = node_factory(
            {"research-pacs": dicom_destination(pacs)},
            project={"pseudonym_pattern": r"^BICAM\d{3}$"},
            routing={"rules_file": str(rules)},
        )
        by_ae = write_study(tmp_path / "a", 1, 2, patient_id="BICAM001")
        by_rule = write_study(tmp_path / "b", 1, 2, patient_id="BICAM002")
        nothing = write_study(tmp_path / "c", 1, 2, patient_id="12345678901")
        not_a_pseudonym = write_study(tmp_path / "d", 1, 1, patient_id="12345678901")
        node.send(by_ae, called="BICAM")
        node.send(by_rule, calling="MR3")
        node.send(nothing, calling="CT1")
        node.send(not_a_pseudonym, called="BICAM")
        sent = {"ae": by_ae, "rule": by_rule, "none": nothing, "bad": not_a_pseudonym}
        uid = {name: dcmread(files[0]).StudyInstanceUID for name, files in sent.items()}

        first = request_of(node, uid["ae"])
        assert (first.source, first.transfer_name, first.requested_by) == (
            "ae-title",
            "BICAM001",
            "fiona",
        )
        second = request_of(node, uid["rule"])
        assert (second.source, second.transfer_name, second.transfer_event_name) == (
            "rule:mr3-bicam", "BICAM002", "baseline"
        )  # fmt: skip
        for request in (first, second):
            done = node.wait_request(request.id, RequestStatus.SENT, RequestStatus.FAILED)
            assert done.status == RequestStatus.SENT, node.server.log()
        held = node.wait_request(request_of(node, uid["bad"]).id, RequestStatus.HELD)
        assert "does not match the project's pattern" in (held.transfer_error_message or "")
        assert pacs.wait_for_instances(4) == 4
        for request in (first, second):
            with node.sessions() as session:
                mapped = session.get(TransferRequest, request.id).transfer_mapped_uid  # type: ignore[union-attr]
            (one, *_) = pacs.instances_of_study(mapped or "")
            assert pacs.instance_tags(one["ID"])["PatientID"] == request.transfer_name

        # The study nothing claimed waits, listed as unassigned, its decision audited.
        listed = json.loads(node.server.cli("studies", "--unassigned", "--json").stdout)
        assert [row["study_instance_uid"] for row in listed] == [uid["none"]]
        assert listed[0]["calling_ae_title"] == "CT1" and listed[0]["instances"] == 2
        decisions = node.audit(AuditEventType.ROUTING_DECISION)
        assert len(decisions) == 4
        assert sum(event.details["unassigned"] for event in decisions) == 1
        by_rule_event = next(e for e in decisions if e.details["decisions"]
                             and e.details["decisions"][0]["rule"] == "mr3-bicam")  # fmt: skip
        assert by_rule_event.details["ruleset_sha256"]
        (created_bad,) = [e for e in node.audit(AuditEventType.REQUEST_CREATED)
                          if e.request_id == held.id]  # fmt: skip
        assert "12345678901" not in json.dumps(created_bad.details)  # not a pseudonym: withheld

        shown = node.server.cli("route", "test", uid["none"]).stdout
        assert "rule mr3-bicam: calling_ae does not match 'MR3'" in shown
        assert "→ unassigned" in shown
        assert "12345678901" not in shown


def test_a_study_sent_to_a_project_ae_title_streams_before_it_is_stable(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with Orthanc(tmp_path / "pacs") as pacs:
        node = node_factory({"research-pacs": dicom_destination(pacs)}, stable_after_seconds=120)
        streamed = write_study(tmp_path / "a", 1, 3, patient_id="BICAM003")
        waiting = write_study(tmp_path / "b", 1, 2, patient_id="BICAM004")
        node.send(streamed, called="BICAM")
        node.send(waiting, calling="CT1")  # no project AE title: decided once stable
        uid = dcmread(streamed[0]).StudyInstanceUID
        request = request_of(node, uid)
        assert (request.source, request.transfer_name) == ("ae-title", "BICAM003")
        assert pacs.wait_for_instances(3) == 3  # delivered while the study still arrives
        with node.sessions() as session:
            states = dict(session.execute(select(Study.study_instance_uid, Study.state)).all())
            requests = session.scalars(select(TransferRequest)).all()
        assert set(states.values()) == {StudyState.RECEIVING}
        assert [r.study_instance_uid for r in requests] == [uid]
        (decision,) = node.audit(AuditEventType.ROUTING_DECISION)
        assert decision.details["decisions"][0]["origin"] == "ae-title"


def test_coupling_list_assigns_studies_before_and_after_they_arrive_and_replay_catches_up(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    rules = tmp_path / "routing.yaml"
    rules.write_text("rules: []\n")
    with Orthanc(tmp_path / "pacs") as pacs:
        node = node_factory({"research-pacs": dicom_destination(pacs)},
                            routing={"rules_file": str(rules)})  # fmt: skip
        here = write_study(tmp_path / "here", 1, 2, patient_id="MRN-1")
        later = write_study(tmp_path / "later", 1, 1, patient_id="MRN-2")
        stray = write_study(tmp_path / "stray", 1, 1, patient_id="BICAM777")
        for files, accession in ((here, "ACC001"), (later, "ACC002"), (stray, "ACC003")):
            for path in files:
                ds = dcmread(path)
                ds.AccessionNumber = accession
                ds.save_as(path, enforce_file_format=True)
        uid = {name: dcmread(files[0]).StudyInstanceUID
               for name, files in (("here", here), ("later", later), ("stray", stray))}  # fmt: skip
        node.send(here + stray, calling="PACS")
        node.until(
            "two unassigned studies",
            lambda: (
                len(json.loads(node.server.cli("studies", "--unassigned", "--json").stdout)) == 2
            ),
        )

        bad = tmp_path / "bad.csv"
        bad.write_text("AccessionNumber,ProjectName,subjectid\nACC001,NOPE,\n")
        refused = node.server.cli("coupling", "import", str(bad), check=False)
        assert refused.returncode == 2
        assert "line 2: project 'NOPE' is not configured" in refused.stderr
        assert "line 2: subjectid is empty" in refused.stderr

        csv_file = tmp_path / "coupling.csv"
        csv_file.write_text(
            "AccessionNumber,ProjectName,subjectid,eventname\n"
            "ACC001,BICAM,BICAM101,baseline\nACC002,BICAM,BICAM102,baseline\n"
        )
        out = node.server.cli("coupling", "import", str(csv_file)).stdout
        assert "2 coupling entries added" in out and "1 of their studies are already here" in out
        first = request_of(node, uid["here"])
        assert (first.source, first.transfer_name, first.transfer_event_name) == (
            "coupling", "BICAM101", "baseline"
        )  # fmt: skip
        node.send(later, calling="PACS")  # arrives after its entry
        second = request_of(node, uid["later"])
        assert (second.source, second.transfer_name) == ("coupling", "BICAM102")
        for request in (first, second):
            assert node.wait_request(request.id, RequestStatus.SENT).status == RequestStatus.SENT
        assert pacs.wait_for_instances(3) == 3
        (imported,) = node.audit(AuditEventType.COUPLING_IMPORTED)
        assert imported.details["entries"] == 2 and "ACC001" not in json.dumps(imported.details)

        # A rule added later: replay shows what it would do, then --apply does it.
        rules.write_text(RULES.replace("calling_ae: MR3", "calling_ae: PACS"))
        dry = node.server.cli("route", "replay", "--since", "2000-01-01").stdout
        assert f"{uid['stray']}  → BICAM (rule:mr3-bicam), pseudonym BICAM777" in dry
        assert "would be created" in dry and "1 requests missing" in dry
        applied = node.server.cli("route", "replay", "--since", "2000-01-01", "--apply").stdout
        assert "1 requests created" in applied
        third = request_of(node, uid["stray"])
        assert third.source == "rule:mr3-bicam"
        assert node.wait_request(third.id, RequestStatus.SENT).status == RequestStatus.SENT
        again = node.server.cli("route", "replay", "--since", "2000-01-01").stdout
        assert "0 requests missing" in again  # nothing twice


def test_coupling_entries_expire(services: NodeServices) -> None:
    config = FionaConfig.model_validate(
        {"projects": {"BICAM": {}}, "storage": {"path": str(services.spool.root)}}
    )
    rows, problems = parse_coupling_csv(
        "StudyInstanceUID,ProjectName,subjectid,eventname\n1.2.3.4,BICAM,BICAM001,\n", config
    )
    assert problems == []
    start = services.clock()
    import_coupling(services.session_factory, rows, start, "admin", services.node_key, 30, "x")
    with services.session_factory() as session, session.begin():
        study = Study(study_instance_uid="1.2.3.4", state=StudyState.STABLE,
                      first_received_at=start, last_received_at=start)  # fmt: skip
        session.add(study)
        session.flush()
        assert [c.pseudonym for c in coupling_for(session, study, start)] == ["BICAM001"]
        assert coupling_for(session, study, start + timedelta(days=31)) == []


def test_a_project_drops_modalities_it_never_receives_and_names_its_sites(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    with Orthanc(tmp_path / "pacs") as pacs:
        node = node_factory({"research-pacs": dicom_destination(pacs)},
                            project={"drop": ["CT"], "sites": {"01": "Bergen"}})  # fmt: skip
        files = write_study(tmp_path / "study", 2, 2)
        for path in files[2:]:  # the second series is MR
            ds = dcmread(path)
            ds.Modality = "MR"
            ds.save_as(path, enforce_file_format=True)
        node.send(files)
        uid = dcmread(files[0]).StudyInstanceUID
        out = node.server.cli("request", "add", "--study-uid", uid, "--project", "BICAM",
                              "--pseudonym", "BICAM001", "--site", "01").stdout  # fmt: skip
        request_id = int(out.split()[1])
        request = node.wait_request(request_id, RequestStatus.SENT, RequestStatus.FAILED)
        assert request.status == RequestStatus.SENT, node.server.log()
        found = pacs.instances_of_study(request.transfer_mapped_uid or "")
        assert len(found) == 2  # the CT series stayed behind
        tags = pacs.instance_tags(found[0]["ID"])
        assert tags["Modality"] == "MR"
        assert (tags["ClinicalTrialSiteID"], tags["ClinicalTrialSiteName"]) == ("01", "Bergen")
        skipped = [row for row in node.ledger(request_id) if row.state == DeliveryState.SKIPPED]
        assert len(skipped) == 2 and "modality CT is not forwarded" in (skipped[0].last_error or "")


def test_sighup_reloads_the_rules_and_a_broken_file_keeps_the_old_ones(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    rules = tmp_path / "routing.yaml"
    rules.write_text("rules: []\n")
    with ScriptedSCP() as scp:
        node = node_factory({"pacs": dicom_destination(scp)}, routing={"rules_file": str(rules)})
        assert node.server.proc is not None

        def reload_and_wait(what: Callable[[], bool]) -> None:
            node.server.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            node.until("the rules reloaded", what, timeout=30)

        rules.write_text(RULES.replace("calling_ae: MR3", "calling_ae: CT7"))
        reload_and_wait(lambda: len(node.audit(AuditEventType.RULES_LOADED)) == 2)
        first = write_study(tmp_path / "first", 1, 1, patient_id="BICAM005")
        node.send(first, calling="CT7")
        assert request_of(node, dcmread(first[0]).StudyInstanceUID).source == "rule:mr3-bicam"

        rules.write_text("rules: [{id: broken}]\n")
        reload_and_wait(lambda: "routing rules not reloaded" in node.server.log())
        assert len(node.audit(AuditEventType.RULES_LOADED)) == 2
        second = write_study(tmp_path / "second", 1, 1, patient_id="BICAM006")
        node.send(second, calling="CT7")  # still routed by the rule in use
        assert request_of(node, dcmread(second[0]).StudyInstanceUID).transfer_name == "BICAM006"


def test_retention_warns_then_deletes_only_studies_nobody_asked_for(
    services: NodeServices, tmp_path: Path
) -> None:
    config = FionaConfig.model_validate(
        {
            "storage": {"path": str(services.spool.root)},
            "routing": {"unassigned_retention_days": 30, "retention_warning_days": 7},
        }
    )
    facts = ReceiveFacts("CT01", "FIONA", "127.0.0.1", "assoc-1")
    uids = []
    for name in ("orphan", "asked"):
        files = write_study(tmp_path / name, 1, 2)
        uids.append(dcmread(files[0]).StudyInstanceUID)
        for path in files:
            tmp = services.spool.tmp / f"{name}-{path.name}"
            shutil.copyfile(path, tmp)
            services.ingestor.ingest(tmp, facts)
    clock = services.clock
    clock.advance(60)  # type: ignore[attr-defined]
    sweep(services.session_factory, services.spool, services.node_key, clock(), 15)
    orphan, asked = uids
    with services.session_factory() as session, session.begin():
        create_request(session, study_instance_uid=asked, project="BICAM", pseudonym="BICAM001",
                       requested_by="admin", now=clock(), node_key=services.node_key)  # fmt: skip
        create_request(session, study_instance_uid=asked, project="BICAM", pseudonym="X",
                       requested_by="admin", now=clock(), node_key=services.node_key)  # fmt: skip

    def run() -> tuple[int, int]:
        result = apply_retention(services.session_factory, services.spool, config,
                                 services.node_key, clock())  # fmt: skip
        return result.warned, result.deleted

    def audited(kind: AuditEventType) -> int:
        with services.session_factory() as session:
            return len(
                session.scalars(select(AuditEvent).where(AuditEvent.event_type == kind)).all()
            )

    assert run() == (0, 0)
    clock.advance(22 * 86400)  # type: ignore[attr-defined]
    assert run() == (0, 0)  # 8 days left: not yet announced
    clock.advance(2 * 86400)  # type: ignore[attr-defined]
    assert run() == (1, 0)  # announced 6 days ahead
    assert audited(AuditEventType.UNASSIGNED_EXPIRING) == 1
    clock.advance(5 * 86400)  # type: ignore[attr-defined]
    assert run() == (0, 0)  # day 29: still kept
    assert (services.spool.incoming / orphan).is_dir()
    clock.advance(2 * 86400)  # type: ignore[attr-defined]
    with services.session_factory() as session:
        orphan_files = [
            services.spool.root / path
            for path in session.scalars(
                select(Instance.path).join(Study).where(Study.study_instance_uid == orphan)
            )
        ]
    assert run() == (0, 1)  # day 31 and 7 days since the warning: deleted
    assert orphan_files and not any(path.exists() for path in orphan_files)
    assert not (services.spool.incoming / orphan).exists()
    assert (services.spool.incoming / asked).is_dir()  # a request named it: kept
    with services.session_factory() as session:
        left = session.scalars(select(Study.study_instance_uid)).all()
        assert left == [asked]
        assert len(session.scalars(select(Instance)).all()) == 2  # the orphan's rows are gone
    assert audited(AuditEventType.RETENTION_DELETED) == 1


def test_retention_leaves_an_instance_stored_while_it_deletes(
    services: NodeServices, tmp_path: Path
) -> None:
    """An instance of the study renamed into place while retention deletes it (its index
    row is committed after) keeps its file: only the files of the deleted rows go."""
    config = FionaConfig.model_validate(
        {
            "storage": {"path": str(services.spool.root)},
            "routing": {"unassigned_retention_days": 2, "retention_warning_days": 1},
        }
    )
    files = write_study(tmp_path / "study", 1, 2)
    uid = dcmread(files[0]).StudyInstanceUID
    for path in files:
        tmp = services.spool.tmp / path.name
        shutil.copyfile(path, tmp)
        services.ingestor.ingest(tmp, ReceiveFacts("CT01", "FIONA", "127.0.0.1", "assoc-1"))
    services.clock.advance(60)  # type: ignore[attr-defined]
    sweep(services.session_factory, services.spool, services.node_key, services.clock(), 15)

    def run() -> int:
        result = apply_retention(services.session_factory, services.spool, config,
                                 services.node_key, services.clock())  # fmt: skip
        return result.deleted

    services.clock.advance(3 * 86400)  # type: ignore[attr-defined]
    assert run() == 0  # announced
    services.clock.advance(86400)  # type: ignore[attr-defined]
    newcomer = services.spool.instance_path(uid, generate_uid(), generate_uid())
    newcomer.parent.mkdir(parents=True)
    newcomer.write_bytes(files[0].read_bytes())  # renamed in; its row not committed yet
    assert run() == 1
    assert newcomer.exists()
    assert sorted(p.name for p in (services.spool.incoming / uid).rglob("*")) == sorted(
        [newcomer.parent.name, newcomer.name]
    )

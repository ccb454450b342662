"""The web interface and HTTP API: logins, roles, CSRF, tokens, probes, metrics.

Route tests drive the Starlette application in process (``TestClient``) over a real migrated
database (SQLite and PostgreSQL); the last test logs in to a running ``fiona serve``.
"""

from __future__ import annotations

import gc
import io
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from fionatest import FionaServer, free_port, write_config, write_study
from peers import ScriptedSCP, poll
from pydicom import dcmread
from sqlalchemy import select
from starlette.testclient import TestClient

from fiona.audit import utcnow
from fiona.config import load_config
from fiona.db import (
    AuditEvent,
    AuditEventType,
    Instance,
    RequestStatus,
    Study,
    TransferRequest,
    UserRole,
)
from fiona.heartbeat import Heartbeat
from fiona.requests import create_request
from fiona.scp.ingest import ReceiveFacts
from fiona.scp.server import NodeServices, open_node_services
from fiona.web import WebContext, create_app
from fiona.web.auth import add_user, issue_token

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
PROJECTS = {
    "BICAM": {"profile": "mmiv", "uid_scheme": "mmiv"},
    "HEART": {"profile": "mmiv", "uid_scheme": "mmiv"},
}
BICAM_UID = "1.2.826.0.1.3680043.8.498.111"
HEART_UID = "1.2.826.0.1.3680043.8.498.222"


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[NodeServices]:
    config = load_config(
        write_config(
            tmp_path / "node",
            db_url,
            projects=PROJECTS,
            web={"login_attempts": 3, "login_window_seconds": 60, "max_upload_mb": 1},
        )
    )
    services = open_node_services(config)
    now = utcnow()
    with services.session_factory() as session, session.begin():
        for name, role, projects in (
            ("ada", UserRole.ADMIN, ()),
            ("pia", UserRole.PROJECT, ("BICAM",)),
            ("aud", UserRole.AUDITOR, ()),
        ):
            add_user(session, name, role, projects, PASSWORD, "test", now, sorted(PROJECTS))
        for uid, project, pseudonym in (
            (BICAM_UID, "BICAM", "BICAM001"),
            (HEART_UID, "HEART", "HEART001"),
        ):
            create_request(
                session,
                study_instance_uid=uid,
                project=project,
                pseudonym=pseudonym,
                requested_by="test",
                now=now,
                node_key=services.node_key,
            )
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def client(node: NodeServices) -> Iterator[TestClient]:
    context = WebContext(node.config, node.session_factory, node.node_key, ingestor=node.ingestor)
    with TestClient(
        create_app(context), base_url="http://127.0.0.1", follow_redirects=False
    ) as test_client:
        yield test_client


def csrf_of(client: TestClient, path: str = "/login") -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def login(client: TestClient, name: str, password: str = PASSWORD) -> int:
    response = client.post(
        "/login", data={"name": name, "password": password, "csrf": csrf_of(client)}
    )
    return response.status_code


def audit_rows(node: NodeServices, kind: AuditEventType) -> list[AuditEvent]:
    with node.session_factory() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event_type == kind)))


def request_ids(node: NodeServices) -> dict[str, int]:
    with node.session_factory() as session:
        return {r.transfer_project_name: r.id for r in session.scalars(select(TransferRequest))}


def test_every_page_needs_a_login_and_logins_are_audited(
    client: TestClient, node: NodeServices
) -> None:
    assert client.get("/").headers["location"] == "/login"
    assert client.get("/api/requests").status_code == 401
    assert client.get("/api/requests").json() == {"error": "log in first"}
    assert login(client, "ada", "wrong password here") == 401
    assert login(client, "nobody", PASSWORD) == 401
    assert login(client, "ada") == 303
    page = client.get("/")
    assert page.status_code == 200 and "Dashboard" in page.text and "listening" in page.text
    cookie = client.cookies.get("fiona_session")
    assert cookie
    set_cookie = client.post(
        "/login", data={"name": "ada", "password": PASSWORD, "csrf": csrf_of(client)}
    ).headers["set-cookie"]
    assert "httponly" in set_cookie.lower() and "samesite=strict" in set_cookie.lower()
    assert client.post("/logout", data={"csrf": csrf_of(client, "/")}).status_code == 303
    assert client.get("/").status_code == 303  # logged out
    failed = audit_rows(node, AuditEventType.LOGIN_FAILED)
    assert [row.details["user"] for row in failed] == ["ada", "nobody"]
    assert all(
        "password" not in str(row.details).lower().replace("wrong name or password", "")
        for row in failed
    )
    assert len(audit_rows(node, AuditEventType.LOGIN)) == 2
    (logout,) = audit_rows(node, AuditEventType.LOGOUT)
    assert logout.details["user"] == "ada"


def test_repeated_failures_lock_the_name_out_even_with_the_right_password(
    client: TestClient, node: NodeServices
) -> None:
    for _ in range(3):
        assert login(client, "pia", "not the password") == 401
    assert login(client, "pia") == 429
    reasons = [row.details["reason"] for row in audit_rows(node, AuditEventType.LOGIN_FAILED)]
    assert reasons[-1] == "too many failed attempts"
    assert login(client, "ada") == 429  # the same address is throttled too


def test_changes_need_the_csrf_token(client: TestClient, node: NodeServices) -> None:
    assert client.post("/login", data={"name": "ada", "password": PASSWORD}).status_code == 403
    assert login(client, "ada") == 303
    ids = request_ids(node)
    refused = client.post(f"/requests/{ids['BICAM']}/cancel", data={"csrf": "forged"})
    assert refused.status_code == 403 and "CSRF" in refused.text
    refused_api = client.post(f"/api/requests/{ids['BICAM']}/cancel")
    assert refused_api.status_code == 403
    token = csrf_of(client, "/requests")
    done = client.post(f"/requests/{ids['BICAM']}/cancel", data={"csrf": token})
    assert done.status_code == 303
    with node.session_factory() as session:
        cancelled = session.get(TransferRequest, ids["BICAM"])
        assert cancelled is not None and cancelled.status == RequestStatus.CANCELLED
    (row,) = audit_rows(node, AuditEventType.REQUEST_CANCELLED)
    assert row.actor == "ada"


def test_a_project_user_sees_and_changes_only_their_projects(
    client: TestClient, node: NodeServices
) -> None:
    assert login(client, "pia") == 303
    listed = client.get("/api/requests").json()
    assert [r["project"] for r in listed] == ["BICAM"]
    page = client.get("/requests").text
    assert "BICAM001" in page and "HEART001" not in page
    ids = request_ids(node)
    token = csrf_of(client, "/requests")
    assert client.post(f"/requests/{ids['HEART']}/cancel", data={"csrf": token}).status_code == 403
    assert client.post(f"/requests/{ids['BICAM']}/cancel", data={"csrf": token}).status_code == 303
    events = client.get("/api/audit").json()
    assert events and {e["project"] for e in events} == {"BICAM"}
    assert client.get("/api/audit", params={"project": "HEART"}).json() == events


def test_an_auditor_reads_everything_and_changes_nothing(
    client: TestClient, node: NodeServices
) -> None:
    assert login(client, "aud") == 303
    assert {r["project"] for r in client.get("/api/requests").json()} == {"BICAM", "HEART"}
    ids = request_ids(node)
    token = csrf_of(client, "/requests")
    refused = client.post(f"/requests/{ids['HEART']}/cancel", data={"csrf": token})
    assert refused.status_code == 403 and "read-only" in refused.text
    audit = client.get("/audit", params={"verify": "1"})
    assert audit.status_code == 200 and "Hash chain intact" in audit.text
    exported = client.get("/audit", params={"csv": "1"})
    assert exported.headers["content-type"].startswith("text/csv")
    assert exported.text.splitlines()[0].startswith("seq,occurred_at,event,actor")
    assert "REQUEST_CREATED" in exported.text
    with node.session_factory() as session:
        statuses = {r.status for r in session.scalars(select(TransferRequest))}
    assert statuses == {RequestStatus.NEW}


def test_scripts_use_a_bearer_token(client: TestClient, node: NodeServices) -> None:
    with node.session_factory() as session, session.begin():
        token = issue_token(session, "pia", "test", utcnow())
    headers = {"authorization": f"Bearer {token}"}
    assert [r["project"] for r in client.get("/api/requests", headers=headers).json()] == ["BICAM"]
    assert (
        client.get("/api/requests", headers={"authorization": "Bearer fiona_x"}).status_code == 401
    )
    ids = request_ids(node)
    cancelled = client.post(f"/api/requests/{ids['BICAM']}/cancel", headers=headers)
    assert cancelled.status_code == 200 and "cancelled" in cancelled.json()["message"]
    with node.session_factory() as session, session.begin():
        token_after = issue_token(session, "pia", "test", utcnow())
    assert client.get("/api/requests", headers=headers).status_code == 401  # replaced
    assert client.get("/api/requests", headers={"authorization": f"Bearer {token_after}"}).json()
    schema = client.get("/api/openapi.json").json()
    assert "/api/requests" in schema["paths"] and "/api/audit" in schema["paths"]


def received(client: TestClient) -> float:
    found = re.search(
        r'fiona_instances_received_total\{outcome="stored"\} ([0-9.]+)', client.get("/metrics").text
    )
    return float(found.group(1)) if found else 0.0


def test_metrics_count_received_instances(
    client: TestClient, node: NodeServices, tmp_path: Path
) -> None:
    before = received(client)
    ingest_study(node, tmp_path / "s", patient_id="PAT000777")
    assert received(client) == before + 2


def test_probes_and_metrics_name_no_study(client: TestClient) -> None:
    assert client.get("/healthz").text == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "scp": "ok", "disk": "ok"}
    metrics = client.get("/metrics").text
    assert 'fiona_requests{project="BICAM",status="new"} 1.0' in metrics
    assert "fiona_spool_free_bytes" in metrics and "fiona_scp_listening 1.0" in metrics
    assert BICAM_UID not in metrics and "BICAM001" not in metrics


def test_fiona_serve_serves_the_web_interface(tmp_path: Path) -> None:
    web_port = free_port()
    config_path = write_config(
        tmp_path / "node",
        f"sqlite:///{tmp_path}/node/fiona.db",
        web={"host": "127.0.0.1", "port": web_port},
    )
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "fiona",
            "user",
            "add",
            "ada",
            "--role",
            "admin",
            "--password-file",
            str(password),
            "--config",
            str(config_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    server = FionaServer(config_path, load_config(config_path).node.port, tmp_path / "node/spool")
    server.start()
    try:
        poll(lambda: '"web interface listening"' in server.log(), 30, "the web interface")
        base = f"http://127.0.0.1:{web_port}"
        assert requests.get(f"{base}/healthz", timeout=10).text == "ok"
        with requests.Session() as browser:
            form = browser.get(f"{base}/login", timeout=10).text
            token = re.search(r'name="csrf" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
            done = browser.post(
                f"{base}/login",
                timeout=10,
                allow_redirects=False,
                data={"name": "ada", "password": PASSWORD, "csrf": token},
            )
            assert done.status_code == 303
            assert "Dashboard" in browser.get(f"{base}/", timeout=10).text
    finally:
        assert server.stop() == 0


def ingest_study(node: NodeServices, folder: Path, **kwargs: str) -> str:
    files = write_study(folder, 1, 2, **kwargs)
    facts = ReceiveFacts("CT7", "FIONA", "127.0.0.1", "assoc-web")
    for path in files:
        tmp = node.spool.tmp / path.name
        shutil.copyfile(path, tmp)
        node.ingestor.ingest(tmp, facts)
    return str(dcmread(files[0]).StudyInstanceUID)


def study_id_of(node: NodeServices, uid: str) -> int:
    with node.session_factory() as session:
        return int(session.scalars(select(Study.id).where(Study.study_instance_uid == uid)).one())


def test_studies_mask_patients_for_all_but_admins_and_assign_creates_a_request(
    client: TestClient, node: NodeServices, tmp_path: Path
) -> None:
    free = ingest_study(node, tmp_path / "free", patient_id="PAT123456", patient_name="Doe^Jane")
    heart = ingest_study(node, tmp_path / "heart", patient_id="PAT999888", patient_name="Roe^Rick")
    with node.session_factory() as session, session.begin():
        create_request(
            session,
            study_instance_uid=heart,
            project="HEART",
            pseudonym="HEART002",
            requested_by="test",
            now=utcnow(),
            node_key=node.node_key,
        )

    assert login(client, "ada") == 303
    listed = client.get("/studies").text
    assert "Doe^Jane" in listed and "PAT123456" in listed and "Roe^Rick" in listed
    assert "CT7 → FIONA" in listed and "unassigned" in listed
    detail = client.get(f"/studies/{study_id_of(node, free)}").text
    assert "unassigned" in detail and "Assign to a project" in detail

    client.cookies.clear()
    assert login(client, "pia") == 303
    listed = client.get("/studies").text
    assert "D. J." in listed and "•••456" in listed
    assert "Doe^Jane" not in listed and "PAT123456" not in listed
    assert "R. R." not in listed  # HEART's study is not hers
    assert client.get(f"/studies/{study_id_of(node, heart)}").status_code == 403
    target = study_id_of(node, free)
    token = csrf_of(client, f"/studies/{target}")
    form = {"csrf": token, "project": "HEART", "pseudonym": "HEART009"}
    assert client.post(f"/studies/{target}/assign", data=form).status_code == 403
    form = {"csrf": token, "project": "BICAM", "pseudonym": "BICAM009", "event": "baseline"}
    assert client.post(f"/studies/{target}/assign", data=form).status_code == 303
    with node.session_factory() as session:
        made = session.scalars(
            select(TransferRequest).where(TransferRequest.study_instance_uid == free)
        ).one()
    assert (made.transfer_project_name, made.transfer_name, made.source, made.requested_by) == (
        "BICAM",
        "BICAM009",
        "web",
        "pia",
    )
    assert "BICAM009" in client.get(f"/studies/{target}").text

    client.cookies.clear()
    assert login(client, "aud") == 303
    assert "D. J." in client.get("/studies").text
    token = csrf_of(client, f"/studies/{target}")
    form = {"csrf": token, "project": "BICAM", "pseudonym": "BICAM010"}
    assert client.post(f"/studies/{target}/assign", data=form).status_code == 403


def test_uploads_retry_resend_config_echo_and_subject_report(
    client: TestClient, node: NodeServices, tmp_path: Path
) -> None:
    free = ingest_study(node, tmp_path / "free", patient_id="PAT555111", patient_name="Poe^Ann")
    assert login(client, "pia") == 303
    token = csrf_of(client, "/requests")
    theirs = "transfer_project_name,transfer_name,study_instance_uid\nHEART,HEART050,1.2.3.4\n"
    refused = client.post(
        "/upload/requests", data={"csrf": token}, files={"file": ("r.csv", theirs, "text/csv")}
    )
    assert refused.status_code == 400 and "not yours" in refused.text
    broken = "transfer_name\nX\n"
    refused = client.post(
        "/upload/requests", data={"csrf": token}, files={"file": ("r.csv", broken, "text/csv")}
    )
    assert refused.status_code == 400 and "transfer_project_name" in refused.text
    mine = f"transfer_project_name,transfer_name,study_instance_uid\nBICAM,BICAM060,{free}\n"
    done = client.post(
        "/upload/requests", data={"csrf": token}, files={"file": ("r.csv", mine, "text/csv")}
    )
    assert done.status_code == 200 and "1 requests added" in done.text
    assert client.get("/config").status_code == 403  # configuration: admins only
    assert client.get("/subject").status_code == 403

    ids = request_ids(node)
    with node.session_factory() as session, session.begin():
        held = session.get(TransferRequest, ids["BICAM"])
        assert held is not None
        held.status, held.transfer_error_message = RequestStatus.HELD, "pseudonym"
    token = csrf_of(client, "/requests")
    assert client.post(f"/requests/{ids['BICAM']}/retry", data={"csrf": token}).status_code == 303
    with node.session_factory() as session:
        retried = session.get(TransferRequest, ids["BICAM"])
        assert retried is not None and retried.status != RequestStatus.HELD
    conflict = client.post(f"/requests/{ids['BICAM']}/resend", data={"csrf": token})
    assert conflict.status_code in (303, 409)

    client.cookies.clear()
    assert login(client, "ada") == 303
    shown = client.get("/config").text
    assert "BICAM" in shown and "HEART" in shown and "no rules" in shown
    coupling = f"StudyInstanceUID,ProjectName,subjectid,eventname\n{free},HEART,HEART070,base\n"
    token = csrf_of(client, "/config")
    added = client.post(
        "/upload/coupling", data={"csrf": token}, files={"file": ("c.csv", coupling, "text/csv")}
    )
    assert added.status_code == 200 and "1 coupling entries added" in added.text
    with node.session_factory() as session:
        projects = {
            r.transfer_project_name
            for r in session.scalars(
                select(TransferRequest).where(TransferRequest.study_instance_uid == free)
            )
        }
    assert projects == {"BICAM", "HEART"}  # the study was already here: routed at once
    report = client.get("/subject", params={"patient_id": "PAT555111"}).text
    assert "BICAM060" in report and "HEART070" in report and free in report
    assert "PAT555111" not in report.replace('value="PAT555111"', "")
    client.cookies.clear()
    assert login(client, "aud") == 303
    report = client.get("/subject", params={"patient_id": "PAT555111"}).text
    assert "BICAM060" in report and free not in report  # auditors: keys, not original UIDs


def test_c_echo_from_the_configuration_page(tmp_path: Path, db_url: str) -> None:
    with ScriptedSCP() as scp:
        config = load_config(
            write_config(
                tmp_path / "node",
                db_url,
                projects={"BICAM": {"destinations": ["pacs"]}},
                destinations={
                    "pacs": {
                        "kind": "dicom",
                        "host": "127.0.0.1",
                        "port": scp.port,
                        "ae_title": scp.ae_title,
                    }
                },
            )
        )
        services = open_node_services(config)
        try:
            with services.session_factory() as session, session.begin():
                add_user(session, "ada", UserRole.ADMIN, (), PASSWORD, "t", utcnow(), ["BICAM"])
            app = create_app(WebContext(config, services.session_factory, services.node_key))
            with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as web:
                assert login(web, "ada") == 303
                token = csrf_of(web, "/config")
                done = web.post(
                    "/destinations/pacs/echo", data={"csrf": token}, follow_redirects=True
                )
                assert "success" in done.text
                scp.stop()
                failed = web.post(
                    "/destinations/pacs/echo", data={"csrf": token}, follow_redirects=True
                )
                assert "no association" in failed.text
            with services.session_factory() as session:
                echoes = session.scalars(
                    select(AuditEvent).where(AuditEvent.event_type == AuditEventType.ECHO_TESTED)
                ).all()
            assert [(e.actor, e.details["ok"]) for e in echoes] == [("ada", True), ("ada", False)]
        finally:
            services.close()


def test_dicom_upload_enters_the_pipeline_with_a_request_per_study(
    client: TestClient, node: NodeServices, tmp_path: Path
) -> None:
    loose = write_study(tmp_path / "loose", 1, 2, patient_id="EXT0001")
    zipped = write_study(tmp_path / "zipped", 2, 1, patient_id="EXT0002")
    archive = tmp_path / "cd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for index, path in enumerate(zipped):
            zf.write(path, f"DICOM/../../etc/IM{index}")  # names are never used as paths
        zf.writestr("README.TXT", "not dicom")
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in loose]
    files.append(("files", ("cd.zip", archive.read_bytes(), "application/zip")))
    form = {"project": "BICAM", "pseudonym": "BICAM077", "event": "visit2", "site": "BGO"}

    assert login(client, "pia") == 303
    token = csrf_of(client, "/studies")
    refused = client.post(
        "/upload/dicom", data={**form, "project": "HEART", "csrf": token}, files=files
    )
    assert refused.status_code == 403
    done = client.post("/upload/dicom", data={**form, "csrf": token}, files=files)
    assert done.status_code == 200, done.text
    assert "4 instances stored in 2 studies; 0 failed; 1 files skipped" in done.text
    with node.session_factory() as session:
        made = list(
            session.scalars(select(TransferRequest).where(TransferRequest.source == "web-upload"))
        )
        callers = set(session.scalars(select(Instance.calling_ae_title).distinct()))
    assert {
        (
            r.transfer_project_name,
            r.transfer_name,
            r.transfer_event_name,
            r.transfer_site,
            r.requested_by,
        )
        for r in made
    } == {("BICAM", "BICAM077", "visit2", "BGO", "pia")}
    assert len(made) == 2 and callers == {"WEBUPLOAD"}
    assert not list(node.spool.tmp.iterdir())  # nothing left behind

    big = [("files", ("big.dcm", b"\0" * (1024 * 1024 + 1), "application/dicom"))]
    too_big = client.post("/upload/dicom", data={**form, "csrf": token}, files=big)
    assert too_big.status_code == 400 and "max_upload_mb" in too_big.text
    client.cookies.clear()
    assert login(client, "aud") == 303
    token = csrf_of(client, "/studies")
    assert (
        client.post("/upload/dicom", data={**form, "csrf": token}, files=files).status_code == 403
    )


def test_uploaded_files_are_closed_when_the_request_ends(
    client: TestClient, node: NodeServices, tmp_path: Path
) -> None:
    """An upload's temporary files (kept on disk past 1 MB) are closed with its request, not
    whenever the garbage collector finds them: none is left open after a refused upload,
    a failed CSRF check or an accepted one."""
    study = write_study(tmp_path / "study", 1, 1)
    files = [("files", ("a.dcm", study[0].read_bytes(), "application/dicom"))]
    form = {"project": "BICAM", "pseudonym": "BICAM078"}
    assert login(client, "pia") == 303
    token = csrf_of(client, "/studies")
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert (
            client.post("/upload/dicom", data={**form, "csrf": "x"}, files=files).status_code == 403
        )
        assert (
            client.post(
                "/upload/dicom", data={**form, "project": "HEART", "csrf": token}, files=files
            ).status_code
            == 403
        )
        assert (
            client.post("/upload/dicom", data={**form, "csrf": token}, files=files).status_code
            == 200
        )
        gc.collect()
    unclosed = [w for w in caught if "SpooledTemporaryFile" in str(w.message)]
    assert not unclosed, [str(w.message) for w in unclosed]


def test_exports_are_for_admins_and_their_projects_users(client: TestClient) -> None:
    assert login(client, "pia") == 303
    token = csrf_of(client, "/exports")
    refused = client.post("/exports", data={"csrf": token, "project": "HEART"})
    assert refused.status_code == 403
    assert client.post("/exports", data={"csrf": token, "project": "BICAM"}).status_code == 303
    (job,) = re.findall(r"BICAM_\d{8}T\d{6}Z\.zip", client.get("/exports").text)[:1]
    assert job
    client.cookies.clear()
    assert login(client, "aud") == 303
    assert client.get("/exports").status_code == 403
    client.cookies.clear()
    assert login(client, "ada") == 303
    assert job in client.get("/exports").text  # an admin sees every project's packages


def test_readyz_wants_a_recent_forwarding_pass(tmp_path: Path, db_url: str) -> None:
    config = load_config(
        write_config(
            tmp_path / "node",
            db_url,
            projects={"BICAM": {"destinations": ["out"]}},
            destinations={"out": {"kind": "folder", "path": str(tmp_path / "out")}},
        )
    )
    services = open_node_services(config)
    try:
        app = create_app(WebContext(config, services.session_factory, services.node_key))
        with TestClient(app, base_url="http://127.0.0.1") as web:
            waiting = web.get("/readyz")
            assert waiting.status_code == 503
            assert waiting.json()["checks"]["pipeline_poll"] == "no poll yet"
            Heartbeat(config.storage.path, "pipeline").beat(utcnow() - timedelta(minutes=5))
            assert web.get("/readyz").json()["checks"]["pipeline_poll"].startswith("last poll 3")
            Heartbeat(config.storage.path, "pipeline").beat(utcnow())
            assert web.get("/readyz").status_code == 200
    finally:
        services.close()


def test_admins_manage_users_and_check_a_study_de_identification(
    client: TestClient, node: NodeServices, tmp_path: Path
) -> None:
    uid = ingest_study(node, tmp_path / "s", patient_id="PAT424242", patient_name="Kept^Name")
    assert login(client, "pia") == 303
    assert client.get("/users").status_code == 403
    assert client.get(f"/studies/{study_id_of(node, uid)}/tags").status_code == 403
    client.cookies.clear()
    assert login(client, "ada") == 303
    token = csrf_of(client, "/users")
    form = {
        "csrf": token,
        "name": "newbie",
        "role": "project",
        "projects": ["HEART"],
        "password": "short",
    }
    assert (
        "at least 12 characters"
        in client.post("/users/save", data=form, follow_redirects=True).text
    )
    form["password"] = "a long enough password"
    assert "user newbie saved" in client.post("/users/save", data=form, follow_redirects=True).text
    assert (
        "user pia disabled"
        in client.post(
            "/users/disable", data={"csrf": token, "name": "pia"}, follow_redirects=True
        ).text
    )
    client.cookies.clear()
    assert login(client, "pia") == 401  # disabled
    assert login(client, "newbie", "a long enough password") == 303
    assert [r["project"] for r in client.get("/api/requests").json()] == ["HEART"]
    client.cookies.clear()
    assert login(client, "ada") == 303
    changed = [e.details for e in audit_rows(node, AuditEventType.USER_CHANGED) if e.actor == "ada"]
    assert {(d["user"], d["action"]) for d in changed} == {("newbie", "added"), ("pia", "disabled")}
    assert all("password" not in d for d in changed)

    found = client.get("/studies/by-uid", params={"uid": uid})
    assert found.headers["location"] == f"/studies/{study_id_of(node, uid)}"
    tags = client.get(
        f"/studies/{study_id_of(node, uid)}/tags", params={"project": "BICAM", "only_kept": "1"}
    )
    assert tags.status_code == 200
    assert "StudyDescription" in tags.text and "PAT424242" not in tags.text  # ID changed


def test_study_api_calendar_request_form_and_protected_views_are_audited(
    client: TestClient, node: NodeServices, tmp_path: Path
) -> None:
    uid = ingest_study(node, tmp_path / "s", patient_id="PAT313131", patient_name="Cal^Endar")
    assert login(client, "pia") == 303
    (listed,) = [s for s in client.get("/api/studies").json() if s["study_instance_uid"] == uid]
    assert (listed["patient_name"], listed["patient_id"]) == ("C. E.", "•••131")
    assert listed["calling_ae_title"] == "CT7" and listed["projects"] == []
    page = client.get("/studies").text
    assert "2024-01" in page and 'href="/studies?study_date=20240102"' in page
    assert "Cal" not in client.get("/studies", params={"study_date": "19990101"}).text
    token = csrf_of(client, "/requests")
    form = {"csrf": token, "project": "BICAM", "pseudonym": "BICAM090", "patient_id": "PAT313131"}
    refused = client.post("/requests/new", data=form)
    assert refused.status_code == 400 and "PatientID and StudyDate go together" in refused.text
    form["study_date"] = "20240102"
    assert client.post("/requests/new", data=form).status_code == 303
    assert client.post("/requests/new", data={**form, "project": "HEART"}).status_code == 403
    with node.session_factory() as session:
        made = session.scalars(
            select(TransferRequest).where(TransferRequest.transfer_name == "BICAM090")
        ).one()
    assert (made.source, made.requested_by, made.patient_id) == ("web", "pia", "PAT313131")

    client.cookies.clear()
    assert login(client, "aud") == 303
    assert "BICAM090" in client.get("/subject", params={"patient_id": "PAT313131"}).text
    (viewed,) = audit_rows(node, AuditEventType.PROTECTED_VIEWED)
    assert viewed.actor == "aud" and viewed.details["page"] == "subject report"
    assert viewed.patient_key and "PAT313131" not in str(viewed.details)


def test_scripts_assign_and_export_through_the_api(
    client: TestClient, node: NodeServices, tmp_path: Path
) -> None:
    uid = ingest_study(node, tmp_path / "s", patient_id="PAT646464")
    with node.session_factory() as session, session.begin():
        headers = {"authorization": f"Bearer {issue_token(session, 'pia', 'test', utcnow())}"}
    study_id = study_id_of(node, uid)
    made = client.post(
        f"/api/studies/{study_id}/assign",
        headers=headers,
        data={"project": "BICAM", "pseudonym": "BICAM123"},
    )
    assert made.status_code == 200 and isinstance(made.json()["id"], int)
    refused = client.post(
        f"/api/studies/{study_id}/assign",
        headers=headers,
        data={"project": "HEART", "pseudonym": "HEART123"},
    )
    assert refused.status_code == 403 and refused.json() == {"error": "not one of your projects"}
    job = client.post("/api/exports", headers=headers, data={"project": "BICAM"}).json()
    status = poll(
        lambda: (
            (s := client.get(f"/api/exports/{job['id']}", headers=headers).json())["state"]
            != "running"
            and s
        ),
        30,
        "the export",
    )
    assert status["state"] == "done" and status["total"] == 0  # nothing acknowledged yet
    package = client.get(f"/api/exports/{job['id']}/download", headers=headers)
    assert package.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(package.content)) as archive:
        assert archive.namelist() == ["manifest.json"]


def test_error_pages_escape_what_the_user_sent(client: TestClient) -> None:
    assert login(client, "ada") == 303
    token = csrf_of(client, "/requests")
    shown = client.post(
        "/requests/new",
        data={
            "csrf": token,
            "project": "<script>1</script>",  # quoted back in the error
            "pseudonym": "X",
            "study_uid": "1.2.3",
        },
    )
    assert shown.status_code == 400
    assert "<script>" not in shown.text and "&lt;script&gt;" in shown.text

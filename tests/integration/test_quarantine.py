"""Handling the receive quarantine: list, release after a repair, delete (CLI and web)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fionatest import make_ct, write_config
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from starlette.testclient import TestClient

from fiona.audit import utcnow
from fiona.config import load_config
from fiona.db import AuditEvent, AuditEventType, Instance, QuarantinedFile, UserRole
from fiona.quarantine import QuarantineError, release_quarantined
from fiona.scp.ingest import ReceiveFacts
from fiona.scp.server import NodeServices, open_node_services
from fiona.web import WebContext, create_app
from fiona.web.auth import add_user

pytestmark = pytest.mark.integration

PASSWORD = "quarantine admin password"


@pytest.fixture(autouse=True)
def _bad_uids_are_the_point(monkeypatch: pytest.MonkeyPatch) -> None:
    for mode in ("reading_validation_mode", "writing_validation_mode"):
        monkeypatch.setattr(pydicom_config.settings, mode, pydicom_config.IGNORE)


def quarantine_one(node: NodeServices, tmp_path: Path, name: str) -> tuple[int, str]:
    """A CT whose SOPInstanceUID is not a UID: quarantined on arrival."""
    ds = make_ct(generate_uid(), generate_uid(), sop_uid="not-a-uid")
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    tmp = node.spool.tmp / path.name
    shutil.copyfile(path, tmp)
    result = node.ingestor.ingest(tmp, ReceiveFacts("MR3", "FIONA", "10.0.0.7", "assoc-q"))
    assert not result.ok and "quarantined" in (result.comment or "")
    with node.session_factory() as session:
        entry = session.scalars(select(QuarantinedFile).order_by(QuarantinedFile.id.desc())).first()
        assert entry is not None
        return entry.id, entry.path


def repair(node: NodeServices, relative: str) -> str:
    path = node.spool.root / relative
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def counts(node: NodeServices) -> tuple[int, int]:
    with node.session_factory() as session:
        return (
            session.scalar(select(func.count()).select_from(QuarantinedFile)) or 0,
            session.scalar(select(func.count()).select_from(Instance)) or 0,
        )


def test_release_after_repair_and_delete_from_the_command_line(tmp_path: Path, db_url: str) -> None:
    config_path = write_config(tmp_path / "node", db_url)
    node = open_node_services(load_config(config_path))
    try:
        broken, _ = quarantine_one(node, tmp_path, "broken")
        fixed, relative = quarantine_one(node, tmp_path, "fixed")
    finally:
        node.close()

    def fiona(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fiona", "quarantine", *args, "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    listed = json.loads(fiona("list", "--json").stdout)
    assert [row["id"] for row in listed] == [fixed, broken]
    assert (
        listed[0]["reason"] == "invalid SOPInstanceUID" and listed[0]["calling_ae_title"] == "MR3"
    )

    refused = fiona("release", str(broken))
    assert (
        refused.returncode == 1 and "still not acceptable: invalid SOPInstanceUID" in refused.stderr
    )
    node = open_node_services(load_config(config_path))
    try:
        study_uid = repair(node, relative)
    finally:
        node.close()
    released = fiona("release", str(fixed))
    assert released.returncode == 0, released.stderr
    assert f"released {fixed}: stored into study {study_uid}" in released.stdout
    assert fiona("delete", str(broken), "--yes").returncode == 0
    assert fiona("delete", str(broken), "--yes").returncode == 1  # gone

    node = open_node_services(load_config(config_path))
    try:
        assert counts(node) == (0, 1)
        assert not any((node.spool.root / "quarantine").rglob("*.dcm"))
        with node.session_factory() as session:
            instance = session.scalars(select(Instance)).one()
            kinds = [e.event_type for e in session.scalars(select(AuditEvent))]
        assert instance.calling_ae_title == "MR3" and instance.peer_address == "10.0.0.7"
        assert AuditEventType.QUARANTINE_RELEASED in kinds
        assert AuditEventType.QUARANTINE_DELETED in kinds
    finally:
        node.close()


def test_admins_release_and_delete_in_the_web_interface(
    services: NodeServices, tmp_path: Path
) -> None:
    broken, _ = quarantine_one(services, tmp_path, "broken")
    fixed, relative = quarantine_one(services, tmp_path, "fixed")
    repair(services, relative)
    with services.session_factory() as session, session.begin():
        add_user(session, "ada", UserRole.ADMIN, (), PASSWORD, "t", utcnow(), [])
        add_user(session, "aud", UserRole.AUDITOR, (), PASSWORD, "t", utcnow(), [])
    app = create_app(
        WebContext(
            services.config, services.session_factory, services.node_key, ingestor=services.ingestor
        )
    )
    with TestClient(app, base_url="http://127.0.0.1", follow_redirects=False) as web:

        def log_in(name: str) -> str:
            web.cookies.clear()
            token = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text).group(1)  # type: ignore[union-attr]
            assert (
                web.post(
                    "/login", data={"name": name, "password": PASSWORD, "csrf": token}
                ).status_code
                == 303
            )
            return re.search(r'name="csrf" value="([^"]+)"', web.get("/").text).group(1)  # type: ignore[union-attr]

        token = log_in("aud")
        assert web.get("/quarantine").status_code == 403
        assert web.post(f"/quarantine/{broken}/delete", data={"csrf": token}).status_code == 403
        token = log_in("ada")
        page = web.get("/quarantine").text
        assert "invalid SOPInstanceUID" in page and "MR3@10.0.0.7" in page
        done = web.post(
            f"/quarantine/{broken}/release", data={"csrf": token}, follow_redirects=True
        )
        assert "still not acceptable" in done.text
        done = web.post(f"/quarantine/{fixed}/release", data={"csrf": token}, follow_redirects=True)
        assert f"released {fixed}: stored" in done.text
        done = web.post(f"/quarantine/{broken}/delete", data={"csrf": token}, follow_redirects=True)
        assert f"deleted {broken}" in done.text
    assert counts(services) == (0, 1)
    with pytest.raises(QuarantineError, match="no quarantined file"):
        release_quarantined(services.session_factory, services.ingestor, broken, "x", utcnow())

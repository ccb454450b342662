"""The web interface in a real headless browser (Playwright driving Debian's ``chromium``).

A project admin logs in to a running ``fiona serve``, finds a study a modality sent, assigns
it to their project, watches the request reach ``sent`` (a real Orthanc acknowledges it),
downloads the export package and reads the audit log. Screenshots of the pages go to
``test-artifacts/screenshots/``.
``tools/test`` installs ``chromium`` with apt; nothing is downloaded by Playwright.
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from fionatest import free_port, write_study
from forwarding import Node, dicom_destination
from peers import Orthanc, poll
from playwright.sync_api import Browser, Page, expect, sync_playwright
from pydicom import dcmread

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
PASSWORD = "project admin password"


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "chromium is missing: tools/test installs it (apt)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def reload_until(page: Page, text: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in page.content():
        assert time.monotonic() < deadline, f"{text!r} did not appear on {page.url}"
        time.sleep(0.5)
        page.reload()


def test_a_project_admin_assigns_a_study_and_sees_it_delivered_and_audited(
    tmp_path: Path, node_factory: Callable[..., Node], browser: Browser
) -> None:
    web_port = free_port()
    with Orthanc(tmp_path / "pacs") as pacs:
        node = node_factory(
            {"research-pacs": dicom_destination(pacs)}, web={"host": "127.0.0.1", "port": web_port}
        )
        password = tmp_path / "password"
        password.write_text(PASSWORD)
        node.server.cli(
            "user",
            "add",
            "pia",
            "--role",
            "project",
            "--project",
            "BICAM",
            "--password-file",
            str(password),
        )
        poll(lambda: '"web interface listening"' in node.server.log(), 30, "the web interface")
        files = write_study(
            tmp_path / "study", 2, 2, patient_id="PAT777001", patient_name="Doe^Jane"
        )
        node.send(files, calling="CT1")  # FIONA's own AE title: nobody claims it yet

        page = browser.new_page()
        base = f"http://127.0.0.1:{web_port}"
        page.goto(f"{base}/")
        expect(page.get_by_role("heading", name="Log in")).to_be_visible()
        shot(page, "01-login")
        page.get_by_label("Name").fill("pia")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
        expect(page.get_by_text("listening", exact=True)).to_be_visible()
        shot(page, "02-dashboard")

        page.goto(f"{base}/studies?unassigned=1")
        reload_until(page, "D. J.")
        assert "Doe^Jane" not in page.content()  # a project user sees the name masked
        shot(page, "03-unassigned-studies")
        page.get_by_role("link", name="D. J.").click()
        expect(page.get_by_role("heading", name="Assign to a project")).to_be_visible()
        page.get_by_label("Project").select_option("BICAM")
        page.get_by_label("Pseudonym").fill("BICAM050")
        page.get_by_label("Event").fill("baseline")
        page.get_by_role("button", name="Assign").click()
        expect(page.get_by_role("cell", name="BICAM050")).to_be_visible()
        reload_until(page, "status-sent")
        expect(page.get_by_text("research-pacs: 4 delivered")).to_be_visible()
        shot(page, "04-study-sent")
        assert pacs.wait_for_instances(4) == 4

        metrics = requests.get(f"{base}/metrics", timeout=10).text  # all processes' counts
        assert 'fiona_instances_received_total{outcome="stored"} 4.0' in metrics
        assert "fiona_deidentify_seconds_count 4.0" in metrics  # the forwarding process's
        assert 'fiona_send_seconds_count{destination="research-pacs"}' in metrics
        assert "Doe" not in metrics and "PAT777001" not in metrics
        ready = requests.get(f"{base}/readyz", timeout=10).json()
        assert ready == {
            "ready": True,
            "checks": {"database": "ok", "scp": "ok", "pipeline_poll": "ok", "disk": "ok"},
        }
        page.goto(f"{base}/exports")
        page.get_by_label("Subject (pseudonym, optional)").fill("BICAM050")
        page.get_by_role("button", name="Make package").click()
        expect(page.get_by_role("link", name="Download")).to_be_visible(timeout=60_000)
        shot(page, "05-exports")
        with page.expect_download() as download_info:
            page.get_by_role("link", name="Download").click()
        download = download_info.value
        assert re.fullmatch(r"BICAM_\d{8}T\d{6}Z\.zip", download.suggested_filename)
        package = tmp_path / download.suggested_filename
        download.save_as(package)
        with zipfile.ZipFile(package) as archive:
            names = archive.namelist()
            manifest = json.loads(archive.read("manifest.json"))
            images = [n for n in names if n.endswith(".dcm")]
            first = dcmread(io.BytesIO(archive.read(images[0])))
        assert len(images) == 4 and manifest["differing_from_delivered"] == 0
        assert {n.split("/")[:3] == ["BICAM", "BICAM050", "baseline"] for n in images} == {True}
        assert len({n.split("/")[3] for n in images}) == 2  # two series
        assert first.PatientID == "BICAM050"
        held = {
            i["MainDicomTags"]["SOPInstanceUID"]
            for s in pacs.studies()
            for i in pacs.instances_of_study(s["MainDicomTags"]["StudyInstanceUID"])
        }
        assert {n.rsplit("/", 1)[1].removesuffix(".dcm") for n in images} == held

        page.goto(f"{base}/requests")
        expect(page.get_by_role("cell", name="BICAM050")).to_be_visible()
        shot(page, "06-requests")
        page.goto(f"{base}/audit?verify=1")
        expect(page.get_by_text("Hash chain intact")).to_be_visible()
        expect(page.get_by_role("cell", name="DELIVERED").first).to_be_visible()
        expect(page.get_by_role("cell", name="EXPORT_DOWNLOADED")).to_be_visible()
        shot(page, "07-audit-log")
        page.get_by_role("button", name="Log out").click()
        expect(page.get_by_role("heading", name="Log in")).to_be_visible()

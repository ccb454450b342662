"""Web upload of externally acquired DICOM (files or a zip) into the pipeline.

The uploaded bytes are unpacked into a folder on the spool filesystem and go through
``fiona import``'s path — exactly the C-STORE path (durable spool, index, quarantine for what
cannot be accepted) — as an "association" from ``WEBUPLOAD`` at the user's address; each study
found gets a transfer request for the project, pseudonym, event and site chosen in the form.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fiona.audit import utcnow
from fiona.config import WebConfig
from fiona.db import Instance, Study
from fiona.scp.importer import import_folder
from fiona.web.app import WebContext, _client, _denied, _render
from fiona.web.auth import WebUser

__all__ = ["upload_dicom"]

CALLING_AE = "WEBUPLOAD"
CHUNK = 1 << 20


class TooLargeError(Exception):
    pass


def _unpack(uploads: list[UploadFile], folder: Path, limit: int) -> int:
    """Write the uploaded files (a zip's members unpacked) into *folder*; returns bytes."""
    total = 0
    counter = 0

    def copy(source: Any) -> None:
        nonlocal total, counter
        counter += 1
        with open(folder / f"{counter:07d}.dcm", "wb") as out:
            while chunk := source.read(CHUNK):
                total += len(chunk)
                if total > limit:
                    raise TooLargeError
                out.write(chunk)

    for upload in uploads:
        upload.file.seek(0)
        if (upload.filename or "").lower().endswith(".zip") or zipfile.is_zipfile(upload.file):
            upload.file.seek(0)
            with zipfile.ZipFile(upload.file) as archive:  # member names are never used as paths
                for member in archive.infolist():
                    if not member.is_dir():
                        with archive.open(member) as source:
                            copy(source)
        else:
            upload.file.seek(0)
            copy(upload.file)
    return total


async def upload_dicom(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Upload DICOM files or a zip for a project, pseudonym, event and site.
    responses:
      200: {description: "stored instances and the requests made"}
      400: {description: "no files, an unknown project, or too large"}
    """
    from fiona.requests import create_request

    if ctx.ingestor is None:
        return _denied(request, 503, "uploading needs the running node")
    form = await request.form()
    project = str(form.get("project", ""))
    pseudonym = str(form.get("pseudonym", "")).strip()
    event = str(form.get("event", "")).strip()
    site = str(form.get("site", "")).strip() or None
    uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile) and f.filename]
    if project not in ctx.config.projects or not pseudonym:
        return _denied(request, 400, "choose a project and give a pseudonym")
    if not user.may_see_project(project):
        return _denied(request, 403, "not one of your projects")
    if not uploads:
        return _denied(request, 400, "choose DICOM files or a zip")
    limit = (ctx.config.web or WebConfig()).max_upload_mb * 1024 * 1024
    ingestor = ctx.ingestor
    folder = Path(tempfile.mkdtemp(prefix="upload-", dir=ingestor.spool.tmp))
    try:
        try:
            await run_in_threadpool(_unpack, uploads, folder, limit)
        except TooLargeError:
            return _denied(request, 400, f"larger than web.max_upload_mb ({limit >> 20} MB)")
        except zipfile.BadZipFile:
            return _denied(request, 400, "the zip file is damaged")
        report = await run_in_threadpool(
            import_folder,
            ingestor,
            folder,
            called_ae_title=ctx.config.node.ae_title,
            calling_ae_title=CALLING_AE,
            peer_address=_client(request),
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    with ctx.session_factory() as session, session.begin():
        uids = list(
            session.scalars(
                select(Study.study_instance_uid)
                .join(Instance, Instance.study_id == Study.id)
                .where(Instance.association_id == report.association_id)
                .distinct()
            )
        )
        made = [
            create_request(
                session,
                study_instance_uid=uid,
                project=project,
                pseudonym=pseudonym,
                event=event,
                site=site,
                requested_by=user.name,
                now=utcnow(),
                node_key=ctx.node_key,
                source="web-upload",
            ).id
            for uid in sorted(uids)
        ]
    result = {
        "stored": sum(n for k, n in report.outcomes.items() if k != "FAILED"),
        "failed": [reason for _path, reason in report.failed],
        "skipped": len(report.skipped),
        "studies": len(uids),
        "requests": made,
    }
    if request.url.path.startswith("/api/"):
        return JSONResponse(result)
    return _render(request, "uploaded_dicom.html", user, result=result, project=project)

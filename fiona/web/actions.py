"""Web pages that change things or read protected reports: request actions and uploads,
coupling lists, the configuration (with C-ECHO), and the GDPR subject report."""

from __future__ import annotations

import hashlib
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from fiona.audit import utcnow
from fiona.db import AuditEventType, TransferRequest, UserRole
from fiona.web.app import WebContext, _audit, _denied, _render
from fiona.web.auth import WebUser

__all__ = ["config_page", "echo", "request_action", "subject_page", "upload"]

MAX_UPLOAD = 5 * 1024 * 1024


async def request_action(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Retry (after a fix), or resend (from scratch, a new request) a transfer request.
    responses:
      200: {description: "what happened"}
      403: {description: "not the caller's project, a read-only role, or no CSRF token"}
      409: {description: "the request is not in a state for that"}
    """
    from fiona.requests import RequestError, resend_request, retry_request

    request_id = int(request.path_params["request_id"])
    action = request.path_params["action"]
    with ctx.session_factory() as session:
        stored = session.get(TransferRequest, request_id)
        project = stored.transfer_project_name if stored is not None else None
    if stored is None or not user.may_see_project(project):
        return _denied(request, 404, "no such request of yours")
    try:
        if action == "retry":
            message = retry_request(
                ctx.session_factory, request_id, utcnow(), user.name, ctx.config.storage.path
            )
        elif action == "resend":
            _new, message = resend_request(
                ctx.session_factory, request_id, utcnow(), user.name, ctx.node_key
            )
        else:
            return _denied(request, 404, f"no action {action!r}")
    except RequestError as exc:
        return _denied(request, 409, str(exc))
    if request.url.path.startswith("/api/"):
        return JSONResponse({"message": message})
    return RedirectResponse("/requests", status_code=303)


async def _csv_text(request: Request) -> tuple[str | None, bytes]:
    form = await request.form()
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        return None, b""
    data = await upload.read(MAX_UPLOAD + 1)
    if len(data) > MAX_UPLOAD:
        return None, b""
    try:
        return data.decode("utf-8-sig"), data
    except UnicodeDecodeError:
        return None, b""


async def upload(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Upload a CSV of transfer requests or a coupling list (all or nothing).
    responses:
      200: {description: "imported, or the problems found (nothing imported)"}
    """
    from fiona.requests import import_requests, parse_requests_csv
    from fiona.router.coupling import parse_coupling_csv
    from fiona.router.rules import load_routing_rules
    from fiona.router.service import import_coupling_and_route

    kind = request.path_params["kind"]
    text, data = await _csv_text(request)
    problems: list[str] = []
    message = ""
    if text is None:
        problems = [f"choose a UTF-8 CSV file (at most {MAX_UPLOAD // 2**20} MB)"]
    elif kind == "requests":
        rows, problems = parse_requests_csv(text, ctx.config)
        projects = {str(row["project"]) for row in rows}
        if not problems and not all(user.may_see_project(p) for p in projects):
            problems = ["the file names projects that are not yours"]
        if not problems:
            ids = import_requests(ctx.session_factory, rows, utcnow(), user.name, ctx.node_key)
            message = f"{len(ids)} requests added"
    elif kind == "coupling":
        rows, problems = parse_coupling_csv(text, ctx.config)
        if not problems and not all(user.may_see_project(str(r["project"])) for r in rows):
            problems = ["the file names projects that are not yours"]
        if not problems:
            days = ctx.config.routing.coupling_expire_days
            count, here, created = import_coupling_and_route(
                ctx.session_factory,
                ctx.config,
                load_routing_rules(ctx.config),
                ctx.node_key,
                rows,
                utcnow(),
                user.name,
                days,
                hashlib.sha256(data).hexdigest(),
            )
            message = (
                f"{count} coupling entries added (expire in {days} days); {here} of "
                f"their studies are here: {created} requests created"
            )
    else:
        return _denied(request, 404, "nothing to upload there")
    status = 200 if not problems else 400
    if request.url.path.startswith("/api/"):
        return JSONResponse({"message": message, "problems": problems}, status_code=status)
    response = _render(
        request, "uploaded.html", user, kind=kind, message=message, problems=problems
    )
    response.status_code = status
    return response


async def config_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    from fiona.router.rules import load_routing_rules

    try:
        rules: Any = load_routing_rules(ctx.config)
    except Exception as exc:  # noqa: BLE001  # shown: the node keeps its loaded rules
        rules = f"not loadable: {exc}"
    return _render(
        request,
        "config.html",
        user,
        config=ctx.config,
        rules=rules,
        echo=request.query_params.get("echo"),
    )


async def echo(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: C-ECHO a DICOM destination from FIONA.
    responses:
      200: {description: "success or the reason"}
    """
    from urllib.parse import quote

    from fiona.scu import echo as c_echo

    name = request.path_params["name"]
    destination = ctx.config.destinations.get(name)
    if destination is None or destination.kind != "dicom":
        return _denied(request, 404, "no DICOM destination of that name")
    ok, message = c_echo(
        destination.host,
        destination.port,
        destination.ae_title,
        ctx.config.node.ae_title,
        timeout=5,
    )
    _audit(ctx, AuditEventType.ECHO_TESTED, user.name, destination=name, ok=ok, result=message)

    if request.url.path.startswith("/api/"):
        return JSONResponse({"ok": ok, "message": message})
    return RedirectResponse(f"/config?echo={quote(message)}", status_code=303)


async def subject_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    from fiona.reports import resolve_subject, subject_report

    patient_id = request.query_params.get("patient_id", "").strip()

    def make() -> Any:
        with ctx.session_factory() as session:
            found = resolve_subject(session, ctx.node_key, patient_id=patient_id)
            return subject_report(session, ctx.node_key, found)

    report = await run_in_threadpool(make) if patient_id else None
    if report is not None:  # reading who got a person's data is itself recorded
        _audit(
            ctx,
            AuditEventType.PROTECTED_VIEWED,
            user.name,
            page="subject report",
            patient_key=report.subject.patient_key,
        )
    return _render(
        request,
        "subject.html",
        user,
        report=report,
        asked=bool(patient_id),
        role_may_see_uids=user.role == UserRole.ADMIN,
    )


async def quarantine_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    from fiona.quarantine import list_quarantined

    with ctx.session_factory() as session:
        entries = list_quarantined(session)
    return _render(
        request,
        "quarantine.html",
        user,
        entries=entries,
        message=request.query_params.get("message"),
    )


async def quarantine_action(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Release (check again and store) or delete a quarantined file.
    responses:
      200: {description: "what happened"}
      409: {description: "still not acceptable, or gone"}
    """
    from urllib.parse import quote

    from fiona.quarantine import QuarantineError, delete_quarantined, release_quarantined

    entry_id = int(request.path_params["entry_id"])
    action = request.path_params["action"]
    try:
        if action == "release":
            if ctx.ingestor is None:
                return _denied(request, 503, "releasing needs the running node")
            done = release_quarantined(
                ctx.session_factory, ctx.ingestor, entry_id, user.name, utcnow()
            )
            message = f"released {entry_id}: {done.outcome.lower()}"
        elif action == "delete":
            delete_quarantined(ctx.session_factory, ctx.spool, entry_id, user.name, utcnow())
            message = f"deleted {entry_id}"
        else:
            return _denied(request, 404, f"no action {action!r}")
    except QuarantineError as exc:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=409)
        message = f"{action} {entry_id}: {exc}"
    if request.url.path.startswith("/api/"):
        return JSONResponse({"message": message})
    return RedirectResponse(f"/quarantine?message={quote(message)}", status_code=303)


async def users_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    from sqlalchemy import select

    from fiona.db import User

    with ctx.session_factory() as session:
        users = list(session.scalars(select(User).order_by(User.name)))
    return _render(
        request,
        "users.html",
        user,
        users=users,
        projects=sorted(ctx.config.projects),
        message=request.query_params.get("message"),
    )


async def user_action(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Add or change a user (name, role, projects, password), or disable one (admins).
    responses:
      303: {description: "done; back to the users page with a message"}
    """
    from urllib.parse import quote

    from fiona.web.auth import UserError, add_user, disable_user

    form = await request.form()
    name = str(form.get("name", "")).strip()
    action = request.path_params["action"]
    try:
        with ctx.session_factory() as session, session.begin():
            if action == "save":
                role = UserRole(str(form.get("role", "")))
                projects = [str(p) for p in form.getlist("projects")]
                add_user(
                    session,
                    name,
                    role,
                    projects,
                    str(form.get("password", "")),
                    user.name,
                    utcnow(),
                    sorted(ctx.config.projects),
                )
                message = f"user {name} saved"
            elif action == "disable":
                disable_user(session, name, user.name, utcnow())
                message = f"user {name} disabled"
            else:
                return _denied(request, 404, f"no action {action!r}")
    except (UserError, ValueError) as exc:
        message = f"not saved: {exc}"
    return RedirectResponse(f"/users?message={quote(message)}", status_code=303)


async def new_request(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Add a transfer request naming a study by StudyInstanceUID, AccessionNumber, or
      PatientID and StudyDate (the same checks as `fiona request add`).
    responses:
      200: {description: "the new request's id"}
      400: {description: "what is wrong with the entry"}
    """
    from fiona.requests import create_request, entry_problems

    form = await request.form()

    def field(name: str) -> str:
        return str(form.get(name, "") or "").strip()

    project = field("project")
    if project and not user.may_see_project(project):
        return _denied(request, 403, "not one of your projects")
    problems = entry_problems(
        ctx.config,
        field("study_uid"),
        project,
        field("accession"),
        field("patient_id"),
        field("study_date"),
    )
    if not field("pseudonym"):
        problems.append("a pseudonym is needed")
    if problems:
        return _denied(request, 400, "; ".join(problems))
    with ctx.session_factory() as session, session.begin():
        created = create_request(
            session,
            study_instance_uid=field("study_uid"),
            accession_number=field("accession"),
            patient_id=field("patient_id"),
            study_date=field("study_date"),
            project=project,
            pseudonym=field("pseudonym"),
            event=field("event"),
            site=field("site") or None,
            requested_by=user.name,
            now=utcnow(),
            node_key=ctx.node_key,
            source="web",
        )
        request_id = created.id
    if request.url.path.startswith("/api/"):
        return JSONResponse({"id": request_id})
    return RedirectResponse("/requests", status_code=303)

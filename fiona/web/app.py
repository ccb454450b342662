"""The Starlette application: pages for people, ``/api/`` for scripts, probes and metrics.

Server-rendered Jinja2 pages over the same database and functions as the CLI. Sessions are a
signed cookie (HttpOnly, SameSite=Strict, Secure with ``web.secure_cookies``) holding the user
name and a CSRF token; every form post must carry that token. The API takes the same session
(plus an ``X-CSRF-Token`` header on changes) or ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.schemas import SchemaGenerator
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from fiona.audit import audit_event, utcnow
from fiona.config import FionaConfig, WebConfig
from fiona.db import AuditEventType, TransferRequest, User
from fiona.keys import load_or_create_key
from fiona.logs import get_logger
from fiona.scp.ingest import Ingestor
from fiona.scp.spool import Spool
from fiona.web.auth import (
    LoginThrottle,
    WebUser,
    check_password,
    csrf_matches,
    new_csrf_token,
    user_for_token,
)
from fiona.web.exports import Exports

__all__ = ["WebContext", "create_app"]

log = get_logger(__name__)
HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
AUDIT_PAGE = 200


@dataclass
class WebContext:
    """What the pages read: the configuration, the database, the spool, the node's state."""

    config: FionaConfig
    session_factory: sessionmaker[Session]
    node_key: bytes
    scp_bound: Callable[[], bool] = lambda: True
    ingestor: Ingestor | None = None
    """The node's receive path (quarantine release); None outside ``fiona serve``."""
    throttle: LoginThrottle = field(init=False)
    exports: Exports = field(init=False)

    def __post_init__(self) -> None:
        web = self.config.web or WebConfig()
        self.throttle = LoginThrottle(web.login_attempts, web.login_window_seconds)
        self.exports = Exports(self.config, self.session_factory)

    @property
    def spool(self) -> Spool:
        storage = self.config.storage
        return Spool(storage.path, storage.min_free_mb)


# -- who is asking ---------------------------------------------------------------------------


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _current_user(ctx: WebContext, request: Request) -> WebUser | None:
    header = request.headers.get("authorization", "")
    with ctx.session_factory() as session:
        if header.lower().startswith("bearer "):
            return user_for_token(session, header[7:].strip())
        name = request.session.get("user")
        if not name:
            return None
        user = session.scalars(select(User).where(User.name == name)).first()
        if user is None or user.disabled:  # disabled or removed since the login
            request.session.clear()
            return None
        return WebUser(user.name, user.role, tuple(user.projects or ()))


def _csrf_ok(request: Request, form: Any | None = None) -> bool:
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        return True  # a token is not sent by browsers on their own: no cross-site forgery
    given = request.headers.get("x-csrf-token") or (form.get("csrf") if form else None)
    return csrf_matches(request.session.get("csrf"), given)


def _denied(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    if status == 401:
        return RedirectResponse("/login", status_code=303)
    # Messages can quote what the user sent (a path, a field): escaped, never markup.
    return HTMLResponse(f"<h1>{status}</h1><p>{html.escape(message)}</p>", status_code=status)


Handler = Callable[[Request, WebContext, WebUser], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def _closing(endpoint: Endpoint) -> Endpoint:
    """Close what the request parsed when it ends: uploaded files (temporary files, on disk
    past 1 MB) are closed then, not whenever the garbage collector finds them."""

    async def closing(request: Request) -> Response:
        try:
            return await endpoint(request)
        finally:
            await request.close()

    return closing


def page(
    ctx: WebContext, handler: Handler, *, change: bool = False, roles: tuple[str, ...] = ()
) -> Callable[[Request], Awaitable[Response]]:
    """Wrap *handler*: a logged-in user (401), the role (403), CSRF on changes (403)."""

    @_closing
    async def endpoint(request: Request) -> Response:
        user = _current_user(ctx, request)
        if user is None:
            return _denied(request, 401, "log in first")
        if roles and user.role.value not in roles:
            return _denied(request, 403, f"not for the role {user.role.value}")
        if change:
            if not user.may_change:
                return _denied(request, 403, "read-only role")
            form = await request.form() if not request.url.path.startswith("/api/") else None
            if not _csrf_ok(request, form):
                return _denied(request, 403, "missing or wrong CSRF token")
        return await handler(request, ctx, user)

    endpoint.__doc__ = handler.__doc__  # the OpenAPI schema reads it
    return endpoint


def _render(request: Request, name: str, user: WebUser | None, **values: Any) -> HTMLResponse:
    if "csrf" not in request.session:
        request.session["csrf"] = new_csrf_token()
    return TEMPLATES.TemplateResponse(
        request, name, {"user": user, "csrf": request.session["csrf"], **values}
    )


def _audit(ctx: WebContext, kind: AuditEventType, actor: str, **details: Any) -> None:
    with ctx.session_factory() as session, session.begin():
        session.add(audit_event(kind, actor=actor, occurred_at=utcnow(), **details))


# -- login -----------------------------------------------------------------------------------


def _login_routes(ctx: WebContext) -> list[Route]:
    async def login_form(request: Request) -> Response:
        return _render(request, "login.html", None, error=None)

    async def login(request: Request) -> Response:
        form = await request.form()
        name = str(form.get("name", ""))[:64]
        password = str(form.get("password", ""))
        address = _client(request)
        keys = (f"name:{name}", f"address:{address}")
        if not _csrf_ok(request, form):
            return _denied(request, 403, "missing or wrong CSRF token (reload the page)")
        if ctx.throttle.blocked(*keys):
            _audit(
                ctx,
                AuditEventType.LOGIN_FAILED,
                f"{name}@{address}",
                user=name,
                address=address,
                reason="too many failed attempts",
            )
            response = _render(
                request, "login.html", None, error="Too many failed attempts: wait and try again."
            )
            response.status_code = 429
            return response
        with ctx.session_factory() as session:
            user = check_password(session, name, password)
        if user is None:
            ctx.throttle.failed(*keys)
            _audit(
                ctx,
                AuditEventType.LOGIN_FAILED,
                f"{name}@{address}",
                user=name,
                address=address,
                reason="wrong name or password",
            )
            response = _render(request, "login.html", None, error="Wrong name or password.")
            response.status_code = 401
            return response
        ctx.throttle.succeeded(*keys)
        request.session.clear()
        request.session.update({"user": user.name, "csrf": new_csrf_token()})
        _audit(
            ctx,
            AuditEventType.LOGIN,
            f"{user.name}@{address}",
            user=user.name,
            address=address,
            role=user.role.value,
        )
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> Response:
        user = _current_user(ctx, request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        if not _csrf_ok(request, await request.form()):
            return _denied(request, 403, "missing or wrong CSRF token")
        _audit(ctx, AuditEventType.LOGOUT, f"{user.name}@{_client(request)}", user=user.name)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    return [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", _closing(login), methods=["POST"]),
        Route("/logout", _closing(logout), methods=["POST"]),
    ]


# -- pages and API ---------------------------------------------------------------------------


def _status(ctx: WebContext) -> dict[str, Any]:
    from fiona.status import node_status

    return node_status(ctx.session_factory, ctx.spool, sorted(ctx.config.destinations))


def _activity(ctx: WebContext) -> dict[str, Any]:
    """Open associations, instances per minute (last 5 minutes), the last polls."""
    from datetime import timedelta

    from sqlalchemy import func

    from fiona.db import Association, Instance
    from fiona.heartbeat import read_beat

    now = utcnow()
    with ctx.session_factory() as session:
        open_associations = session.scalar(
            select(func.count()).select_from(Association).where(Association.ended_at.is_(None))
        )
        recent = session.scalar(
            select(func.count())
            .select_from(Instance)
            .where(Instance.received_at >= now - timedelta(minutes=5))
        )
    beats = {
        name: read_beat(ctx.config.storage.path, name)
        for name in ("pipeline", "redcap", "redcap-failed")
    }
    return {
        "associations": open_associations or 0,
        "per_minute": round((recent or 0) / 5, 1),
        "polls": {
            name: beat["at"].strftime("%Y-%m-%d %H:%M:%S") if beat else None
            for name, beat in beats.items()
        },
    }


async def dashboard(request: Request, ctx: WebContext, user: WebUser) -> Response:
    return _render(
        request,
        "dashboard.html",
        user,
        status=_status(ctx),
        scp=ctx.scp_bound(),
        activity=_activity(ctx),
    )


def _visible_requests(ctx: WebContext, user: WebUser, limit: int = 500) -> list[TransferRequest]:
    query = select(TransferRequest).order_by(TransferRequest.id.desc()).limit(limit)
    if user.role.value not in ("admin", "auditor"):
        query = query.where(TransferRequest.transfer_project_name.in_(user.projects))
    with ctx.session_factory() as session:
        return list(session.scalars(query))


def _request_data(request: TransferRequest) -> dict[str, Any]:
    return {
        "id": request.id,
        "project": request.transfer_project_name,
        "pseudonym": request.transfer_name,
        "event": request.transfer_event_name,
        "status": request.status.value,
        "study_instance_uid": request.study_instance_uid,
        "new_study_instance_uid": request.transfer_mapped_uid,
        "source": request.source,
        "requested_by": request.requested_by,
        "requested_at": request.transfer_requested_date.isoformat(),
        "error": request.transfer_error,
        "error_message": request.transfer_error_message,
    }


async def requests_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    rows = [_request_data(r) for r in _visible_requests(ctx, user)]
    projects = sorted(user.projects if user.role.value == "project" else ctx.config.projects)
    return _render(request, "requests.html", user, requests=rows, projects=projects)


async def api_requests(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Transfer requests the caller may see, newest first (at most 500).
    responses:
      200: {description: "a list of requests"}
      401: {description: "no or unknown credentials"}
    """
    return JSONResponse([_request_data(r) for r in _visible_requests(ctx, user)])


async def cancel(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Cancel a transfer request (nothing more is sent).
    responses:
      200: {description: "cancelled"}
      403: {description: "not the caller's project, a read-only role, or no CSRF token"}
    """
    from fiona.forwarder.prepared import PreparedFiles
    from fiona.requests import RequestError, cancel_request

    request_id = int(request.path_params["request_id"])
    with ctx.session_factory() as session:
        stored = session.get(TransferRequest, request_id)
        project = stored.transfer_project_name if stored is not None else None
    if stored is None or not user.may_see_project(project):
        return _denied(request, 403 if stored is not None else 404, "no such request of yours")
    try:
        message = cancel_request(ctx.session_factory, request_id, utcnow(), user.name)
    except RequestError as exc:
        return _denied(request, 409, str(exc))
    PreparedFiles(ctx.config.storage.path).discard_request(request_id)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"message": message})
    return RedirectResponse("/requests", status_code=303)


def _audit_filter(ctx: WebContext, request: Request, user: WebUser) -> Any:
    from fiona.db import AuditEventType as Kind
    from fiona.reports import AuditFilter, resolve_subject

    args = request.query_params

    def day(value: str | None) -> datetime | None:
        if not value:
            return None
        return datetime.combine(date.fromisoformat(value), time(), UTC)

    subject = None
    if args.get("study_uid") or args.get("patient_id"):
        with ctx.session_factory() as session:
            subject = resolve_subject(
                session,
                ctx.node_key,
                study_uid=args.get("study_uid") or None,
                patient_id=args.get("patient_id") or None,
            )
    project = args.get("project") or None
    if user.role.value == "project" and project not in user.projects:
        project = None
    kinds = tuple(Kind(v) for v in args.getlist("event") if v in Kind.__members__)
    return AuditFilter(subject, project, day(args.get("since")), day(args.get("until")), kinds)


def _audit_rows(ctx: WebContext, request: Request, user: WebUser, limit: int) -> list[Any]:
    from fiona.reports import event_record, select_events

    where = _audit_filter(ctx, request, user)
    rows: list[dict[str, Any]] = []
    with ctx.session_factory() as session:
        for row in select_events(session, where):
            if user.role.value == "project" and row.project not in user.projects:
                continue  # a project user reads their projects' events only
            rows.append(event_record(row))
            if len(rows) >= limit:
                break
    return rows


def _audit_csv(ctx: WebContext, where: Any, user: WebUser) -> Iterator[str]:
    """The matching audit rows as CSV, produced while the response streams."""
    from fiona.reports import event_record, select_events

    buffer = io.StringIO()
    writer: csv.DictWriter[str] | None = None
    with ctx.session_factory() as session:
        for row in select_events(session, where):
            if user.role.value == "project" and row.project not in user.projects:
                continue
            record = event_record(row)
            record["details"] = json.dumps(record["details"], sort_keys=True)
            if writer is None:
                writer = csv.DictWriter(buffer, fieldnames=list(record))
                writer.writeheader()
            writer.writerow(record)
            if buffer.tell() > 1 << 16:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    if writer is None:
        yield "seq\n"
    yield buffer.getvalue()


async def audit_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    if "csv" in request.query_params:
        try:
            where = _audit_filter(ctx, request, user)
        except ValueError as exc:
            return _denied(request, 400, f"bad filter: {exc}")
        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        return StreamingResponse(  # a sync generator: Starlette runs it in its thread pool
            _audit_csv(ctx, where, user),
            media_type="text/csv",
            headers={"content-disposition": f'attachment; filename="fiona-audit-{stamp}.csv"'},
        )
    try:
        rows = await run_in_threadpool(_audit_rows, ctx, request, user, AUDIT_PAGE)
    except ValueError as exc:
        return _denied(request, 400, f"bad filter: {exc}")
    chain = None
    if "verify" in request.query_params:
        from fiona.db.chain import verify_chain

        def verify() -> Any:
            with ctx.session_factory() as session:
                return verify_chain(session.connection())

        chain = await run_in_threadpool(verify)  # the whole table: off the event loop
    return _render(
        request,
        "audit.html",
        user,
        rows=rows,
        chain=chain,
        query=dict(request.query_params),
        limit=AUDIT_PAGE,
    )


async def api_audit(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Audit events, oldest first (filters study_uid, patient_id, project, since, until,
      event; at most 10000 rows).
    responses:
      200: {description: "a list of audit events"}
      401: {description: "no or unknown credentials"}
    """
    try:
        return JSONResponse(_audit_rows(ctx, request, user, 10000))
    except ValueError as exc:
        return _denied(request, 400, f"bad filter: {exc}")


async def api_status(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: What `fiona status --json` prints.
    responses:
      200: {description: "counts, disk, destinations"}
    """
    return JSONResponse(_status(ctx))


# -- probes and metrics ----------------------------------------------------------------------


def _poll_checks(ctx: WebContext) -> dict[str, str]:
    """Whether the request poll is recent: the forwarding pipeline, and REDCap if it is used."""
    from fiona.heartbeat import INTERVAL, read_beat

    config, now = ctx.config, utcnow()
    checks: dict[str, str] = {}
    limits = {}
    if config.destinations:  # the forwarding process runs the pipeline
        limits["pipeline"] = max(3 * config.forwarding.poll_seconds, 3 * INTERVAL)
    if config.requests.source == "redcap":
        limits["redcap"] = max(3 * config.requests.poll_seconds, 300.0)
    for name, limit in limits.items():
        beat = read_beat(config.storage.path, name)
        if beat is None:
            checks[f"{name}_poll"] = "no poll yet"
        elif (now - beat["at"]).total_seconds() > limit:
            checks[f"{name}_poll"] = f"last poll {int((now - beat['at']).total_seconds())} s ago"
        else:
            checks[f"{name}_poll"] = "ok"
    return checks


def _probe_routes(ctx: WebContext) -> list[Route]:
    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        checks: dict[str, Any] = {}
        try:
            with ctx.session_factory() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001  # reported, not raised
            checks["database"] = f"unreachable: {type(exc).__name__}"
        checks["scp"] = "ok" if ctx.scp_bound() else "not listening"
        checks.update(_poll_checks(ctx))
        spool = ctx.spool
        free = spool.free_bytes()
        floor = spool.min_free_mb * 1024 * 1024
        checks["disk"] = "ok" if free >= floor else f"{free // 2**20} MB free, below the minimum"
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        from fiona.web.metrics import render_metrics

        body, content_type = render_metrics(ctx)
        return Response(body, media_type=content_type)

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]


SCHEMAS = SchemaGenerator(
    {
        "openapi": "3.0.0",
        "info": {"title": "FIONA API", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
)


def create_app(ctx: WebContext) -> Starlette:
    """The web application for *ctx* (``fiona serve`` runs it with uvicorn)."""
    web = ctx.config.web or WebConfig()
    secret = load_or_create_key(ctx.config.storage.path / "secrets" / "web-session.key").hex()
    from fiona.web.actions import (
        config_page,
        echo,
        new_request,
        quarantine_action,
        quarantine_page,
        request_action,
        subject_page,
        upload,
        user_action,
        users_page,
    )
    from fiona.web.export_pages import download_export, export_status, exports_page, start_export
    from fiona.web.studies import (
        api_studies,
        assign,
        studies_page,
        study_by_uid,
        study_page,
        tags_page,
    )
    from fiona.web.upload import upload_dicom

    admin, readers, makers = ("admin",), ("admin", "auditor"), ("admin", "project")
    routes: list[Any] = [
        *_login_routes(ctx),
        Route("/upload/dicom", page(ctx, upload_dicom, change=True), methods=["POST"]),
        Route("/api/upload/dicom", page(ctx, upload_dicom, change=True), methods=["POST"]),
        Route("/upload/{kind:str}", page(ctx, upload, change=True), methods=["POST"]),
        Route("/api/upload/{kind:str}", page(ctx, upload, change=True), methods=["POST"]),
        Route("/config", page(ctx, config_page, roles=admin)),
        Route(
            "/destinations/{name:str}/echo",
            page(ctx, echo, change=True, roles=admin),
            methods=["POST"],
        ),
        Route("/subject", page(ctx, subject_page, roles=readers)),
        Route("/exports", page(ctx, exports_page, roles=makers)),
        Route("/exports", page(ctx, start_export, change=True, roles=makers), methods=["POST"]),
        Route("/exports/{job_id:str}", page(ctx, export_status, roles=makers)),
        Route("/exports/{job_id:str}/download", page(ctx, download_export, roles=makers)),
        Route("/quarantine", page(ctx, quarantine_page, roles=admin)),
        Route("/requests/new", page(ctx, new_request, change=True), methods=["POST"]),
        Route("/api/requests/new", page(ctx, new_request, change=True), methods=["POST"]),
        Route("/users", page(ctx, users_page, roles=admin)),
        Route(
            "/users/{action:str}",
            page(ctx, user_action, change=True, roles=admin),
            methods=["POST"],
        ),
        Route(
            "/quarantine/{entry_id:int}/{action:str}",
            page(ctx, quarantine_action, change=True, roles=admin),
            methods=["POST"],
        ),
        Route("/studies", page(ctx, studies_page)),
        Route("/studies/by-uid", page(ctx, study_by_uid)),
        Route("/studies/{study_id:int}", page(ctx, study_page)),
        Route("/studies/{study_id:int}/tags", page(ctx, tags_page, roles=admin)),
        Route("/studies/{study_id:int}/assign", page(ctx, assign, change=True), methods=["POST"]),
        Route(
            "/api/studies/{study_id:int}/assign", page(ctx, assign, change=True), methods=["POST"]
        ),
        Route(
            "/api/quarantine/{entry_id:int}/{action:str}",
            page(ctx, quarantine_action, change=True, roles=admin),
            methods=["POST"],
        ),
        Route("/api/exports", page(ctx, start_export, change=True, roles=makers), methods=["POST"]),
        Route("/api/exports/{job_id:str}", page(ctx, export_status, roles=makers)),
        Route("/api/exports/{job_id:str}/download", page(ctx, download_export, roles=makers)),
        *_probe_routes(ctx),
        Route("/", page(ctx, dashboard)),
        Route("/requests", page(ctx, requests_page)),
        Route(
            "/requests/{request_id:int}/cancel", page(ctx, cancel, change=True), methods=["POST"]
        ),
        Route("/audit", page(ctx, audit_page)),
        Route("/api/status", page(ctx, api_status)),
        Route("/api/studies", page(ctx, api_studies)),
        Route("/api/requests", page(ctx, api_requests)),
        Route(
            "/api/requests/{request_id:int}/cancel",
            page(ctx, cancel, change=True),
            methods=["POST"],
        ),
        Route("/api/audit", page(ctx, api_audit)),
        Route(
            "/requests/{request_id:int}/{action:str}",
            page(ctx, request_action, change=True),
            methods=["POST"],
        ),
        Route(
            "/api/requests/{request_id:int}/{action:str}",
            page(ctx, request_action, change=True),
            methods=["POST"],
        ),  # after the cancel routes
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]

    async def openapi(request: Request) -> Response:
        return JSONResponse(SCHEMAS.get_schema(routes=app.routes))

    routes.append(Route("/api/openapi.json", openapi, include_in_schema=False))
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=secret,
            session_cookie="fiona_session",
            max_age=int(web.session_hours * 3600),
            same_site="strict",
            https_only=web.secure_cookies,
        )
    ]
    app = Starlette(routes=routes, middleware=middleware)
    return app

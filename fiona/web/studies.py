"""Studies in the web interface: the list, one study's detail, and "assign to project".

Patient names and IDs are not in FIONA's index; they are read from each study's first
instance for the page. Admins see them; other roles see them masked (initials, the last
three characters of the ID). A project user sees the studies of their projects' requests and
the unassigned ones (to assign them), nothing else.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

from pydicom import dcmread
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from fiona.audit import utcnow
from fiona.db import (
    AuditEventType,
    Delivery,
    Instance,
    RequestStatus,
    Series,
    Study,
    StudyState,
    TransferRequest,
    UserRole,
)
from fiona.keys import keyed_hash
from fiona.web.app import WebContext, _audit, _denied, _render
from fiona.web.auth import WebUser

__all__ = ["assign", "mask_id", "mask_name", "studies_page", "study_page"]

LIST_LIMIT = 200


def mask_name(name: str) -> str:
    """``Doe^Jane`` → ``D. J.``"""
    parts = [p for p in name.replace("^", " ").split() if p]
    return " ".join(f"{p[0]}." for p in parts) or ""


def mask_id(value: str) -> str:
    return "•••" + value[-3:] if len(value) > 3 else "•••"


@dataclass
class Row:
    study: Study
    calling: str
    called: str
    patient_name: str
    patient_id: str
    projects: list[str]


def _patient(ctx: WebContext, path: str | None, user: WebUser) -> tuple[str, str]:
    if path is None:
        return "", ""
    try:
        ds = dcmread(
            ctx.config.storage.path / path,
            stop_before_pixels=True,
            specific_tags=["PatientName", "PatientID"],
        )
    except Exception:  # noqa: BLE001  # an unreadable file shows no name
        return "?", "?"
    name, pid = str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")
    if user.role == UserRole.ADMIN:
        return name, pid
    return mask_name(name), mask_id(pid)


def _requests_by_study(session: Any, uids: list[str]) -> dict[str, list[TransferRequest]]:
    found: dict[str, list[TransferRequest]] = {}
    for request in session.scalars(
        select(TransferRequest).where(
            TransferRequest.study_instance_uid.in_(uids),
            TransferRequest.status != RequestStatus.CANCELLED,
        )
    ):
        found.setdefault(request.study_instance_uid or "", []).append(request)
    return found


def _study_for(
    session: Any, request: Request, user: WebUser, study_id: int
) -> tuple[Study | None, list[TransferRequest], Response | None]:
    """The study, its live requests, or the refusal (404, or 403 for another project's)."""
    study = session.get(Study, study_id)
    if study is None:
        return None, [], _denied(request, 404, "no such study")
    uid = study.study_instance_uid
    requests = _requests_by_study(session, [uid]).get(uid, [])
    if not _may_see(user, requests):
        return None, [], _denied(request, 403, "not a study of your projects")
    return study, requests, None


def _may_see(user: WebUser, requests: list[TransferRequest]) -> bool:
    if user.role != UserRole.PROJECT:
        return True
    return not requests or any(r.transfer_project_name in user.projects for r in requests)


async def studies_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    # Reads the first file of each study listed: off the event loop.
    return await run_in_threadpool(_studies_page, request, ctx, user)


def _study_rows(ctx: WebContext, user: WebUser, args: Any) -> list[Row]:
    """The studies *user* may see that match the filters (ValueError for a bad date)."""
    query = select(Study).order_by(Study.last_received_at.desc()).limit(LIST_LIMIT)
    if args.get("study_date"):
        query = query.where(Study.study_date == args["study_date"])
    if args.get("state") in ("RECEIVING", "STABLE"):
        query = query.where(Study.state == StudyState(args["state"]))
    if args.get("since"):
        since = datetime.combine(date.fromisoformat(args["since"]), time(), UTC)
        query = query.where(Study.last_received_at >= since)
    rows: list[Row] = []
    with ctx.session_factory() as session:
        studies = list(session.scalars(query))
        by_study = _requests_by_study(session, [s.study_instance_uid for s in studies])
        for study in studies:
            requests = by_study.get(study.study_instance_uid, [])
            if not _may_see(user, requests):
                continue
            if args.get("unassigned") and requests:
                continue
            first = session.execute(
                select(Instance.calling_ae_title, Instance.called_ae_title, Instance.path)
                .where(Instance.study_id == study.id)
                .order_by(Instance.id)
                .limit(1)
            ).first()
            calling, called, path = first if first is not None else ("", "", None)
            if args.get("ae") and args["ae"] not in (calling, called):
                continue
            name, pid = _patient(ctx, path, user)
            projects = sorted({r.transfer_project_name for r in requests})
            rows.append(Row(study, calling, called, name, pid, projects))
    return rows


def _studies_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    args = request.query_params
    try:
        rows = _study_rows(ctx, user, args)
    except ValueError:
        return _denied(request, 400, "since: give YYYY-MM-DD")
    dates = [r.study.study_date for r in rows if r.study.study_date]
    projects = sorted(user.projects if user.role == UserRole.PROJECT else ctx.config.projects)
    return _render(
        request,
        "studies.html",
        user,
        rows=rows,
        query=dict(args),
        calendar=_calendar(dates),
        limit=LIST_LIMIT,
        projects=projects,
    )


async def api_studies(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Received studies the caller may see, newest first (filters state, ae, since,
      study_date, unassigned; patient name and ID masked except for admins).
    responses:
      200: {description: "a list of studies"}
    """
    try:
        rows = await run_in_threadpool(_study_rows, ctx, user, request.query_params)
    except ValueError:
        return _denied(request, 400, "since: give YYYY-MM-DD")
    return JSONResponse(
        [
            {
                "id": r.study.id,
                "study_instance_uid": r.study.study_instance_uid,
                "state": r.study.state.value,
                "study_date": r.study.study_date,
                "first_received_at": r.study.first_received_at.isoformat(),
                "last_received_at": r.study.last_received_at.isoformat(),
                "instances": r.study.instance_count,
                "calling_ae_title": r.calling,
                "called_ae_title": r.called,
                "patient_name": r.patient_name,
                "patient_id": r.patient_id,
                "projects": r.projects,
            }
            for r in rows
        ]
    )


@dataclass(frozen=True)
class Month:
    title: str
    weeks: list[list[tuple[int, int, str]]]
    """Monday-first weeks of (day or 0, studies that day, ``YYYYMMDD``)."""


def _calendar(dates: list[str]) -> list[Month]:
    """Study dates (``YYYYMMDD``, one per study) → month grids with studies per day."""
    import calendar as cal

    per_day = Counter(d for d in dates if len(d) == 8 and d.isdigit())
    months = sorted({(int(d[:4]), int(d[4:6])) for d in per_day if 1 <= int(d[4:6]) <= 12})
    grid = cal.Calendar(firstweekday=0)
    return [
        Month(
            f"{year}-{month:02d}",
            [
                [
                    (
                        day,
                        per_day.get(f"{year}{month:02d}{day:02d}", 0) if day else 0,
                        f"{year}{month:02d}{day:02d}" if day else "",
                    )
                    for day in week
                ]
                for week in grid.monthdayscalendar(year, month)
            ],
        )
        for year, month in months[-12:]  # the last twelve months with studies
    ]


async def study_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    from fiona.router.decide import decide
    from fiona.router.rules import load_routing_rules
    from fiona.router.service import study_facts

    study_id = int(request.path_params["study_id"])
    with ctx.session_factory() as session:
        study, requests, refused = _study_for(session, request, user, study_id)
        if refused is not None:
            return refused
        assert study is not None
        series = list(
            session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id))
        )
        counts = dict(
            session.execute(
                select(Instance.series_id, func.count())
                .where(Instance.study_id == study.id)
                .group_by(Instance.series_id)
            ).all()
        )
        ledger = session.execute(
            select(Delivery.request_id, Delivery.destination, Delivery.state, func.count())
            .where(Delivery.request_id.in_([r.id for r in requests]))
            .group_by(Delivery.request_id, Delivery.destination, Delivery.state)
        ).all()
        facts = study_facts(session, study, ctx.config.storage.path)
        first = session.scalars(
            select(Instance.path).where(Instance.study_id == study.id).order_by(Instance.id)
        ).first()
    if user.role == UserRole.PROJECT:
        requests = [r for r in requests if r.transfer_project_name in user.projects]
    routing = None
    if facts is not None:
        routing = decide(facts, ctx.config, load_routing_rules(ctx.config), utcnow().date())
    name, pid = _patient(ctx, first, user)
    projects = sorted(user.projects if user.role == UserRole.PROJECT else ctx.config.projects)
    return _render(
        request,
        "study.html",
        user,
        study=study,
        series=series,
        counts=counts,
        requests=requests,
        ledger=ledger,
        routing=routing,
        patient_name=name,
        patient_id=pid,
        projects=projects,
    )


async def assign(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Assign a received study to a project (creates a transfer request).
    responses:
      303: {description: "created; back to the study"}
      403: {description: "not one of the caller's projects, or a read-only role"}
    """
    from fiona.requests import create_request

    form = await request.form()
    project = str(form.get("project", ""))
    pseudonym = str(form.get("pseudonym", "")).strip()
    event = str(form.get("event", "")).strip()
    study_id = int(request.path_params["study_id"])
    if project not in ctx.config.projects:
        return _denied(request, 400, "unknown project")
    if not user.may_see_project(project):
        return _denied(request, 403, "not one of your projects")
    if not pseudonym:
        return _denied(request, 400, "a pseudonym is needed")
    with ctx.session_factory() as session, session.begin():
        study, _requests, refused = _study_for(session, request, user, study_id)
        if refused is not None:
            return refused
        assert study is not None
        created = create_request(
            session,
            study_instance_uid=study.study_instance_uid,
            project=project,
            pseudonym=pseudonym,
            event=event,
            requested_by=user.name,
            now=utcnow(),
            node_key=ctx.node_key,
            source="web",
        )
    if request.url.path.startswith("/api/"):
        return JSONResponse({"id": created.id})
    return RedirectResponse(f"/studies/{study_id}", status_code=303)


async def study_by_uid(request: Request, ctx: WebContext, user: WebUser) -> Response:
    uid = request.query_params.get("uid", "").strip()
    with ctx.session_factory() as session:
        found = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
    if found is None:
        return _denied(request, 404, "FIONA holds no study with that StudyInstanceUID")
    return RedirectResponse(f"/studies/{found}", status_code=303)


async def tags_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    from fiona.errors import ConfigError
    from fiona.tag_report import TagReportError, tag_report

    study_id = int(request.path_params["study_id"])
    project = request.query_params.get("project") or None

    def report() -> tuple[Study | None, str, list[Any]]:
        with ctx.session_factory() as session:
            study = session.get(Study, study_id)
            if study is None:
                return None, "", []
            chosen, series = tag_report(ctx.config, session, study.study_instance_uid, project)
            return study, chosen, series

    try:  # reads and de-identifies files: off the event loop
        study, chosen, series = await run_in_threadpool(report)
    except (TagReportError, ConfigError) as exc:
        return _denied(request, 400, str(exc))
    if study is None:
        return _denied(request, 404, "no such study")
    _audit(
        ctx,
        AuditEventType.PROTECTED_VIEWED,
        user.name,
        page="de-identification check",
        study_key=keyed_hash(ctx.node_key, study.study_instance_uid),
        project=chosen,
    )
    only_kept = bool(request.query_params.get("only_kept"))
    return _render(
        request,
        "tags.html",
        user,
        study=study,
        project=chosen,
        series=series,
        only_kept=only_kept,
        projects=sorted(ctx.config.projects),
    )

"""The export pages: start a package, watch its progress, download it (streamed from disk)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response

from fiona.db import UserRole
from fiona.web.app import WebContext, _denied, _render
from fiona.web.auth import WebUser
from fiona.web.exports import ExportJob

__all__ = ["download_export", "export_status", "exports_page", "start_export"]


def _visible(ctx: WebContext, user: WebUser) -> list[ExportJob]:
    jobs = sorted(ctx.exports.jobs.values(), key=lambda j: j.created_at, reverse=True)
    return [j for j in jobs if user.may_see_project(j.project)]


def _job(ctx: WebContext, user: WebUser, request: Request) -> ExportJob | None:
    job = ctx.exports.jobs.get(request.path_params["job_id"])
    return job if job is not None and user.may_see_project(job.project) else None


def _data(job: ExportJob) -> dict[str, object]:
    return {
        "id": job.id,
        "project": job.project,
        "name": job.name,
        "state": job.state,
        "done": job.done,
        "total": job.total,
        "error": job.error,
        "differing": job.differing,
        "subject": job.subject,
    }


async def exports_page(request: Request, ctx: WebContext, user: WebUser) -> Response:
    jobs = _visible(ctx, user)
    projects = sorted(user.projects if user.role == UserRole.PROJECT else ctx.config.projects)
    return _render(
        request,
        "exports.html",
        user,
        jobs=jobs,
        projects=projects,
        running=any(j.state == "running" for j in jobs),
    )


async def start_export(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: Start an export package of a project (or one subject, or chosen requests).
    responses:
      303: {description: "started; see /exports"}
    """
    form = await request.form()
    project = str(form.get("project", ""))
    if project not in ctx.config.projects or not user.may_see_project(project):
        return _denied(request, 403, "not one of your projects")
    subject = str(form.get("subject", "")).strip() or None
    try:
        ids = tuple(int(x) for x in str(form.get("requests", "")).replace(",", " ").split())
    except ValueError:
        return _denied(request, 400, "requests: give request numbers")
    job = ctx.exports.start(user.name, project, subject, ids)
    if request.url.path.startswith("/api/"):
        return JSONResponse(_data(job))
    return RedirectResponse("/exports", status_code=303)


async def export_status(request: Request, ctx: WebContext, user: WebUser) -> Response:
    """
    summary: An export package's progress.
    responses:
      200: {description: "state, instances done of total"}
    """
    job = _job(ctx, user, request)
    if job is None:
        return _denied(request, 404, "no such export of yours")
    return JSONResponse(_data(job))


async def download_export(request: Request, ctx: WebContext, user: WebUser) -> Response:
    job = _job(ctx, user, request)
    if job is None or job.state != "done" or not job.path.exists():
        return _denied(request, 404, "no such finished export of yours")
    ctx.exports.downloaded(job, user.name)
    return FileResponse(job.path, media_type="application/zip", filename=job.name)

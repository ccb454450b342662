"""``fiona request …``: the operator commands for transfer requests.

Each command opens the configured database (migrating it if needed), acts through
:mod:`fiona.requests` and writes an audit row naming the operator (the login name). A running
``fiona serve`` picks the change up at its next poll. Exit status: 0 done, 1 the action is not
possible (unknown request, wrong status), 2 bad usage, configuration or input file.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from sqlalchemy.orm import Session, sessionmaker

from fiona.cli import _config_option, _load
from fiona.config import FionaConfig
from fiona.db import RequestStatus

__all__ = ["request"]


@contextmanager
def _database(config: FionaConfig) -> Iterator[sessionmaker[Session]]:
    from fiona.db import make_engine, make_sessionmaker, upgrade

    engine = make_engine(config.database.url)
    upgrade(engine)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _node_key(config: FionaConfig) -> bytes:
    from fiona.keys import load_node_key

    return load_node_key(config.storage.path)


def _fail(message: str, status: int = 1) -> None:
    click.echo(message, err=True)
    sys.exit(status)


@click.group()
def request() -> None:
    """Transfer requests: study → project, pseudonym, event."""


@request.command("add")
@_config_option
@click.option("--study-uid", default="", help="The original StudyInstanceUID.")
@click.option("--accession", default="", help="Or: the study's AccessionNumber.")
@click.option("--patient-id", default="", help="Or: the PatientID (with --study-date).")
@click.option("--study-date", default="", help="YYYYMMDD, with --patient-id.")
@click.option("--project", required=True, help="Project id (from projects:).")
@click.option("--pseudonym", required=True, help="The participant's pseudonym in the project.")
@click.option("--event", default="", help="Event name (e.g. baseline).")
@click.option("--site", default=None, help="Site code.")
@click.option("--date-offset-days", type=int, default=None, help="Instead of the project's.")
def add(
    config_path: Path | None,
    study_uid: str,
    accession: str,
    patient_id: str,
    study_date: str,
    project: str,
    pseudonym: str,
    event: str,
    site: str | None,
    date_offset_days: int | None,
) -> None:
    """Ask FIONA to send a study to a project under a pseudonym.

    Name the study by --study-uid, --accession, or --patient-id with --study-date. A study
    named by AccessionNumber or patient and date is looked for among received studies (and
    those still to come); if more than one matches, the request is held: FIONA never guesses.
    """
    from fiona.audit import utcnow
    from fiona.requests import create_request, entry_problems

    config = _load(config_path)
    problems = entry_problems(config, study_uid, project, accession, patient_id, study_date)
    if problems:
        _fail("; ".join(problems), 2)
    with _database(config) as sessions, sessions() as session, session.begin():
        created = create_request(
            session,
            study_instance_uid=study_uid,
            accession_number=accession,
            patient_id=patient_id,
            study_date=study_date,
            project=project,
            pseudonym=pseudonym,
            requested_by=getpass.getuser(),
            now=utcnow(),
            node_key=_node_key(config),
            event=event,
            site=site,
            date_offset_days=date_offset_days,
            source="cli",
        )
        request_id = created.id
    problem = config.projects[project].pseudonym_problem(pseudonym)
    click.echo(f"request {request_id} added")
    if problem:
        click.echo(f"warning: it will be held: {problem}", err=True)


@request.command("list")
@_config_option
@click.option("--project", default=None, help="Only this project.")
@click.option(
    "--status",
    "status_filter",
    type=click.Choice([s.value for s in RequestStatus]),
    default=None,
    help="Only requests in this status.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(
    config_path: Path | None, project: str | None, status_filter: str | None, as_json: bool
) -> None:
    """Transfer requests, newest first (this table links studies to pseudonyms: protected)."""
    from sqlalchemy import select

    from fiona.db import TransferRequest

    config = _load(config_path)
    with _database(config) as sessions, sessions() as session:
        query = select(TransferRequest).order_by(TransferRequest.id.desc())
        if project is not None:
            query = query.where(TransferRequest.transfer_project_name == project)
        if status_filter is not None:
            query = query.where(TransferRequest.status == RequestStatus(status_filter))
        rows = [_row(r) for r in session.scalars(query)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        why = f" — {row['error_message']}" if row["error_message"] else ""
        click.echo(
            f"{row['id']:>6}  {row['status']:<16} {row['project']:<10} {row['pseudonym']:<16} "
            f"{row['event'] or '-':<12} {row['study_instance_uid']}{why}"
        )


def _row(request: Any) -> dict[str, Any]:
    return {
        "id": request.id,
        "status": request.status.value,
        "project": request.transfer_project_name,
        "pseudonym": request.transfer_name,
        "event": request.transfer_event_name,
        "site": request.transfer_site,
        "study_instance_uid": request.study_instance_uid,
        "new_study_instance_uid": request.transfer_mapped_uid,
        "requested_by": request.requested_by,
        "requested_at": request.transfer_requested_date.isoformat(),
        "transfer_date": request.transfer_date.isoformat() if request.transfer_date else None,
        "error": request.transfer_error,
        "error_message": request.transfer_error_message,
        "source": request.source,
    }


def _act(config_path: Path | None, action: str, request_id: int) -> None:
    from fiona.audit import utcnow
    from fiona.forwarder.prepared import PreparedFiles
    from fiona.requests import RequestError, cancel_request, resend_request, retry_request

    config = _load(config_path)
    actor = getpass.getuser()
    with _database(config) as sessions:
        try:
            if action == "retry":
                message = retry_request(sessions, request_id, utcnow(), actor, config.storage.path)
            elif action == "cancel":
                message = cancel_request(sessions, request_id, utcnow(), actor)
                PreparedFiles(config.storage.path).discard_request(request_id)
            else:
                _new_id, message = resend_request(
                    sessions, request_id, utcnow(), actor, _node_key(config)
                )
        except RequestError as exc:
            _fail(str(exc))
    click.echo(message)


@request.command("retry")
@_config_option
@click.argument("request_id", type=int)
def retry(config_path: Path | None, request_id: int) -> None:
    """Try a held, failed or partial request again (after fixing the cause)."""
    _act(config_path, "retry", request_id)


@request.command("cancel")
@_config_option
@click.argument("request_id", type=int)
def cancel(config_path: Path | None, request_id: int) -> None:
    """Stop a request; nothing more of it is sent."""
    _act(config_path, "cancel", request_id)


@request.command("resend")
@_config_option
@click.argument("request_id", type=int)
def resend(config_path: Path | None, request_id: int) -> None:
    """Send the study again from scratch, as a new request (after a profile fix)."""
    _act(config_path, "resend", request_id)


@request.command("import")
@_config_option
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def import_csv(config_path: Path | None, csv_file: Path) -> None:
    """Add many requests from a CSV file (all or nothing).

    Columns: transfer_project_name, transfer_name (required); study_instance_uid, or
    accession_number, or patient_id with study_date; transfer_event_name, transfer_site,
    transfer_date_offset_days.
    """
    from fiona.audit import utcnow
    from fiona.requests import import_requests, parse_requests_csv

    config = _load(config_path)
    try:
        text = csv_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{csv_file}: cannot read: {exc}", 2)
    rows, problems = parse_requests_csv(text, config)
    if problems:
        _fail(f"{csv_file}: nothing imported:\n  " + "\n  ".join(problems), 2)
    with _database(config) as sessions:
        ids = import_requests(sessions, rows, utcnow(), getpass.getuser(), _node_key(config))
    click.echo(f"{len(ids)} requests added (ids {ids[0]} to {ids[-1]})")


@request.command("sync")
@_config_option
def sync(config_path: Path | None) -> None:
    """Synchronise with REDCap once, now (``requests.source: redcap``), and say what happened.

    Reads new and changed requests, writes statuses back and writes Incoming records, as
    ``fiona serve`` does at every poll. On failure it prints REDCap's own message, which the
    service never logs (it may quote record values).
    """
    from fiona.audit import utcnow
    from fiona.redcap.client import RedcapError
    from fiona.redcap.sync import RedcapSource

    config = _load(config_path)
    if config.requests.source != "redcap":
        _fail(f"{config.source}: requests.source is {config.requests.source}, not redcap", 2)
    with _database(config) as sessions:
        source = RedcapSource(config, sessions, _node_key(config), utcnow)
        try:
            result = source.sync()
        except RedcapError as exc:
            detail = f"\n  REDCap says: {exc.detail}" if exc.detail else ""
            _fail(f"REDCap: {exc} ({exc.kind}){detail}")
        finally:
            source.client.close()
    click.echo(
        f"requests: {result.created} new, {result.changed} changed, "
        f"{result.refused_changes} changes refused, {result.rejected} not accepted; "
        f"statuses written: {result.written}; Incoming records written: {result.incoming}"
    )
    for problem in result.problems:
        click.echo(f"  {problem}", err=True)

"""``fiona audit`` (the routing log, ``verify``) and ``fiona report`` (subject, tags).

``fiona audit`` prints audit rows only: keyed hashes, never a patient's identifiers. The
reports print original StudyInstanceUIDs and pseudonyms from the protected tables: protected
output, like ``fiona request list``.
"""

from __future__ import annotations

import csv
import getpass
import json
import sys
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import click

from fiona.cli import _config_option, _load
from fiona.request_cli import _database, _fail, _node_key

__all__ = ["audit", "report"]


def _when(value: str | None, option: str) -> datetime | None:
    """YYYY-MM-DD (midnight UTC) or an ISO date-time (UTC unless it says otherwise)."""
    if not value:
        return None
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"{option} {value!r}: give YYYY-MM-DD or an ISO date-time", 2)
        raise  # not reached
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@click.group(invoke_without_command=True)
@_config_option
@click.option("--study-uid", default="", help="Events about this original StudyInstanceUID.")
@click.option("--patient-id", default="", help="Events about this PatientID's studies.")
@click.option("--project", default="", help="Events of this project.")
@click.option("--since", default="", help="From this date (YYYY-MM-DD, UTC) or date-time.")
@click.option("--until", default="", help="Before this date or date-time.")
@click.option("--event", "events", multiple=True, help="Only this event type (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
@click.pass_context
def audit(
    ctx: click.Context,
    config_path: Path | None,
    study_uid: str,
    patient_id: str,
    project: str,
    since: str,
    until: str,
    events: tuple[str, ...],
    as_json: bool,
    as_csv: bool,
) -> None:
    """The routing log: who sent what, which rule, project, pseudonym, what was acknowledged.

    One line per audit event, oldest first. Studies and patients appear as keyed hashes;
    --study-uid/--patient-id find them by exact value. `fiona audit verify` checks the hash
    chain.
    """
    if ctx.invoked_subcommand is not None:
        return
    from fiona.db import AuditEventType
    from fiona.reports import AuditFilter, event_line, event_record, resolve_subject, select_events

    if as_json and as_csv:
        _fail("give --json or --csv, not both", 2)
    if study_uid and patient_id:
        _fail("give --study-uid or --patient-id, not both", 2)
    try:
        types = tuple(AuditEventType(name.upper()) for name in events)
    except ValueError as exc:
        known = ", ".join(t.value for t in AuditEventType)
        _fail(f"{exc}; known event types: {known}", 2)
    config = _load(config_path)
    with _database(config) as sessions, sessions() as session:
        subject = None
        if study_uid or patient_id:
            subject = resolve_subject(
                session,
                _node_key(config),
                patient_id=patient_id or None,
                study_uid=study_uid or None,
            )
        where = AuditFilter(
            subject, project or None, _when(since, "--since"), _when(until, "--until"), types
        )
        writer = None
        if as_csv:
            writer = csv.writer(sys.stdout)
            writer.writerow(
                [
                    "seq",
                    "occurred_at",
                    "event",
                    "actor",
                    "project",
                    "request_id",
                    "study_key",
                    "patient_key",
                    "details",
                ]
            )
        for row in select_events(session, where):
            if writer is not None:
                record = event_record(row)
                record["details"] = json.dumps(record["details"], sort_keys=True)
                writer.writerow(record.values())
            elif as_json:
                click.echo(json.dumps(event_record(row), sort_keys=True, ensure_ascii=False))
            else:
                click.echo(event_line(row))


@audit.command("verify")
@_config_option
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="SEQ:SHA256",
    help="A head printed by an earlier verify: the chain must still contain it (repeatable).",
)
def verify(config_path: Path | None, anchors: tuple[str, ...]) -> None:
    """Check the audit trail's hash chain end to end; name the first broken row.

    Prints the head (seq and hash): keep it outside FIONA (a ticket, the auditor's notes) and
    pass it as --anchor later, which also finds a chain rewritten from the start.
    """
    from fiona.db.chain import verify_chain

    expected: dict[int, str] = {}
    for anchor in anchors:
        seq, _, digest = anchor.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            _fail(f"--anchor {anchor!r}: give SEQ:SHA256 as printed by fiona audit verify", 2)
        expected[int(seq)] = digest.lower()
    config = _load(config_path)
    with _database(config) as sessions, sessions() as session:
        result = verify_chain(session.connection(), expected)
    if result.broken is not None:
        click.echo(f"audit chain BROKEN at {result.broken} ({result.rows} rows verified before)")
        sys.exit(1)
    suffix = f", {result.anchors_checked} anchors matched" if expected else ""
    click.echo(f"audit chain OK: {result.rows} rows{suffix}")
    click.echo(f"head: {result.head_seq}:{result.head_hash}")


@click.group()
def report() -> None:
    """Reports for data-protection officers and for checking de-identification."""


@report.command("subject")
@_config_option
@click.option("--patient-id", required=True, help="The participant's PatientID at the clinic.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--forget",
    is_flag=True,
    help="Print the UIDs to delete at each destination, then remove the originals from FIONA.",
)
@click.option("--yes", is_flag=True, help="With --forget: do not ask for confirmation.")
def subject(
    config_path: Path | None, patient_id: str, as_json: bool, forget: bool, yes: bool
) -> None:
    """Right to be informed: which projects received this person's data, when, under which
    pseudonym, which studies (original and new StudyInstanceUIDs), acknowledged where.

    With --forget (right to erasure): also lists, per project and destination, the generated
    UIDs to delete in the research PACS, then removes the originals from FIONA's spool and
    index. The audit trail is kept.
    """
    from fiona.audit import utcnow
    from fiona.reports import ForgetRefusedError, forget_subject, resolve_subject, subject_report

    config = _load(config_path)
    node_key = _node_key(config)
    with _database(config) as sessions:
        with sessions() as session:
            found = resolve_subject(session, node_key, patient_id=patient_id)
            result = subject_report(session, node_key, found)
        if as_json:
            click.echo(json.dumps(_report_data(result), indent=2, ensure_ascii=False))
        else:
            _print_report(result)
        if not forget:
            return
        _print_deletions(result)
        if found.empty:
            _fail("nothing to forget: FIONA holds nothing of this PatientID", 1)
        if not yes:
            click.confirm("Remove this person's original images from FIONA now?", abort=True)
        try:
            done = forget_subject(
                sessions, config.storage.path, node_key, found, getpass.getuser(), utcnow()
            )
        except ForgetRefusedError as exc:
            _fail(f"not forgotten: {exc}", 1)
    if config.requests.source == "redcap":
        click.echo(
            "REDCap's Incoming project still holds FIONA's records of these studies "
            "(PatientID, name): delete them there.",
            err=True,
        )
    click.echo(
        f"forgotten: {done.studies} studies, {done.instances} instances removed from "
        f"FIONA; {done.requests} requests unlinked; the audit trail is kept",
        err=True,
    )


def _stamp(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def _print_report(result: Any) -> None:
    echo = click.echo
    subject_ = result.subject
    echo(f"subject: patient key {subject_.patient_key}")
    if subject_.empty:
        echo("FIONA holds no record of this PatientID.")
        return
    for when in result.forgotten:
        echo(f"originals removed from FIONA (forgotten) at {_stamp(when)}")
    echo(f"studies: {len(result.studies)}")
    for entry in result.studies.values():
        uid = entry.original_study_uid or f"(key {entry.study_key})"
        held = "originals held by FIONA" if entry.held else "originals not held"
        echo(
            f"  {uid}: received {_stamp(entry.received_at)} from {entry.sender or '?'}, "
            f"{entry.instances if entry.instances is not None else '?'} instances, {held}"
        )
    projects = result.projects()
    echo(f"projects that received data: {', '.join(projects) if projects else 'none'}")
    for req in sorted(result.requests.values(), key=lambda r: r.request_id):
        echo(
            f"  request {req.request_id}: project {req.project} pseudonym {req.pseudonym} "
            f"event {req.event or '-'} status {req.status}"
        )
        echo(f"    requested {_stamp(req.requested_at)} by {req.requested_by} ({req.source})")
        original = req.original_study_uid or (f"(key {req.study_key})" if req.study_key else "?")
        echo(f"    study {original} -> {req.new_study_uid or '(not de-identified)'}")
        if req.deidentified_at:
            echo(f"    de-identified {_stamp(req.deidentified_at)} with {req.profile}")
        for dest in sorted(req.destinations.values(), key=lambda d: d.destination):
            verified = {None: "", True: ", verified", False: ", verification FAILED"}
            statuses = ", ".join(f"{s}: {n}" for s, n in sorted(dest.statuses.items()))
            echo(
                f"    {dest.destination}: {dest.acknowledged} instances acknowledged "
                f"(statuses {statuses or '-'}), last {_stamp(dest.last_at)}"
                f"{verified[dest.verified]}"
            )
            for series in sorted(dest.new_series_uids):
                echo(f"      series {series}")


def _print_deletions(result: Any) -> None:
    """What each destination holds of the subject: the UIDs its administrator deletes."""
    click.echo("to delete at the destinations (generated UIDs):")
    for req in sorted(result.requests.values(), key=lambda r: r.request_id):
        for dest in sorted(req.destinations.values(), key=lambda d: d.destination):
            if not dest.acknowledged and not dest.new_series_uids:
                continue
            click.echo(
                f"  project {req.project} -> {dest.destination}: PatientID "
                f"{req.pseudonym}, StudyInstanceUID {req.new_study_uid}"
            )
            for series in sorted(dest.new_series_uids):
                click.echo(f"    SeriesInstanceUID {series}")


def _report_data(result: Any) -> dict[str, Any]:
    def stamp(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "patient_key": result.subject.patient_key,
        "forgotten_at": [stamp(w) for w in result.forgotten],
        "projects": result.projects(),
        "studies": [
            {
                "study_key": s.study_key,
                "original_study_uid": s.original_study_uid,
                "received_at": stamp(s.received_at),
                "sender": s.sender,
                "instances": s.instances,
                "held": s.held,
            }
            for s in result.studies.values()
        ],
        "requests": [
            {
                "request_id": r.request_id,
                "project": r.project,
                "pseudonym": r.pseudonym,
                "event": r.event,
                "status": r.status,
                "source": r.source,
                "requested_by": r.requested_by,
                "requested_at": stamp(r.requested_at),
                "study_key": r.study_key,
                "original_study_uid": r.original_study_uid,
                "new_study_uid": r.new_study_uid,
                "deidentified_at": stamp(r.deidentified_at),
                "profile": r.profile,
                "destinations": [
                    {
                        "destination": d.destination,
                        "acknowledged": d.acknowledged,
                        "statuses": d.statuses,
                        "last_at": stamp(d.last_at),
                        "verified": d.verified,
                        "new_series_uids": sorted(d.new_series_uids),
                    }
                    for d in r.destinations.values()
                ],
            }
            for r in sorted(result.requests.values(), key=lambda r: r.request_id)
        ],
    }


@report.command("tags")
@_config_option
@click.option("--study-uid", required=True, help="A received study (original StudyInstanceUID).")
@click.option("--project", default=None, help="Whose profile (default: the study's request's).")
@click.option("--pseudonym", default=None, help="Instead of the request's pseudonym.")
@click.option("--only-kept", is_flag=True, help="Only values that survived unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tags(
    config_path: Path | None,
    study_uid: str,
    project: str | None,
    pseudonym: str | None,
    only_kept: bool,
    as_json: bool,
) -> None:
    """De-identification audit: each series' elements, original and de-identified, side by side.

    One instance per series (the first received) goes through the project's profile as the
    forwarder would send it; every non-empty element at any depth, private ones included, is
    listed. KEPT marks values that survived unchanged: check that none identifies anyone
    before the project goes live. Shows original values: protected output.
    """
    from fiona.errors import ConfigError
    from fiona.tag_report import Change, TagReportError, tag_report

    config = _load(config_path)
    with _database(config) as sessions, sessions() as session:
        try:
            chosen, series = tag_report(config, session, study_uid, project, pseudonym)
        except TagReportError as exc:
            _fail(str(exc), 2 if "--project" in str(exc) else 1)
        except ConfigError as exc:
            _fail(f"configuration error:\n{exc}", 2)
    if as_json:
        data = {
            "project": chosen,
            "study_instance_uid": study_uid,
            "series": [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "modality": s.modality,
                    "instances": s.instances,
                    "sop_instance_uid": s.sop_instance_uid,
                    "new_series_instance_uid": s.new_series_instance_uid,
                    "error": s.error,
                    "elements": [
                        {
                            "path": r.path,
                            "name": r.name,
                            "vr": r.vr,
                            "original": r.original,
                            "deidentified": r.deidentified,
                            "change": r.change.value,
                        }
                        for r in s.rows
                        if not only_kept or r.change == Change.KEPT
                    ],
                }
                for s in series
            ],
        }
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    marks = {Change.KEPT: "KEPT", Change.CHANGED: "~", Change.REMOVED: "-", Change.ADDED: "+"}
    click.echo(f"study {study_uid}, profile of project {chosen}")
    for entry in series:
        kept = sum(r.change == Change.KEPT for r in entry.rows)
        click.echo(
            f"\nseries {entry.series_instance_uid} ({entry.modality or '?'}, "
            f"{entry.instances} instances; shown: {entry.sop_instance_uid}) -> "
            f"{entry.new_series_instance_uid or '(refused)'}: {kept} values kept"
        )
        if entry.error:
            click.echo(f"  the profile refuses this instance: {entry.error}")
        for row in entry.rows:
            if only_kept and row.change != Change.KEPT:
                continue
            line = (
                f"  {marks[row.change]:4} {row.path:28} {row.vr:2} {row.name[:32]:32} "
                f"{_short(row.original)} | {_short(row.deidentified)}"
            )
            click.echo(click.style(line, fg="yellow") if row.change == Change.KEPT else line)


def _short(value: str | None) -> str:
    if value is None:
        return "(absent)"
    return value if len(value) <= 60 else value[:57] + "..."

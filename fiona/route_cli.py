"""``fiona route test`` and ``fiona studies``: routing as an operator sees it.

``fiona route test FILE_OR_STUDY_UID`` prints the decision for a file (association facts from
the options) or for a received study (the facts it came in with), and why: each rule tried and
the key that failed. ``fiona studies --unassigned`` lists stable studies no request covers.
Both print StudyInstanceUIDs and pseudonyms (protected output, like ``fiona request list``),
never patient names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fiona.cli import _config_option, _load, _routing_rules
from fiona.request_cli import _database, _fail

__all__ = ["coupling", "route", "studies"]


@click.group()
def route() -> None:
    """Routing of stable studies to projects."""


@route.command("test")
@_config_option
@click.argument("target")
@click.option("--calling-ae", default="", help="For a file: the sender's AE title.")
@click.option("--called-ae", default="", help="For a file: the AE title it called (default: ours).")
@click.option("--peer-address", default="127.0.0.1", show_default=True, help="For a file.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def route_test(
    config_path: Path | None,
    target: str,
    calling_ae: str,
    called_ae: str,
    peer_address: str,
    as_json: bool,
) -> None:
    """Show what routing decides for TARGET (a DICOM file or a received StudyInstanceUID)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from sqlalchemy import select

    from fiona.audit import utcnow
    from fiona.db import Study
    from fiona.router.decide import StudyFacts, decide
    from fiona.router.service import DatasetHeader, study_facts

    config = _load(config_path)
    rules = _routing_rules(config)
    path = Path(target)
    if path.is_file():
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            _fail(f"{target}: not a DICOM file: {exc}", 2)
        facts = StudyFacts(calling_ae, called_ae or config.node.ae_title, peer_address,
                           DatasetHeader(ds))  # fmt: skip
    else:
        with _database(config) as sessions, sessions() as session:
            study = session.scalars(
                select(Study).where(Study.study_instance_uid == target)
            ).one_or_none()
            if study is None:
                _fail(f"{target}: neither a file nor a received StudyInstanceUID", 2)
            assert study is not None
            found = study_facts(session, study, config.storage.path)
            if found is None:
                _fail(f"{target}: the study's first instance cannot be read", 1)
            assert found is not None
            facts = found
    routing = decide(facts, config, rules, utcnow().date())
    if as_json:
        click.echo(json.dumps(_as_data(routing, rules.source), indent=2))
        return
    click.echo(f"rules: {rules.source} (sha256 {rules.sha256[:16]}…)")
    click.echo(f"from: calling {facts.calling_ae or '-'}, called {facts.called_ae}, "
               f"peer {facts.peer_address}")  # fmt: skip
    for line in routing.trace:
        click.echo(f"  {line}")
    if routing.unassigned:
        click.echo("→ unassigned: the study waits for a request")
    for decision in routing.decisions:
        click.echo(
            f"→ project {decision.project}, pseudonym {decision.pseudonym or '(none)'} "
            f"(from {decision.pseudonym_source}), event {decision.event or '-'}, "
            f"origin {decision.origin}"
        )
        if decision.hold_reason:
            click.echo(f"  the request would be held: {decision.hold_reason}")


def _as_data(routing: Any, source: str) -> dict[str, Any]:
    return {
        "rules": source,
        "ruleset_sha256": routing.ruleset_sha256,
        "unassigned": routing.unassigned,
        "trace": list(routing.trace),
        "decisions": [
            {
                "project": d.project,
                "pseudonym": d.pseudonym,
                "pseudonym_source": d.pseudonym_source,
                "event": d.event,
                "origin": d.origin,
                "rule": d.rule_id,
                "held": d.hold_reason,
            }
            for d in routing.decisions
        ],
    }


@click.command("studies")
@_config_option
@click.option("--unassigned", is_flag=True, help="Only stable studies no request covers.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", default=200, show_default=True, help="At most this many, newest first.")
def studies(config_path: Path | None, unassigned: bool, as_json: bool, limit: int) -> None:
    """Received studies: state, when, from whom, how many instances (no patient data)."""
    from sqlalchemy import exists, func, select

    from fiona.db import Instance, RequestStatus, Study, StudyState, TransferRequest

    config = _load(config_path)
    with _database(config) as sessions, sessions() as session:
        query = select(Study).order_by(Study.last_received_at.desc()).limit(limit)
        if unassigned:
            covered = exists().where(
                TransferRequest.study_instance_uid == Study.study_instance_uid,
                TransferRequest.status != RequestStatus.CANCELLED,
            )
            query = query.where(Study.state == StudyState.STABLE, ~covered)
        rows: list[dict[str, Any]] = []
        for study in session.scalars(query):
            calling, called = session.execute(
                select(Instance.calling_ae_title, Instance.called_ae_title)
                .where(Instance.study_id == study.id)
                .order_by(Instance.id)
                .limit(1)
            ).one_or_none() or ("", "")
            requests = session.scalar(
                select(func.count())
                .select_from(TransferRequest)
                .where(TransferRequest.study_instance_uid == study.study_instance_uid)
            )
            rows.append(
                {
                    "study_instance_uid": study.study_instance_uid,
                    "state": study.state.value,
                    "first_received_at": study.first_received_at.isoformat(),
                    "last_received_at": study.last_received_at.isoformat(),
                    "calling_ae_title": calling,
                    "called_ae_title": called,
                    "instances": study.instance_count,
                    "requests": int(requests or 0),
                }
            )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no unassigned studies" if unassigned else "no studies")
        return
    for row in rows:
        click.echo(
            f"{row['study_instance_uid']}  {row['state']:<9} {row['last_received_at'][:19]}  "
            f"{row['calling_ae_title']} → {row['called_ae_title']}  "
            f"{row['instances']} instances, {row['requests']} requests"
        )


@route.command("replay")
@_config_option
@click.option("--since", "since", required=True, type=click.DateTime(["%Y-%m-%d"]),
              help="Studies first received on or after this day (YYYY-MM-DD).")  # fmt: skip
@click.option("--project", default=None, help="Only decisions for this project.")
@click.option("--apply", "apply", is_flag=True, help="Create the missing requests.")
def route_replay(config_path: Path | None, since: Any, project: str | None, apply: bool) -> None:
    """Decide again, with the current rules and coupling list, for studies received since a
    day; show the requests that would be created (``--apply`` creates them)."""
    import getpass
    from datetime import UTC

    from sqlalchemy import select

    from fiona.audit import utcnow
    from fiona.db import Study, StudyState
    from fiona.keys import load_node_key
    from fiona.router.service import route_study

    config = _load(config_path)
    rules = _routing_rules(config)
    if project is not None:
        project_id = config.project_id(project)
        if project_id is None:
            _fail(f"project {project!r} is not configured", 2)
        project = project_id
    node_key = load_node_key(config.storage.path)
    actor = getpass.getuser()
    missing = 0
    with _database(config) as sessions:
        with sessions() as session:
            ids = session.scalars(
                select(Study.id)
                .where(
                    Study.first_received_at >= since.replace(tzinfo=UTC),
                    Study.state == StudyState.STABLE,
                )
                .order_by(Study.id)
            ).all()
        for study_id in ids:
            outcomes = route_study(sessions, config, rules, node_key, utcnow(), study_id,
                                   actor=actor, project=project, apply=apply)  # fmt: skip
            for outcome in outcomes:
                if outcome.existed:
                    continue
                missing += 1
                decision = outcome.decision
                with sessions() as session:
                    uid = session.get(Study, study_id).study_instance_uid  # type: ignore[union-attr]
                done = f"request {outcome.request_id}" if apply else "would be created"
                click.echo(
                    f"{uid}  → {decision.project} ({decision.origin}), pseudonym "
                    f"{decision.pseudonym or '(none)'}, event {decision.event or '-'}: {done}"
                )
    verb = "created" if apply else "missing"
    click.echo(f"{len(ids)} studies checked, {missing} requests {verb}")


@click.group()
def coupling() -> None:
    """The coupling list: studies assigned to projects by AccessionNumber (legacy, bulk)."""


@coupling.command("import")
@_config_option
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--expire-days", type=click.IntRange(1, 36500), default=None,
              help="Days until entries expire (default: routing.coupling_expire_days)")  # fmt: skip
def coupling_import(config_path: Path | None, csv_file: Path, expire_days: int | None) -> None:
    """Add entries from a CSV (AccessionNumber,ProjectName,subjectid,eventname; StudyInstanceUID
    instead of AccessionNumber is accepted), all or nothing; studies already received are
    routed at once."""
    import getpass
    import hashlib

    from fiona.audit import utcnow
    from fiona.keys import load_node_key
    from fiona.router.coupling import parse_coupling_csv
    from fiona.router.service import import_coupling_and_route

    config = _load(config_path)
    rules = _routing_rules(config)
    try:
        data = csv_file.read_bytes()
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"{csv_file}: cannot read: {exc}", 2)
    rows, problems = parse_coupling_csv(text, config)
    if problems:
        _fail(f"{csv_file}: nothing imported:\n  " + "\n  ".join(problems), 2)
    node_key = load_node_key(config.storage.path)
    actor = getpass.getuser()
    days = expire_days or config.routing.coupling_expire_days
    with _database(config) as sessions:
        count, here, created = import_coupling_and_route(
            sessions, config, rules, node_key, rows, utcnow(), actor, days,
            hashlib.sha256(data).hexdigest(),
        )  # fmt: skip
    click.echo(
        f"{count} coupling entries added (expire in {days} days); {here} of their studies "
        f"are already here: {created} requests created"
    )

"""The ``fiona`` command line.

Exit status: 0 success, 1 the operation failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from fiona import __version__
from fiona.config import FionaConfig, load_config, resolve_config_path
from fiona.errors import ConfigError
from fiona.logs import configure_logging, get_logger

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


def _config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="FIONA_CONFIG",
        help="Configuration file (default: $FIONA_CONFIG).",
    )(func)


def _load(config_path: Path | None) -> FionaConfig:
    try:
        return load_config(resolve_config_path(config_path))
    except ConfigError as exc:
        click.echo(f"configuration error:\n{exc}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fiona")
def main() -> None:
    """FIONA: DICOM staging router for research imaging."""


@main.command()
@_config_option
def check(config_path: Path | None) -> None:
    """Validate the configuration (and the routing rules) and print the effective values."""
    config = _load(config_path)
    rules = _routing_rules(config)
    click.echo(f"# {config.source}: OK")
    if config.routing.rules_file is not None:
        click.echo(f"# {rules.source}: OK, {len(rules.rules)} rules, sha256 {rules.sha256}")
    click.echo(yaml.safe_dump(config.redacted(), sort_keys=False), nl=False)


def _share_metrics(storage: Path) -> None:
    """Count into ``<storage>/metrics`` (emptied now) in this process and its children.

    Must run before anything imports ``prometheus_client``: it picks its storage at import.
    """
    import shutil

    folder = storage / "metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


@main.command()
@_config_option
@click.option(
    "--grace",
    default=30.0,
    show_default=True,
    help="Seconds to let in-flight associations finish on SIGTERM/SIGINT.",
)
@click.option("--worker", is_flag=True, hidden=True, help="Internal: a receiving process.")
@click.option("--forwarder", is_flag=True, hidden=True, help="Internal: the forwarding process.")
@click.option("--listen-fd", type=int, hidden=True, help="Internal: a worker's DICOM socket.")
@click.option("--tls-listen-fd", type=int, hidden=True, help="Internal: its DICOM TLS socket.")
def serve(
    config_path: Path | None,
    grace: float,
    worker: bool,
    forwarder: bool,
    listen_fd: int | None,
    tls_listen_fd: int | None,
) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT.

    With ``node.workers`` > 1 this process also starts and supervises the other
    receiving processes, which share the port; with destinations configured it starts and
    supervises the forwarding process (``forwarding.separate_process``). A stop signal stops
    them all.
    """
    config = _load(config_path)
    configure_logging(config.logging.level)
    if not (worker or forwarder) and config.web is not None and config.web.enabled:
        _share_metrics(config.storage.path)
    from fiona.scp.server import Node
    from fiona.scp.workers import ChildPool, forwarder_pool

    stop = threading.Event()

    def _on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: reload.set())
    if forwarder:
        from fiona.forwarder.process import run_forwarder

        sys.exit(run_forwarder(config, stop, grace))
    separate = bool(config.destinations) and config.forwarding.separate_process and not worker
    node = Node(
        config,
        worker=worker,
        run_forwarder=not separate,
        listen_fds=(listen_fd, tls_listen_fd),
    )
    if not worker:
        node.rules = _routing_rules(config)
    try:
        node.start()
    except OSError as exc:
        click.echo(f"cannot start: {exc}", err=True)
        node.stop(0)
        sys.exit(1)
    pools: list[ChildPool] = []
    if not worker and config.node.workers > 1:
        workers = config.node.workers - 1
        fds, recover = node.listening_fds(), node.recover_worker
        pools.append(ChildPool(config.source, workers, grace, listen_fds=fds, on_exit=recover))
    if separate:
        forwarding = forwarder_pool(config.source, grace)
        node.on_stable = forwarding.notify
        pools.append(forwarding)
    for pool in pools:
        pool.start()
    parent = os.getppid()
    while not stop.wait(0.5):
        if reload.is_set() and not worker:
            reload.clear()
            _reload_rules(node, config)
        for pool in pools:
            pool.supervise()
        if worker and os.getppid() != parent:
            # The primary died (kill -9?): do not linger as an orphan on the shared
            # port; the next primary reconciles the spool this worker writes to.
            click.echo("primary process gone; worker stopping", err=True)
            break
    for pool in pools:
        pool.signal_stop()
    node.stop(grace)
    for pool in pools:
        pool.wait()


def _routing_rules(config: FionaConfig) -> Any:
    from fiona.router.rules import load_routing_rules

    try:
        return load_routing_rules(config)
    except ConfigError as exc:
        click.echo(f"configuration error:\n{exc}", err=True)
        sys.exit(2)


def _reload_rules(node: Any, config: FionaConfig) -> None:
    """SIGHUP: read the routing rules again; a broken file keeps the rules in use."""
    from fiona.router.rules import load_routing_rules

    try:
        node.set_rules(load_routing_rules(config))
    except ConfigError as exc:
        get_logger("fiona.router").error(
            "routing rules not reloaded: the file has errors; the previous rules stay",
            problems=[f"{key}: {message}" for key, message in exc.problems],
        )


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
@_config_option
def db_upgrade(config_path: Path | None) -> None:
    """Apply every pending schema migration."""
    from fiona.db import current_revision, head_revision, make_engine, upgrade

    config = _load(config_path)
    engine = make_engine(config.database.url)
    before = current_revision(engine)
    upgrade(engine)
    click.echo(f"database at {head_revision()} (was {before or 'empty'})")
    engine.dispose()


@main.command()
@_config_option
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("destination", type=click.Path(path_type=Path))
@click.option("--project", required=True, help="Project ID (with --config) or name.")
@click.option("--pseudonym", required=True, help="Written as PatientID and PatientName.")
@click.option("--event", default="", help="Event / time point (ClinicalTrialTimePointID).")
@click.option("--site", default="", help="Site code (ClinicalTrialSiteID).")
@click.option("--site-name", default="", help="Site name (ClinicalTrialSiteName).")
@click.option("--patient-name", default=None, help="PatientName, if not the pseudonym.")
@click.option(
    "--profile",
    "profile_name",
    default=None,
    help="Profile name or YAML file; without it the project's settings come from --config.",
)
@click.option(
    "--uid-scheme",
    type=click.Choice(["mmiv", "mmiv-hex", "hmac"]),
    default=None,
    help="With --profile: how UIDs are mapped.",
)
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --profile and --uid-scheme hmac: the project secret.",
)
@click.option(
    "--date-offset-days",
    type=click.IntRange(-36500, 36500),
    default=None,
    help="Days added to dates (default: the project's; 42 with --profile).",
)
def anonymize(
    config_path: Path | None,
    source: Path,
    destination: Path,
    project: str,
    pseudonym: str,
    event: str,
    site: str,
    site_name: str,
    patient_name: str | None,
    profile_name: str | None,
    uid_scheme: str | None,
    secret_file: Path | None,
    date_offset_days: int | None,
) -> None:
    """De-identify SOURCE (a file or a folder, recursively) into DESTINATION.

    With --config the project's profile, UID scheme, secret and date offset are used. With
    --profile everything is given on the command line. Outputs are named
    DESTINATION/<Study UID>/<Series UID>/<SOP Instance UID>.dcm (or DESTINATION itself when
    SOURCE is one file and DESTINATION ends in .dcm). Files that cannot be processed are
    reported and left where they are.
    """
    from fiona.anonymizer import load_profile, make_scheme
    from fiona.anonymizer.engine import Context
    from fiona.anonymizer.files import anonymize_path, iter_inputs
    from fiona.anonymizer.projects import project_deidentification
    from fiona.config import read_secret

    if not pseudonym.strip():
        raise click.UsageError("--pseudonym must not be empty")
    if profile_name is None:
        if uid_scheme or secret_file:
            raise click.UsageError("--uid-scheme/--secret-file go with --profile")
        config = _load(config_path)
        try:
            settings = project_deidentification(config, project)
        except ConfigError as exc:
            click.echo(f"configuration error:\n{exc}", err=True)
            sys.exit(2)
        profile = settings.profile
        scheme_name = settings.scheme_name
        context = settings.context(
            pseudonym,
            event=event,
            site=site,
            site_name=site_name,
            patient_name=patient_name,
            date_offset_days=date_offset_days,
        )
    else:
        if uid_scheme is None:
            raise click.UsageError("--profile needs --uid-scheme (mmiv, mmiv-hex or hmac)")
        if not project.isascii() or not project.strip():
            raise click.UsageError("--project must be a non-empty ASCII name")
        try:
            profile = load_profile(profile_name)
            secret = None
            if uid_scheme == "hmac":
                if secret_file is None:
                    raise click.UsageError("--uid-scheme hmac needs --secret-file")
                secret = read_secret(secret_file)
            scheme = make_scheme(uid_scheme, project, secret=secret)
        except ConfigError as exc:
            click.echo(f"profile error:\n{exc}", err=True)
            sys.exit(2)
        except ValueError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        scheme_name = uid_scheme
        context = Context(
            project=project,
            pseudonym=pseudonym,
            scheme=scheme,
            date_offset_days=42 if date_offset_days is None else date_offset_days,
            patient_name=patient_name,
            event=event,
            site=site,
            site_name=site_name,
        )
    total = sum(1 for _ in iter_inputs(source))
    with click.progressbar(length=total, label="anonymizing", file=sys.stderr) as bar:
        report = anonymize_path(
            source, destination, profile, context, progress=lambda _p: bar.update(1)
        )
    for path, reason in report.skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    for path, reason in report.failed:
        click.echo(f"FAILED  {path}: {reason}", err=True)
    click.echo(
        f"anonymized {report.written} files ({len(report.studies)} studies) with profile "
        f"{profile.label}, UID scheme {scheme_name}, date offset {context.date_offset_days} "
        f"days; {report.unchanged} already there, {len(report.skipped)} skipped, "
        f"{len(report.failed)} failed"
    )
    sys.exit(1 if report.failed else 0)


@main.command()
@_config_option
@click.option("--request", "request_id", type=int, required=True, help="Transfer request id.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--retry", is_flag=True, help="Make the request's failed deliveries due again (cause fixed)."
)
def transfers(config_path: Path | None, request_id: int, as_json: bool, retry: bool) -> None:
    """The delivery ledger of one transfer request: every instance, every destination."""
    import getpass

    from sqlalchemy import select

    from fiona.audit import utcnow
    from fiona.db import Delivery, TransferRequest, make_engine, make_sessionmaker, upgrade
    from fiona.forwarder.prepared import PreparedFiles
    from fiona.requests import RequestError, retry_request

    config = _load(config_path)
    engine = make_engine(config.database.url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    kept = PreparedFiles(config.storage.path)
    if retry:
        try:
            actor = getpass.getuser()
            click.echo(retry_request(sessions, request_id, utcnow(), actor, config.storage.path))
        except RequestError as exc:
            click.echo(str(exc), err=True)
            sys.exit(1)
    with sessions() as session:
        request = session.get(TransferRequest, request_id)
        if request is None:
            click.echo(f"no transfer request {request_id}", err=True)
            sys.exit(1)
        rows = session.scalars(
            select(Delivery).where(Delivery.request_id == request_id).order_by(
                Delivery.new_series_instance_uid, Delivery.new_sop_instance_uid,
                Delivery.destination,
            )
        ).all()  # fmt: skip
        ledger = [
            {
                "destination": row.destination,
                "sop_instance_uid": row.new_sop_instance_uid,
                "series_instance_uid": row.new_series_instance_uid,
                "state": row.state.value,
                "attempts": row.attempts,
                "last_status": row.last_status,
                "last_error_class": row.last_error_class,
                "last_error": row.last_error,
                "next_attempt_at": row.next_attempt_at.isoformat(),
                "acknowledged_at": row.acknowledged_at.isoformat() if row.acknowledged_at else None,
                "quarantined": _quarantined(kept, row),
            }
            for row in rows
        ]
        head = {
            "request": request.id,
            "project": request.transfer_project_name,
            "status": request.status.value,
            "new_study_instance_uid": request.transfer_mapped_uid,
            "error": request.transfer_error,
            "error_message": request.transfer_error_message,
        }
    engine.dispose()
    if as_json:
        click.echo(json.dumps({**head, "deliveries": ledger}, indent=2))
        return
    click.echo(
        f"request {head['request']} ({head['project']}): {head['status']}"
        + (f" — {head['error_message']}" if head["error_message"] else "")
    )
    for entry in ledger:
        status = "" if entry["last_status"] is None else f" 0x{entry['last_status']:04X}"
        why = f" {entry['last_error_class']}: {entry['last_error']}" if entry["last_error"] else ""
        kept_at = f" (kept in {entry['quarantined']})" if entry["quarantined"] else ""
        click.echo(
            f"  {entry['destination']:<16} {entry['sop_instance_uid']}  {entry['state']:<9} "
            f"attempts {entry['attempts']}{status}{why}{kept_at}"
        )


def _quarantined(kept: Any, row: Any) -> str | None:
    """Where a refused instance's de-identified bytes were kept, if they were."""
    from fiona.db import DeliveryState

    path = kept.quarantine_path(row.request_id, row.destination, row.new_sop_instance_uid)
    return str(path) if row.state == DeliveryState.FAILED and path.exists() else None


@main.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Instances, studies by state, quarantine, free disk."""
    from fiona.db import make_engine, make_sessionmaker, upgrade
    from fiona.scp.spool import Spool
    from fiona.status import node_status

    config = _load(config_path)
    engine = make_engine(config.database.url)
    upgrade(engine)
    spool = Spool(config.storage.path, config.storage.min_free_mb)
    spool.prepare()
    report = node_status(make_sessionmaker(engine), spool, tuple(config.destinations))
    engine.dispose()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(
        f"instances:   {report['instances']} ({report['instance_bytes']} bytes, "
        f"{report['instances_missing_file']} missing on disk)"
    )
    click.echo("studies:     " + ", ".join(f"{k} {v}" for k, v in report["studies"].items()))
    click.echo(f"quarantined: {report['quarantined']}")
    click.echo("requests:    " + ", ".join(f"{k} {v}" for k, v in report["requests"].items() if v))
    for name, dest in report["destinations"].items():
        click.echo(
            f"destination {name}: queued {dest['queued']}, in flight {dest['in_flight']}, "
            f"delivered {dest['delivered']}, failed {dest['failed']}, breaker {dest['breaker']}"
            + (
                f", oldest waiting since {dest['oldest_waiting_since']}"
                if dest["oldest_waiting_since"]
                else ""
            )
        )
    click.echo(
        f"free disk:   {report['storage']['free_bytes'] // 2**20} MB "
        f"(floor {report['storage']['min_free_bytes'] // 2**20} MB)"
    )


@main.command()
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--called-ae", default="ANY-SCP", show_default=True)
@click.option("--calling-ae", default="FIONA", show_default=True)
@click.option("--timeout", default=10.0, show_default=True)
def echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float) -> None:
    """C-ECHO a peer (PS3.4 A) and print its answer."""
    from fiona.scu import echo as send_echo

    ok, message = send_echo(host, port, called_ae, calling_ae, timeout)
    click.echo(message, err=not ok)
    sys.exit(0 if ok else 1)


@main.command("import")
@_config_option
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--called-ae", default=None, help="Called AE title to record (default: node's).")
@click.option(
    "--calling-ae", default="IMPORT", show_default=True, help="Calling AE title to record."
)
def import_(config_path: Path | None, folder: Path, called_ae: str | None, calling_ae: str) -> None:
    """Ingest a folder of DICOM files (DVD, USB stick, legacy export) like C-STORE."""
    from fiona.scp.importer import import_folder, iter_files
    from fiona.scp.server import configure_pynetdicom, open_node_services

    config = _load(config_path)
    configure_logging("WARNING", stream=sys.stderr)
    services = open_node_services(config)
    configure_pynetdicom(services.spool)
    total = sum(1 for _ in iter_files(folder))
    try:
        with click.progressbar(length=total, label="importing", file=sys.stderr) as bar:
            report = import_folder(
                services.ingestor,
                folder,
                called_ae_title=called_ae or config.node.ae_title,
                calling_ae_title=calling_ae,
                progress=lambda _p: bar.update(1),
            )
    finally:
        services.close()
    for path, reason in report.skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    for path, reason in report.failed:
        click.echo(f"FAILED  {path}: {reason}", err=True)
    counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(report.outcomes.items()))
    click.echo(
        f"import {report.association_id}: {counts or 'nothing'}; "
        f"skipped {len(report.skipped)} non-DICOM"
    )
    sys.exit(1 if report.failed else 0)


def _register() -> None:
    from fiona.audit_cli import audit, report
    from fiona.quarantine_cli import quarantine
    from fiona.request_cli import request
    from fiona.route_cli import coupling, route, studies
    from fiona.user_cli import user

    main.add_command(quarantine)
    main.add_command(user)
    main.add_command(audit)
    main.add_command(report)
    main.add_command(coupling)
    main.add_command(request)
    main.add_command(route)
    main.add_command(studies)


_register()

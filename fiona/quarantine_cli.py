"""``fiona quarantine list|release|delete``: what the receive quarantine holds, and why."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Any

import click

from fiona.cli import _config_option, _load
from fiona.request_cli import _fail

__all__ = ["quarantine"]


@click.group()
def quarantine() -> None:
    """Files FIONA could not accept: list them, release one after a repair, or delete one."""


@quarantine.command("list")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_command(config_path: Path | None, as_json: bool) -> None:
    """Quarantined files, newest first: id, when, sender, reason, path."""
    from fiona.quarantine import list_quarantined
    from fiona.request_cli import _database

    config = _load(config_path)
    with _database(config) as sessions, sessions() as session:
        rows: list[dict[str, Any]] = [
            {
                "id": e.id,
                "quarantined_at": e.quarantined_at.isoformat(),
                "calling_ae_title": e.calling_ae_title,
                "called_ae_title": e.called_ae_title,
                "peer_address": e.peer_address,
                "reason": e.reason,
                "status": f"0x{e.status_code:04X}",
                "size_bytes": e.size_bytes,
                "path": e.path,
            }
            for e in list_quarantined(session)
        ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(
            f"{row['id']}\t{row['quarantined_at'][:19]}\t{row['calling_ae_title']}@"
            f"{row['peer_address']}\t{row['status']} {row['reason']}\t{row['path']}"
        )


@quarantine.command("release")
@_config_option
@click.argument("entry_id", type=int)
def release(config_path: Path | None, entry_id: int) -> None:
    """Check quarantined file ENTRY_ID again and, if it passes now, store it as received."""
    from fiona.audit import utcnow
    from fiona.quarantine import QuarantineError, release_quarantined
    from fiona.scp.server import open_node_services

    config = _load(config_path)
    services = open_node_services(config)
    try:
        done = release_quarantined(
            services.session_factory, services.ingestor, entry_id, getpass.getuser(), utcnow()
        )
    except QuarantineError as exc:
        _fail(f"not released: {exc}", 1)
    finally:
        services.close()
    click.echo(f"released {entry_id}: {done.outcome.lower()} into study {done.study_instance_uid}")


@quarantine.command("delete")
@_config_option
@click.argument("entry_id", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(config_path: Path | None, entry_id: int, yes: bool) -> None:
    """Delete quarantined file ENTRY_ID for good (an audit row keeps its reason)."""
    from fiona.audit import utcnow
    from fiona.quarantine import QuarantineError, delete_quarantined
    from fiona.request_cli import _database
    from fiona.scp.spool import Spool

    config = _load(config_path)
    if not yes:
        click.confirm(f"Delete quarantined file {entry_id} for good?", abort=True)
    spool = Spool(config.storage.path, config.storage.min_free_mb)
    with _database(config) as sessions:
        try:
            delete_quarantined(sessions, spool, entry_id, getpass.getuser(), utcnow())
        except QuarantineError as exc:
            _fail(str(exc), 1)
    click.echo(f"deleted quarantined file {entry_id}")

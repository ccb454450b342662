"""``fiona user …``: the people (and scripts) who use the web interface and the HTTP API."""

from __future__ import annotations

import getpass
from pathlib import Path

import click

from fiona.cli import _config_option, _load
from fiona.request_cli import _database, _fail

__all__ = ["user"]


@click.group()
def user() -> None:
    """Users of the web interface and the HTTP API (roles admin, project, auditor)."""


@user.command("add")
@_config_option
@click.argument("name")
@click.option(
    "--role",
    required=True,
    type=click.Choice(["admin", "project", "auditor"]),
    help="admin: everything; project: their projects' requests and studies; auditor: read-only.",
)
@click.option("--project", "projects", multiple=True, help="With --role project (repeatable).")
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the password from this file (first line); without it you are asked.",
)
def add(
    config_path: Path | None,
    name: str,
    role: str,
    projects: tuple[str, ...],
    password_file: Path | None,
) -> None:
    """Add user NAME, or change their role, projects and password."""
    from fiona.audit import utcnow
    from fiona.db import UserRole
    from fiona.web.auth import UserError, add_user

    config = _load(config_path)
    if password_file is not None:
        lines = password_file.read_text(encoding="utf-8").splitlines()
        password = lines[0] if lines else ""
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _database(config) as sessions:
        try:
            with sessions() as session, session.begin():
                add_user(
                    session,
                    name,
                    UserRole(role),
                    projects,
                    password,
                    getpass.getuser(),
                    utcnow(),
                    sorted(config.projects),
                )
        except UserError as exc:
            _fail(f"user not saved: {exc}", 2)
    click.echo(f"user {name}: {role}" + (f" of {', '.join(projects)}" if projects else ""))


@user.command("token")
@_config_option
@click.argument("name")
def token(config_path: Path | None, name: str) -> None:
    """Issue a new API token for NAME (printed once; the old one stops working)."""
    from fiona.audit import utcnow
    from fiona.web.auth import UserError, issue_token

    config = _load(config_path)
    with _database(config) as sessions:
        try:
            with sessions() as session, session.begin():
                value = issue_token(session, name, getpass.getuser(), utcnow())
        except UserError as exc:
            _fail(str(exc), 2)
    click.echo(value)


@user.command("disable")
@_config_option
@click.argument("name")
def disable(config_path: Path | None, name: str) -> None:
    """Lock NAME out (web sessions and API token); `fiona user add` enables them again."""
    from fiona.audit import utcnow
    from fiona.web.auth import UserError, disable_user

    config = _load(config_path)
    with _database(config) as sessions:
        try:
            with sessions() as session, session.begin():
                disable_user(session, name, getpass.getuser(), utcnow())
        except UserError as exc:
            _fail(str(exc), 2)
    click.echo(f"user {name}: disabled")


@user.command("list")
@_config_option
def list_users(config_path: Path | None) -> None:
    """Users, their roles and projects."""
    from sqlalchemy import select

    from fiona.db import User

    config = _load(config_path)
    with _database(config) as sessions, sessions() as session:
        for row in session.scalars(select(User).order_by(User.name)):
            state = "disabled" if row.disabled else "active"
            projects = ",".join(row.projects or []) or "-"
            token = "token" if row.token_hash else "no token"
            click.echo(f"{row.name}\t{row.role.value}\t{projects}\t{state}\t{token}")

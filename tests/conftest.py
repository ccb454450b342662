"""Fixtures: databases (SQLite and a scratch PostgreSQL schema), a node, a server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from fionatest import FionaServer, write_config
from forwarding import FAST, Node
from sqlalchemy import create_engine, text

from fiona.config import load_config
from fiona.scp.server import NodeServices, open_node_services

PG_ADMIN_URL = os.environ.get(
    "FIONA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database per test: a SQLite file, or a scratch PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/fiona.db"
        return
    schema = f"fiona_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class FakeClock:
    """An injectable clock for stability tests."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def services(tmp_path: Path, db_url: str, clock: FakeClock) -> Iterator[NodeServices]:
    """The receive stage's services (spool, migrated database, index writer), no socket."""
    config = load_config(write_config(tmp_path / "node", db_url))
    node = open_node_services(config, clock)
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[object]:
    """Factory for ``fiona serve`` subprocesses; all are stopped at the end."""
    servers: list[FionaServer] = []

    def factory(db_url: str | None = None, name: str = "server", **sections: object) -> FionaServer:
        folder = tmp_path / name
        config_path = write_config(folder, db_url or f"sqlite:///{folder}/fiona.db", **sections)
        raw = yaml.safe_load(config_path.read_text())
        server = FionaServer(config_path, raw["node"]["port"], folder / raw["storage"]["path"])
        servers.append(server)
        return server

    yield factory
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)


@pytest.fixture
def node_factory(make_server: Callable[..., FionaServer]) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def factory(
        destinations: dict[str, Any],
        *,
        db_url: str | None = None,
        profile: str = "mmiv",
        uid_scheme: str = "mmiv",
        forwarding: dict[str, Any] | None = None,
        project: dict[str, Any] | None = None,
        requests: dict[str, Any] | None = None,
        routing: dict[str, Any] | None = None,
        more_projects: dict[str, dict[str, Any]] | None = None,
        stable_after_seconds: float | None = None,
        web: dict[str, Any] | None = None,
    ) -> Node:
        """A started ``fiona serve`` with project BICAM (and *more_projects*) sending to
        *destinations*."""
        extra = {"requests": requests} if requests is not None else {}
        if routing is not None:
            extra["routing"] = routing
        if stable_after_seconds is not None:
            extra["stable_after_seconds"] = stable_after_seconds
        if web is not None:
            extra["web"] = web
        server = make_server(
            db_url,
            destinations=destinations,
            projects={
                "BICAM": {
                    "ae_titles": ["BICAM"],
                    "destinations": sorted(destinations),
                    "profile": profile,
                    "uid_scheme": uid_scheme,
                    **(project or {}),
                },
                **(more_projects or {}),
            },
            forwarding={**FAST, **(forwarding or {})},
            **extra,
        )
        server.start()
        node = Node(server)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.close()

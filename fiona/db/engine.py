"""Engines and sessions: SQLite in WAL mode (embedded default) or PostgreSQL."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["WriteTurn", "make_engine", "make_sessionmaker"]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN (see _sqlite_begin), not pysqlite.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets readers (CLI, web) run beside the writer; FULL makes every commit
    # durable (the WAL is fsynced), which a C-STORE success promises.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # IMMEDIATE takes the write lock up front. A deferred transaction that reads and
    # then writes fails at once with SQLITE_BUSY (no busy-wait) when another process
    # committed in between — several FIONA processes write to one database file.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for a database URL, with FIONA's SQLite settings.

    For SQLite the folder of the database file is created if needed.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            **kwargs,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Return the session factory every FIONA component uses."""
    return sessionmaker(engine, expire_on_commit=False)


class WriteTurn:
    """Several processes' writes to one SQLite file, taken in turn rather than by polling.

    SQLite lets one connection write at a time; a second one that finds the file locked
    sleeps in its busy handler (1, 2, 5, 10 ms …) and tries again, whether the writer
    finished 50 µs later or not. A writer that waits for its turn — an exclusive ``flock``
    on ``<database>.write-turn``, beside the ``-wal`` and ``-shm`` files — is woken by the
    kernel the moment the other one lets go. With two receiving processes
    (``node.workers``) each committing an index row per instance, the waits for the lock
    fell from ~11% of every association's time to ~6%; on two cores shared with the
    senders the throughput stayed the same (the other process had the CPU meanwhile;
    BENCHMARKS.md).

    The turn only orders FIONA's frequent writers (every process's index writer); SQLite's
    own locking still guarantees correctness, so a writer without a turn (a CLI command, the
    web UI) waits in its busy handler as before. A lock file that cannot be opened (a
    read-only folder) means no turn: SQLite's locking alone, as before. PostgreSQL and
    in-memory databases need none. The kernel releases a dead process's turn.

    One :class:`WriteTurn` belongs to one thread: ``flock`` locks an open file, and two
    threads of one process sharing it would not exclude each other.
    """

    SUFFIX = ".write-turn"

    def __init__(self, engine: Engine) -> None:
        url = engine.url
        database = url.database if url.get_backend_name() == "sqlite" else None
        self.path = Path(database + self.SUFFIX) if database and database != ":memory:" else None
        self._fd: int | None = None
        self._owner: int | None = None

    @contextlib.contextmanager
    def taken(self) -> Iterator[None]:
        """Hold the turn for the statements inside (blocks while another process has it)."""
        fd = self._open()
        if fd is None:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _open(self) -> int | None:
        if self.path is None:
            return None
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                self.path = None  # SQLite's own locking only
                return None
            self._owner = threading.get_ident()
        if self._owner != threading.get_ident():
            raise RuntimeError("a WriteTurn is used by one thread only")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

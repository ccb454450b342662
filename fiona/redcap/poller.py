"""The REDCap poll: an APScheduler job every ``requests.poll_seconds``, with back-off and alerts.

* Transient failures (REDCap down, slow, garbled): the next polls are skipped for a while that
  doubles with each failure (with jitter), up to ``requests.redcap.max_backoff_seconds``.
  Requests already in FIONA go on meanwhile; only new ones and status write-back wait.
* Forbidden (401/403) or refused (the project lacks FIONA's fields, a value REDCap rejects):
  an **alert** — an error log line and a ``REQUEST_SOURCE_ALERT`` audit row — and no retry loop:
  FIONA tries again when the token file changes (an operator put in a new token) or after an
  hour, whichever comes first, and alerts again only if the reason changed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.config import FionaConfig
from fiona.db import AuditEventType
from fiona.forwarder.ledger import exponential_delay
from fiona.heartbeat import Heartbeat
from fiona.redcap.client import RedcapError
from fiona.redcap.sync import RedcapSource, SyncResult

__all__ = ["ALERT_RETRY_SECONDS", "RedcapPoller"]

log = structlog.get_logger("fiona.redcap")

ALERT_RETRY_SECONDS = 3600.0
"""After an alert, the next attempt (unless the token file changes first)."""


class RedcapPoller:
    """Runs :meth:`RedcapSource.sync` on a schedule; calls *on_requests* when requests came in."""

    def __init__(
        self,
        config: FionaConfig,
        session_factory: sessionmaker[Session],
        node_key: bytes,
        clock: Callable[[], datetime],
        on_requests: Callable[[], None] = lambda: None,
        source: RedcapSource | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        assert config.requests.redcap is not None
        self.config = config
        self.settings = config.requests.redcap
        self.session_factory = session_factory
        self.clock = clock
        self.on_requests = on_requests
        self.source = source or RedcapSource(config, session_factory, node_key, clock)
        self.monotonic = monotonic
        self.failures = 0
        self.next_attempt = 0.0
        self.alert: str | None = None
        self._token_mtime: float | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._lock = threading.Lock()
        self._heartbeat = Heartbeat(config.storage.path, "redcap", interval=0.0)
        self._failure_beat = Heartbeat(config.storage.path, "redcap-failed", interval=0.0)

    def start(self) -> None:
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(
            self.poll,
            "interval",
            seconds=self.config.requests.poll_seconds,
            max_instances=1,
            coalesce=True,
            id="redcap-poll",
            next_run_time=self.clock(),
        )
        self._scheduler.start()

    def stop(self) -> None:
        """Stop polling; a pass in progress is abandoned (each of its steps is idempotent)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        self.source.client.close()

    def _token_changed(self) -> bool:
        try:
            mtime = self.settings.token_file.stat().st_mtime
        except OSError:
            return False
        return self._token_mtime is not None and mtime != self._token_mtime

    def poll(self) -> SyncResult | None:
        """One scheduled poll (skipped while backing off); never raises."""
        with self._lock:
            now = self.monotonic()
            if now < self.next_attempt and not (self.alert and self._token_changed()):
                return None
            try:
                result = self.source.sync()
            except RedcapError as exc:
                self._failed(exc)
                self._failure_beat.beat(self.clock(), kind=exc.kind)
                return None
            except Exception as exc:  # a bug or a database problem: back off
                log.exception("REDCap poll failed", error=type(exc).__name__)
                self._backoff()
                return None
            self._heartbeat.beat(self.clock())
            if self.alert is not None:
                log.info("REDCap accepts FIONA again")
            self.failures = 0
            self.alert = None
            self.next_attempt = 0.0
            if result.created or result.changed or result.written or result.incoming:
                log.info(
                    "REDCap synchronised",
                    created=result.created,
                    changed=result.changed,
                    refused_changes=result.refused_changes,
                    rejected=result.rejected,
                    written=result.written,
                    incoming=result.incoming,
                )
            if result.created or result.changed:
                self.on_requests()
            return result

    def _backoff(self) -> float:
        self.failures += 1
        delay = exponential_delay(
            self.failures + 1, self.config.requests.poll_seconds, self.settings.max_backoff_seconds
        )
        self.next_attempt = self.monotonic() + delay
        return delay

    def _failed(self, exc: RedcapError) -> None:
        if exc.kind == "transient":
            delay = self._backoff()
            log.warning("REDCap unavailable: backing off", reason=str(exc), failures=self.failures,
                        retry_in_seconds=round(delay, 1))  # fmt: skip
            return
        try:
            self._token_mtime = self.settings.token_file.stat().st_mtime
        except OSError:
            self._token_mtime = None
        self.next_attempt = self.monotonic() + ALERT_RETRY_SECONDS
        reason = f"{exc} ({exc.kind})"
        if reason == self.alert:
            return
        self.alert = reason
        # REDCap's own message (exc.detail) may quote record values: never logged or audited.
        log.error("REDCap alert: requests are not read until this is fixed", reason=reason,
                  hint="run `fiona request sync` to see REDCap's message")  # fmt: skip
        with self.session_factory() as session, session.begin():
            session.add(
                audit_event(
                    AuditEventType.REQUEST_SOURCE_ALERT,
                    actor="fiona",
                    occurred_at=self.clock(),
                    source="redcap",
                    kind=exc.kind,
                    reason=str(exc),
                )
            )

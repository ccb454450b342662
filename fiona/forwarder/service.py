"""The forwarding service that ``fiona serve`` runs in its primary process.

* A pipeline thread, every ``forwarding.poll_seconds``: moves requests on
  (:func:`fiona.requests.activate_requests`), prepares ``processing`` requests
  (:func:`~fiona.forwarder.ledger.prepare`) and makes expired leases due again.
* Per destination, ``max_associations`` sender threads: claim a due batch (one series of one
  request), rebuild the de-identified bytes (deterministic, checked against the prepared
  digest), send, record each outcome. One destination being down never stalls another.
* A circuit breaker per destination (state in the database): after ``breaker_failures``
  consecutive batches that could not even reach the destination, senders stop trying; every
  ``breaker_probe_seconds`` one of them probes (C-ECHO, or the folder), and when it answers the
  breaker closes and everything waiting for that destination is due at once.
* With ``requests.source: redcap``, the REDCap poll (:mod:`fiona.redcap.poller`): new
  requests from REDCap wake the pipeline; statuses go back to REDCap at the next poll.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.orm import Session, sessionmaker

from fiona.anonymizer.projects import ProjectDeidentification, project_deidentification
from fiona.audit import audit_event
from fiona.config import DicomDestination, DicomWebDestination, FionaConfig
from fiona.db import AuditEventType, Delivery, DeliveryState
from fiona.errors import ConfigError
from fiona.forwarder.classify import Kind, Outcome
from fiona.forwarder.ledger import (
    WorkItem,
    breaker_state,
    claim,
    deidentify_item,
    prepare,
    record,
    recover_leases,
    release_owner,
    still_needed,
)
from fiona.forwarder.prepared import PreparedFiles
from fiona.forwarder.senders import DicomSender, DicomWebSender, FolderSender, Prepared, Sender
from fiona.forwarder.verify import verify_deliveries
from fiona.heartbeat import Heartbeat
from fiona.metrics import SEND_SECONDS
from fiona.requests import activate_requests

__all__ = ["Forwarder"]

log = structlog.get_logger("fiona.forwarder")

# Outcomes that say the destination itself could not be reached or refused to talk.
_UNREACHABLE = {"unreachable", "rejected-transient", "aborted", "no-response"}
LEASE_CHECK_SECONDS = 15.0
"""How often expired leases are looked for (a lease lasts minutes; no need to scan each poll)."""
BUSY_POLL_SECONDS = 0.2
"""The pipeline's poll while its last step found work (instead of ``poll_seconds``)."""


class Forwarder:
    """Prepares requests and delivers them to every configured destination."""

    def __init__(
        self,
        config: FionaConfig,
        session_factory: sessionmaker[Session],
        storage: Path,
        node_key: bytes,
        clock: Callable[[], datetime],
        senders: dict[str, Sender] | None = None,
    ) -> None:
        self.config = config
        self.session_factory = session_factory
        self.storage = storage
        self.node_key = node_key
        self.clock = clock
        self.owner_prefix = f"{socket.gethostname()}:"
        self.senders: dict[str, Sender] = senders or {
            name: self._sender(name) for name in config.destinations
        }
        self._stop = threading.Event()
        self._pipeline_wake = threading.Event()
        self._senders_wake = threading.Condition()
        self._last_lease_check = 0.0
        self._threads: list[threading.Thread] = []
        self._probing: dict[str, threading.Lock] = {name: threading.Lock() for name in self.senders}
        self._settings: dict[str, ProjectDeidentification] = {}
        self._settings_lock = threading.Lock()
        self._heartbeat = Heartbeat(storage, "pipeline")
        self.lease_seconds = 300.0
        self.prepared = PreparedFiles(storage)
        self._redcap: Any = None

    def _sender(self, name: str) -> Sender:
        destination = self.config.destinations[name]
        if isinstance(destination, DicomDestination):
            return DicomSender(name, destination, self.config.node.ae_title)
        if isinstance(destination, DicomWebDestination):
            return DicomWebSender(name, destination)
        return FolderSender(name, destination)

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.prepared.reset()  # only files written by this run are trusted whole
        released = release_owner(self.session_factory, self.owner_prefix, self.clock())
        if released:
            log.warning("deliveries in flight at the last stop are due again", count=released)
        self._spawn("fiona-forward-pipeline", self._pipeline_loop)
        for name, destination in self.config.destinations.items():
            for index in range(destination.max_associations):
                self._spawn(f"fiona-forward-{name}-{index}", self._sender_loop, name)
        if self.config.requests.source == "redcap":
            from fiona.redcap.poller import RedcapPoller

            self._redcap = RedcapPoller(
                self.config, self.session_factory, self.node_key, self.clock, self.kick
            )
            self._redcap.start()
        log.info("forwarder started", destinations=sorted(self.config.destinations))

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def kick(self) -> None:
        """Look for work now (a study became stable, a request was added)."""
        self._pipeline_wake.set()

    def _wake_senders(self) -> None:
        with self._senders_wake:
            self._senders_wake.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        if self._redcap is not None:
            self._redcap.stop()
        self._stop.set()
        self._pipeline_wake.set()
        self._wake_senders()
        for thread in self._threads:
            thread.join(timeout)

    def _pause(self) -> None:
        with self._senders_wake:
            self._senders_wake.wait(self.config.forwarding.poll_seconds)

    # -- the pipeline ------------------------------------------------------------------------

    def run_pipeline_once(self) -> bool:
        """Activate requests, prepare ``processing`` ones, recover expired leases.

        Returns whether anything was activated or prepared (a study may still be streaming in).
        """
        now = self.clock()
        if time.monotonic() - self._last_lease_check > LEASE_CHECK_SECONDS:
            self._last_lease_check = time.monotonic()
            recover_leases(self.session_factory, now)
        ready = activate_requests(self.session_factory, self.config, self.node_key, now)
        added = prepare(
            self.session_factory, self.config, self.storage, self.node_key, now,
            settings_cache=self._settings,
        )  # fmt: skip
        if ready or added:
            log.info("requests prepared", requests=len(ready), deliveries=added)
            self._wake_senders()
        verify_deliveries(self.session_factory, self.config, self.clock())
        self._heartbeat.beat(now)
        return bool(ready or added)

    def _pipeline_loop(self) -> None:
        busy = False
        while not self._stop.is_set():
            try:
                busy = self.run_pipeline_once()
            except Exception:
                log.exception("forwarding pipeline step failed")
                busy = False
            # While instances keep coming (a study streaming in), look again soon: the last
            # ones are then prepared a fraction of a second after they arrive, not a poll later.
            poll = self.config.forwarding.poll_seconds
            self._pipeline_wake.wait(min(poll, BUSY_POLL_SECONDS) if busy else poll)
            self._pipeline_wake.clear()

    # -- senders -----------------------------------------------------------------------------

    def _project(self, name: str) -> ProjectDeidentification:
        with self._settings_lock:
            settings = self._settings.get(name)
            if settings is None:
                settings = self._settings[name] = project_deidentification(self.config, name)
            return settings

    def send_once(self, destination: str) -> int:
        """One sender step for *destination*; returns the number of items attempted."""
        if not self._breaker_allows(destination):
            return 0
        owner = f"{self.owner_prefix}{os.getpid()}:{threading.current_thread().name}"
        limit = self.config.destinations[destination].batch_size
        items = claim(
            self.session_factory, self.storage, destination, owner, self.clock(),
            self.lease_seconds, limit, share=self.config.destinations[destination].max_associations,
        )  # fmt: skip
        if not items:
            return 0
        prepared: list[Prepared] = []
        results: list[tuple[WorkItem, Outcome]] = []
        for item in items:
            try:
                path, failure = deidentify_item(item, self._project(item.project), self.prepared)
            except ConfigError as exc:
                path, failure = None, Outcome(Kind.PERMANENT, "configuration", str(exc))
            if path is None:
                assert failure is not None
                results.append((item, failure))
            else:
                prepared.append((item, path))
        if prepared:
            with SEND_SECONDS.labels(destination).time():
                results.extend(self.senders[destination].send(prepared))
        now = self.clock()
        record(self.session_factory, results, now, self.config.forwarding, self.node_key)
        self._account(destination, [outcome for _item, outcome in results], now)
        self._tidy(destination, results, now)
        delivered = sum(1 for _item, outcome in results if outcome.kind.delivered)
        log.info(
            "batch sent",
            destination=destination,
            instances=len(results),
            delivered=delivered,
            outcomes=sorted({outcome.label for _item, outcome in results}),
        )
        return len(results)

    def _tidy(
        self, destination: str, results: list[tuple[WorkItem, Outcome]], now: datetime
    ) -> None:
        """Keep what a destination refused for good; drop prepared files nobody needs."""
        for item, outcome in results:
            if outcome.kind == Kind.PERMANENT:
                kept = self.prepared.path(item.request_id, item.instance_id, item.digest)
                if kept.exists():
                    self.prepared.quarantine(
                        kept, item.request_id, destination, item.new_sop_instance_uid,
                        {"delivery": item.delivery_id, "error_class": outcome.label,
                         "status": outcome.status, "reason": outcome.reason},
                        now,
                    )  # fmt: skip
        by_request: dict[int, list[int]] = {}
        for item, _outcome in results:
            by_request.setdefault(item.request_id, []).append(item.instance_id)
        for request_id, instance_ids in by_request.items():
            needed = still_needed(self.session_factory, request_id, instance_ids)
            self.prepared.discard(request_id, [i for i in instance_ids if i not in needed])

    def _sender_loop(self, destination: str) -> None:
        while not self._stop.is_set():
            try:
                attempted = self.send_once(destination)
            except Exception:
                log.exception("sender step failed", destination=destination)
                attempted = 0
            if not attempted:
                self._pause()

    # -- circuit breaker ---------------------------------------------------------------------

    def _breaker_allows(self, destination: str) -> bool:
        now = self.clock()
        with self.session_factory() as session, session.begin():
            state = breaker_state(session, destination, now)
            if not state.breaker_open:
                return True
            if state.next_probe_at is not None and state.next_probe_at > now:
                return False
        lock = self._probing[destination]
        if not lock.acquire(blocking=False):
            return False
        try:
            ok, message = self.senders[destination].probe()
            now = self.clock()
            with self.session_factory() as session, session.begin():
                state = breaker_state(session, destination, now)
                if not ok:
                    state.next_probe_at = now + timedelta(
                        seconds=self.config.forwarding.breaker_probe_seconds
                    )
                    state.last_error = message
                    state.updated_at = now
                    return False
                state.breaker_open = False
                state.consecutive_failures = 0
                state.next_probe_at = None
                state.updated_at = now
                session.query(Delivery).filter(
                    Delivery.destination == destination, Delivery.state == DeliveryState.PENDING
                ).update({Delivery.next_attempt_at: now}, synchronize_session=False)
                session.add(
                    audit_event(
                        AuditEventType.BREAKER_CLOSED,
                        actor="fiona",
                        occurred_at=now,
                        destination=destination,
                        probe=message,
                    )
                )
            log.info("destination answers again: breaker closed", destination=destination)
            self._wake_senders()
            return True
        finally:
            lock.release()

    def _account(self, destination: str, outcomes: list[Outcome], now: datetime) -> None:
        unreachable = bool(outcomes) and all(o.label in _UNREACHABLE for o in outcomes)
        reached = any(o.label not in _UNREACHABLE for o in outcomes)
        if not unreachable and not reached:
            return
        with self.session_factory() as session, session.begin():
            state = breaker_state(session, destination, now)
            if reached:
                if state.consecutive_failures:
                    state.consecutive_failures = 0
                    state.updated_at = now
                return
            state.consecutive_failures += 1
            state.last_error = outcomes[0].reason
            state.updated_at = now
            limit = self.config.forwarding.breaker_failures
            if not state.breaker_open and state.consecutive_failures >= limit:
                state.breaker_open = True
                state.opened_at = now
                state.next_probe_at = now + timedelta(
                    seconds=self.config.forwarding.breaker_probe_seconds
                )
                session.add(
                    audit_event(
                        AuditEventType.BREAKER_OPENED,
                        actor="fiona",
                        occurred_at=now,
                        destination=destination,
                        failures=state.consecutive_failures,
                        reason=state.last_error,
                    )
                )
                log.warning(
                    "destination unreachable: breaker open",
                    destination=destination,
                    failures=state.consecutive_failures,
                )

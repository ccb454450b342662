"""The receiving node: the pynetdicom AE, its start-up and its graceful stop.

Start-up order: spool folders → database migrations → node key → index writer →
spool/index reconciliation → stability sweeper → listening socket. Stop order (SIGTERM):
stop accepting, let in-flight associations finish (bounded), final sweep, writer drain.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import config as pydicom_config
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import Clock, audit_event, utcnow
from fiona.config import FionaConfig
from fiona.db import make_engine, make_sessionmaker, upgrade
from fiona.db.models import AuditChainHead, AuditEventType
from fiona.keys import load_node_key
from fiona.logs import get_logger
from fiona.router.retention import apply_retention
from fiona.router.rules import RuleSet, load_routing_rules
from fiona.router.service import route_receiving_studies, route_stable_studies
from fiona.scp.cstore import install as install_c_store_codec
from fiona.scp.handlers import ScpHandlers
from fiona.scp.index import IndexWriter
from fiona.scp.ingest import Ingestor
from fiona.scp.recovery import reconcile, recover_folder_of, recover_stopped_folders
from fiona.scp.spool import Spool
from fiona.scp.stability import sweep

__all__ = [
    "Node",
    "abort_association",
    "configure_pynetdicom",
    "event_handlers",
    "open_node_services",
]

log = get_logger(__name__)

STOPPED_FOLDERS_SECONDS = 60.0
"""How often the primary looks for temporary folders of processes that stopped (a `fiona
import` cut off) and recovers them (see :mod:`fiona.scp.recovery`)."""


def abort_association(assoc: Any) -> None:
    """Abort an acceptor association whatever state it is in.

    pynetdicom cannot abort a connection whose A-ASSOCIATE-RQ has not arrived yet (state
    Sta2): the abort request is an invalid event there and kills the association's reactor
    thread with ``InvalidEventError``. Such a connection (a port probe, a peer that is slow to
    speak) is closed at the transport instead, which the state machine handles (AA-5), and
    the association thread is woken the way its ACSE timeout would (an empty answer), so it
    ends now rather than ``acse_timeout`` later.
    """
    if assoc.dul.state_machine.current_state == "Sta2":
        assoc.dul.socket.close()
        assoc.dul.to_user_queue.put(None)
    else:
        assoc.abort()


def configure_pynetdicom(spool: Spool) -> None:
    """Set pynetdicom's and pydicom's process-wide options FIONA relies on.

    Both keep these in module globals; FIONA sets them once per process, here.
    pydicom only warns about values that break their VR's rules (data from the field does):
    FIONA stores such data as received and reports problems through its own checks.
    Chunked receive writes each incoming dataset to a temporary file as it arrives
    (memory stays flat for 2 GB objects) — in the spool's ``tmp/`` so that the final
    rename stays on one filesystem. Unrestricted storage accepts every storage SOP class,
    private and future ones included, with the transfer syntax the sender proposes.
    """
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True  # the forwarder streams files, never decodes
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.LOG_HANDLER_LEVEL = "none"
    tempfile.tempdir = str(spool.tmp)
    install_c_store_codec()  # C-STORE commands without pydicom datasets, both directions


def event_handlers(handlers: ScpHandlers) -> list[Any]:
    """The pynetdicom event bindings of FIONA's SCP."""
    return [
        (evt.EVT_CONN_OPEN, handlers.handle_conn_open),
        (evt.EVT_REQUESTED, handlers.handle_requested),
        (evt.EVT_REJECTED, handlers.handle_rejected),
        (evt.EVT_ACCEPTED, handlers.handle_accepted),
        (evt.EVT_CONN_CLOSE, handlers.handle_conn_close),
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store),
    ]


ACCEPT_DELAY_SECONDS = 0.02
"""How long a receiving process with one association in flight lets a new connection wait
for a process with fewer (per association in flight, up to five)."""


class SharedListenerServer(ThreadedAssociationServer):
    """An association server whose listening socket the node's receiving processes share.

    The primary binds the port; the workers inherit its socket (``listen_fd``). All wait on
    one accept queue, and a process with associations in flight leaves a new connection to
    a less busy one: it accepts only after ``ACCEPT_DELAY_SECONDS`` per association (or
    accepted connection not yet an association) it is serving, by which time an idle
    process has taken it. So concurrent associations spread over the processes (each with
    its own interpreter lock) instead of falling to whichever the kernel's port hashing
    picks (``SO_REUSEPORT`` put two storescu associations on one process in 6 of 9 runs), and no
    other program can join the port, as it could with ``SO_REUSEPORT`` under the same user.
    """

    def __init__(self, *args: Any, listen_fd: int | None = None, **kwargs: Any) -> None:
        self._listen_fd = listen_fd
        self._last_accept = -1.0
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._listen_fd is None:
            super().server_bind()
        else:
            assert self.socket is not None  # the unbound one socketserver made: not used
            self.socket.close()
            self.socket = socket.socket(fileno=self._listen_fd)
            self.server_address = self.socket.getsockname()
        # Another process may take a connection first: accept() must not wait then.
        assert self.socket is not None
        self.socket.setblocking(False)

    def server_activate(self) -> None:
        if self._listen_fd is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Serving associations, or a connection accepted just now that is not one yet.
        busy = len(self.ae.active_associations) + (time.monotonic() - self._last_accept < 0.05)
        if busy:
            time.sleep(min(busy, 5) * ACCEPT_DELAY_SECONDS)
        # BlockingIOError if another process took it. The accepted socket blocks, as
        # pynetdicom expects: it does not inherit the listening socket's O_NONBLOCK.
        client, address = super().get_request()
        self._last_accept = time.monotonic()
        return client, address

    def server_close(self) -> None:
        # This process's descriptor only (pynetdicom would shut the socket down, for every
        # process): the port closes when the last process stops listening.
        assert self.socket is not None
        self.socket.close()


@dataclass
class NodeServices:
    """The database-facing services shared by ``serve`` and ``import``."""

    config: FionaConfig
    engine: Engine
    session_factory: sessionmaker[Session]
    spool: Spool
    node_key: bytes
    writer: IndexWriter
    ingestor: Ingestor
    clock: Clock

    def close(self) -> None:
        self.ingestor.close()
        self.writer.stop()
        self.engine.dispose()
        self.spool.release_tmp()


def open_node_services(config: FionaConfig, clock: Clock = utcnow) -> NodeServices:
    """Prepare spool and database (migrating it) and start the index writer."""
    spool = Spool(config.storage.path, config.storage.min_free_mb)
    spool.prepare()
    spool.claim_tmp()
    engine = make_engine(config.database.url)
    upgrade(engine)
    session_factory = make_sessionmaker(engine)
    node_key = load_node_key(spool.root)
    writer = IndexWriter(session_factory, node_key)
    writer.start()
    # Without destinations nothing reads a stored file again soon: its pages leave the page
    # cache. A forwarder reads each one back within seconds (mode B streams it while the
    # study arrives): from the cache, measured faster end to end (BENCHMARKS.md).
    ingestor = Ingestor(spool, writer, node_key, clock, release_pages=not config.destinations)
    return NodeServices(config, engine, session_factory, spool, node_key, writer, ingestor, clock)


def _profile_digests(config: FionaConfig) -> dict[str, str]:
    """Each project's de-identification profile: name → SHA-256 of its YAML."""
    from fiona.anonymizer import load_profile

    digests: dict[str, str] = {}
    for settings in config.projects.values():
        try:
            digests[settings.profile] = load_profile(settings.profile).digest
        except Exception as exc:  # noqa: BLE001  # reported by the forwarder, noted here
            digests[settings.profile] = f"not loadable: {type(exc).__name__}"
    return digests


def _config_digest(config: FionaConfig) -> str:
    try:
        return hashlib.sha256(config.source.read_bytes()).hexdigest()
    except OSError:
        return ""


@dataclass
class Node:
    """A running FIONA receiving node."""

    config: FionaConfig
    clock: Clock = utcnow
    worker: bool = False
    """A secondary receiving process: no reconciliation, no sweeper (the primary's)."""
    run_forwarder: bool = True
    """Run the forwarding service in this process (when destinations are configured);
    ``fiona serve`` runs it in a process of its own instead (``forwarding.separate_process``)."""
    on_stable: Callable[[], None] | None = None
    """Called when studies became stable (``fiona serve``: wakes the forwarding process)."""
    rules: RuleSet | None = None
    """The routing rules (loaded from ``routing.rules_file`` at start when not given)."""
    listen_fds: tuple[int | None, int | None] = (None, None)
    """A worker's inherited listening sockets (DICOM, DICOM TLS): see :meth:`listening_fds`."""
    services: NodeServices | None = None
    _server: Any = None
    _scheduler: BackgroundScheduler | None = None
    _forwarder: Any = None
    _tls_server: Any = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _route_pending: bool = False
    _web: Any = None

    def start(self) -> None:
        """Start everything and listen; returns once the port is open."""
        config = self.config
        services = open_node_services(config, self.clock)
        self.services = services
        configure_pynetdicom(services.spool)
        if not self.worker:
            self._start_primary_duties(services)
        handlers = ScpHandlers(config, services.ingestor, self.clock)
        ae = AE(ae_title=config.node.ae_title)
        ae.add_supported_context(Verification)
        ae.maximum_associations = config.node.max_associations
        ae.maximum_pdu_size = config.node.maximum_pdu_size
        ae.acse_timeout = config.node.acse_timeout
        ae.dimse_timeout = config.node.dimse_timeout
        ae.network_timeout = config.node.network_timeout
        ae.require_called_aet = False  # FIONA decides in EVT_REQUESTED (several titles)
        handler_list = event_handlers(handlers)
        shared = config.node.workers > 1
        server_class = SharedListenerServer if shared else ThreadedAssociationServer
        plain_fd, tls_fd = self.listen_fds

        def inherited(fd: int | None) -> dict[str, Any]:
            return {"listen_fd": fd} if shared else {}

        if config.node.tls is not None:
            from fiona.tls import server_context

            self._tls_server = ae.make_server(
                (config.node.host, config.node.tls.port),
                evt_handlers=handler_list,
                ssl_context=server_context(config.node.tls),
                server_class=server_class,
                **inherited(tls_fd),
            )
            ae._servers.append(self._tls_server)
            threading.Thread(
                target=self._tls_server.serve_forever, name="fiona-tls-acceptor", daemon=True
            ).start()
        self._server = ae.make_server(
            (config.node.host, config.node.port),
            evt_handlers=handler_list,
            server_class=server_class,
            **inherited(plain_fd),
        )
        ae._servers.append(self._server)  # so that server.shutdown() can deregister it
        threading.Thread(
            target=self._server.serve_forever, name="fiona-acceptor", daemon=True
        ).start()
        log.info(
            "listening",
            pid=os.getpid(),
            worker=self.worker,
            ae_title=config.node.ae_title,
            host=config.node.host,
            port=self._server.server_address[1],
            tls_port=config.node.tls.port if config.node.tls is not None else None,
            storage=str(services.spool.root),
        )
        web = config.web
        if not self.worker and web is not None and web.enabled:
            from fiona.web import WebContext, create_app
            from fiona.web.server import WebServer

            context = WebContext(
                config,
                services.session_factory,
                services.node_key,
                scp_bound=lambda: not self._stopped.is_set(),
                ingestor=services.ingestor,
            )
            self._web = WebServer(create_app(context), web.host, web.port)
            self._web.start()  # a busy port is logged; receiving DICOM goes on regardless

    def _start_primary_duties(self, services: NodeServices) -> None:
        """Audit the configuration, reconcile the spool, start the stability sweeper."""
        config = self.config
        services.writer.add(
            [
                audit_event(
                    AuditEventType.CONFIGURATION_LOADED,
                    actor="fiona",
                    occurred_at=self.clock(),
                    source=str(config.source),
                    sha256=_config_digest(config),
                    profiles=_profile_digests(config),
                )
            ]
        ).result()
        self._log_audit_head()
        reconcile(services.session_factory, services.spool, services.writer, self.clock())
        self.set_rules(self.rules or load_routing_rules(config))
        self._sweep(route=True)
        interval = max(0.2, min(1.0, config.stable_after_seconds / 4))
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(
            self._sweep,
            "interval",
            seconds=interval,
            max_instances=1,
            coalesce=True,
            id="stability-sweep",
        )
        self._scheduler.add_job(
            self._log_audit_head, "interval", hours=1, coalesce=True, id="audit-chain-head"
        )
        self._scheduler.add_job(
            self._recover_stopped,
            "interval",
            seconds=STOPPED_FOLDERS_SECONDS,
            max_instances=1,
            coalesce=True,
            id="stopped-process-folders",
        )
        if config.routing.unassigned_retention_days is not None:
            self._scheduler.add_job(
                self._retention,
                "interval",
                hours=1,
                max_instances=1,
                coalesce=True,
                id="unassigned-retention",
                next_run_time=self.clock(),
            )
        self._scheduler.start()
        if config.destinations and self.run_forwarder:
            from fiona.forwarder.service import Forwarder

            self._forwarder = Forwarder(
                config,
                services.session_factory,
                services.spool.root,
                services.node_key,
                self.clock,
            )
            self._forwarder.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def set_rules(self, rules: RuleSet) -> None:
        """Route with *rules* from now on (start-up, SIGHUP); an audit row records them."""
        self.rules = rules
        if self.services is None:
            return
        self.services.writer.add(
            [
                audit_event(
                    AuditEventType.RULES_LOADED,
                    actor="fiona",
                    occurred_at=self.clock(),
                    source=rules.source,
                    sha256=rules.sha256,
                    rules=len(rules.rules),
                    enabled=sum(rule.enabled for rule in rules.rules),
                )
            ]
        ).result()
        log.info("routing rules loaded", source=rules.source, rules=len(rules.rules))

    def _recover_stopped(self) -> None:
        services = self.services
        if services is None:
            return
        try:
            recover_stopped_folders(services.session_factory, services.spool, self.clock())
        except Exception:
            log.exception("recovery of a stopped process's temporary folder failed")

    def _retention(self) -> None:
        services = self.services
        if services is None:
            return
        try:
            apply_retention(
                services.session_factory,
                services.spool,
                self.config,
                services.node_key,
                self.clock(),
            )
        except Exception:
            log.exception("retention of unassigned studies failed")

    def _log_audit_head(self) -> None:
        """Log the audit chain's head: an anchor outside the database (journald, syslog)."""
        if self.services is None:
            return
        try:
            with self.services.session_factory() as session:
                head = session.execute(select(AuditChainHead.seq, AuditChainHead.row_hash)).one()
            log.info(
                "audit chain head",
                seq=head.seq,
                sha256=head.row_hash,
                anchor=f"{head.seq}:{head.row_hash}",
            )
        except Exception:
            log.exception("audit chain head not readable")

    def recover_worker(self, pid: int) -> None:
        """A receiving worker died: what it had indexed but not yet renamed goes into place,
        its other temporary files and its folder go (see :mod:`fiona.scp.recovery`)."""
        services = self.services
        if services is not None:
            recover_folder_of(services.session_factory, services.spool, pid, self.clock())

    def _sweep(self, route: bool = False) -> None:
        services = self.services
        if services is None:
            return
        try:
            result = sweep(
                services.session_factory,
                services.spool,
                services.node_key,
                self.clock(),
                self.config.stable_after_seconds,
            )
            if (result.studies_stable or route or self._route_pending) and self.rules is not None:
                self._route_pending = True  # until a routing pass completes
                route_stable_studies(
                    services.session_factory,
                    self.config,
                    self.rules,
                    services.node_key,
                    self.clock(),
                )
                self._route_pending = False
            streaming = self.rules is not None and route_receiving_studies(
                services.session_factory, self.config, self.rules, services.node_key, self.clock()
            )
            if streaming and self._forwarder is not None:  # these requests stream the study
                self._forwarder.kick()
            if result.studies_stable:  # requests waiting for these studies go now
                if self._forwarder is not None:
                    self._forwarder.kick()
                if self.on_stable is not None:
                    self.on_stable()
        except Exception:
            log.exception("stability sweep failed")

    def listening_fds(self) -> tuple[int | None, int | None]:
        """The listening sockets (DICOM, DICOM TLS) for the workers to inherit."""
        return tuple(  # type: ignore[return-value]
            None if server is None else server.socket.fileno()
            for server in (self._server, self._tls_server)
        )

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, finish in-flight associations (up to `grace_seconds`), close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        for server in servers:
            server.shutdown()  # no new associations; running ones continue
        if self._web is not None:
            self._web.stop()
        deadline = time.monotonic() + grace_seconds
        # Only established associations are in flight; a connection still waiting for
        # its A-ASSOCIATE-RQ (a port probe, say) is not worth waiting acse_timeout for.
        while time.monotonic() < deadline and any(
            assoc.is_established for server in servers for assoc in server.active_associations
        ):
            time.sleep(0.05)
        for server in servers:
            for assoc in server.active_associations:
                if assoc.is_established:
                    log.warning("aborting association at shutdown: grace period over")
                abort_association(assoc)
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
        if self._forwarder is not None:
            self._forwarder.stop()
        if self.services is not None:
            if not self.worker:
                self._sweep()
            self.services.close()
        log.info("stopped")

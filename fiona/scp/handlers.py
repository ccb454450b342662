"""pynetdicom event handlers: thin, and they never raise.

Each association gets a :class:`AssociationContext` when it is accepted; C-STORE hands the
chunk-received temporary file to the :class:`~fiona.scp.ingest.Ingestor` and answers with
its status. Heavy work (routing, de-identification) happens later, off this thread.
"""

from __future__ import annotations

import os
import socket
import threading
import types
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem

from fiona.audit import Clock, audit_event
from fiona.config import FionaConfig
from fiona.db.models import Association, AuditEventType
from fiona.errors import OutOfSpaceError
from fiona.logs import get_logger
from fiona.scp.express import ExpressReceiver, pdv_items
from fiona.scp.filemeta import install as install_file_meta
from fiona.scp.ingest import Ingestor, ReceiveFacts, Status
from fiona.scp.wakeups import install as install_wakeups
from fiona.scp.wakeups import wake_on_work

__all__ = ["AssociationContext", "Rejection", "ScpHandlers"]

log = get_logger(__name__)


def _status(status: int, comment: str) -> Dataset:
    """A status with its Error Comment (PS3.7 C.4: LO, at most 64 characters)."""
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]
    return response


_P_DATA_TF = 0x04


def _decode_pdu_in_place(self: Any, bytestream: bytearray) -> tuple[Any, str]:
    """``DULServiceProvider._decode_pdu`` that keeps a P-DATA-TF's values in its buffer.

    pynetdicom 3.0.4 copies every received P-DATA-TF three times on its way to the file:
    ``bytes(bytestream)``, a slice per PDV item, and ``data[1:]`` in ``decode_msg``
    (~1.5 MB of copies and allocations per 0.5 MB instance). Here each PDV's value is a
    ``memoryview`` into the received buffer, so that ``decode_msg`` writes the fragment
    from where the socket put it. Same PDU object, same event (Evt10); a malformed item
    raises, which the PDU reader turns into Evt19 as pynetdicom's does. Other PDUs, and any
    association with a handler for the raw data or the PDU, take pynetdicom's path.
    """
    if (
        bytestream[0] != _P_DATA_TF
        or self.assoc.get_handlers(evt.EVT_DATA_RECV)
        or self.assoc.get_handlers(evt.EVT_PDU_RECV)
    ):
        return cast(tuple[Any, str], DULServiceProvider._decode_pdu(self, bytestream))
    view = memoryview(bytestream)
    items = []
    for context_id, _control, start, end in pdv_items(bytestream):  # ValueError if malformed
        item = PresentationDataValueItem()
        item.presentation_context_id = context_id
        # pynetdicom's value starts with the message control header
        item.presentation_data_value = view[start - 1 : end]  # type: ignore[assignment]
        items.append(item)
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = items
    return pdu, "Evt10"


@dataclass
class AssociationContext:
    """What FIONA knows of one accepted association."""

    facts: ReceiveFacts
    stored: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason, and why in words."""

    result: int
    source: int
    diagnostic: int
    reason: str


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip()


class ScpHandlers:
    """The event handlers of FIONA's SCP, bound to one configuration and ingestor."""

    def __init__(self, config: FionaConfig, ingestor: Ingestor, clock: Clock) -> None:
        install_wakeups()
        install_file_meta()
        self.config = config
        self.ingestor = ingestor
        self.clock = clock
        self._contexts: weakref.WeakKeyDictionary[Any, AssociationContext] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    # -- decisions (pure) ---------------------------------------------------------------

    def check_association(
        self, calling_ae_title: str, called_ae_title: str, peer_address: str
    ) -> Rejection | None:
        """Decide whether an association request may proceed."""
        node = self.config.node
        if not node.accept_any_called_ae and called_ae_title not in (
            self.config.accepted_called_ae_titles
        ):
            return Rejection(0x01, 0x01, 0x07, "called AE title not recognised")
        if (
            node.allowed_calling_ae_titles
            and calling_ae_title not in node.allowed_calling_ae_titles
        ):
            return Rejection(0x01, 0x01, 0x03, "calling AE title not allowed")
        if not node.peer_allowed(peer_address):
            return Rejection(0x01, 0x01, 0x01, "peer address not allowed")
        try:
            self.ingestor.spool.check_space()
        except OutOfSpaceError as exc:
            # Transient, service-provider (presentation), temporary congestion.
            return Rejection(0x02, 0x03, 0x01, str(exc))
        return None

    # -- event handlers ---------------------------------------------------------------

    def handle_conn_open(self, event: Any) -> None:
        """Tune the new connection for latency.

        TCP_NODELAY: with Nagle on, each C-STORE response waits ~40 ms for a delayed ACK.
        The DUL thread reads every PDU into one buffer and reads, stores and answers plain
        C-STOREs itself (:class:`~fiona.scp.express.ExpressReceiver`); P-DATA values it
        hands to pynetdicom stay in their buffer (:func:`_decode_pdu_in_place`).
        pynetdicom's polling loops
        wake when there is work instead of sleeping a fixed time (:mod:`fiona.scp.wakeups`;
        pynetdicom 3.0.4 internals, pinned).
        """
        try:
            sock = event.assoc.dul.socket.socket
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        dul = event.assoc.dul
        dul._decode_pdu = types.MethodType(_decode_pdu_in_place, dul)
        receiver = ExpressReceiver(dul, self, self.handle_store)
        receiver.install()
        dul._fiona_express = receiver
        wake_on_work(event.assoc)

    def handle_requested(self, event: Any) -> None:
        assoc = event.assoc
        try:
            primitive = assoc.requestor.primitive
            calling = _text(primitive.calling_ae_title)
            called = _text(primitive.called_ae_title)
            peer = str(assoc.requestor.address)
            rejection = self.check_association(calling, called, peer)
            if rejection is None:
                return
            assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
            assoc.kill()  # returns once the DUL has sent the A-ASSOCIATE-RJ
            self._record_rejection(
                calling,
                called,
                peer,
                rejection.reason,
                result=rejection.result,
                diagnostic=rejection.diagnostic,
            )
        except Exception:
            log.exception("association request check failed")
            assoc.abort()

    def handle_rejected(self, event: Any) -> None:
        """pynetdicom's own rejections (e.g. more than ``max_associations``)."""
        assoc = event.assoc
        try:
            primitive = assoc.requestor.primitive
            self._record_rejection(
                _text(primitive.calling_ae_title),
                _text(primitive.called_ae_title),
                str(assoc.requestor.address),
                "local limit exceeded (node.max_associations)",
            )
        except Exception:
            log.exception("cannot record rejection")

    def _record_rejection(
        self, calling: str, called: str, peer: str, reason: str, **details: Any
    ) -> None:
        """Log a rejected association and queue its audit event."""
        log.warning(
            "association rejected",
            calling_ae_title=calling,
            called_ae_title=called,
            peer_address=peer,
            reason=reason,
        )
        self.ingestor.writer.add(
            [
                audit_event(
                    AuditEventType.ASSOCIATION_REJECTED,
                    actor=f"{calling}@{peer}",
                    occurred_at=self.clock(),
                    calling_ae_title=calling,
                    called_ae_title=called,
                    peer_address=peer,
                    reason=reason,
                    **details,
                )
            ]
        )

    def handle_accepted(self, event: Any) -> None:
        assoc = event.assoc
        try:
            primitive = assoc.requestor.primitive
            facts = ReceiveFacts(
                calling_ae_title=_text(primitive.calling_ae_title),
                called_ae_title=_text(primitive.called_ae_title),
                peer_address=str(assoc.requestor.address),
                association_id=str(uuid.uuid4()),
            )
            with self._lock:
                self._contexts[assoc] = AssociationContext(facts)
            now = self.clock()
            self.ingestor.writer.add(
                [
                    Association(
                        id=facts.association_id,
                        calling_ae_title=facts.calling_ae_title,
                        called_ae_title=facts.called_ae_title,
                        peer_address=facts.peer_address,
                        started_at=now,
                        instances_stored=0,
                        instances_failed=0,
                    ),
                    audit_event(
                        AuditEventType.ASSOCIATION_ACCEPTED,
                        actor=f"{facts.calling_ae_title}@{facts.peer_address}",
                        occurred_at=now,
                        association_id=facts.association_id,
                        calling_ae_title=facts.calling_ae_title,
                        called_ae_title=facts.called_ae_title,
                        peer_address=facts.peer_address,
                    ),
                ]
            )
        except Exception:
            log.exception("cannot record association")

    def handle_conn_close(self, event: Any) -> None:
        receiver = getattr(event.assoc.dul, "_fiona_express", None)
        if receiver is not None:
            receiver.close()  # a C-STORE cut off by the close leaves no temporary file
        with self._lock:
            context = self._contexts.pop(event.assoc, None)
        if context is None:
            return
        if context.stored:
            self.ingestor.sync_folders()  # the renames of its instances, made durable
        facts = context.facts
        now = self.clock()
        outcome = (
            "released"
            if event.assoc.is_released
            else "aborted"
            if event.assoc.is_aborted
            else "closed"
        )

        def close(session: Any) -> None:
            row = session.get(Association, facts.association_id)
            if row is not None:
                row.ended_at = now
                row.instances_stored = context.stored
                row.instances_failed = context.failed
            session.add(
                audit_event(
                    AuditEventType.ASSOCIATION_ENDED,
                    actor=f"{facts.calling_ae_title}@{facts.peer_address}",
                    occurred_at=now,
                    association_id=facts.association_id,
                    outcome=outcome,
                    instances_stored=context.stored,
                    instances_failed=context.failed,
                )
            )

        self.ingestor.writer.submit(close)
        log.info(
            "association ended",
            association_id=facts.association_id,
            calling_ae_title=facts.calling_ae_title,
            called_ae_title=facts.called_ae_title,
            peer_address=facts.peer_address,
            outcome=outcome,
            instances_stored=context.stored,
            instances_failed=context.failed,
            pid=os.getpid(),  # which receiving process served it (node.workers)
        )

    def handle_echo(self, _event: Any) -> int:
        return Status.SUCCESS

    def handle_store(self, event: Any) -> Dataset | int:
        """C-STORE (PS3.4 B.2.2) through pynetdicom: see :meth:`store_file`.

        The status alone (an int) when there is nothing to explain: pynetdicom then has no
        status dataset to build and walk for every stored instance.
        """
        request = event.request
        handle = getattr(request, "_dataset_file", None)
        status, comment = self.store_file(
            event.assoc,
            _text(request.AffectedSOPInstanceUID),
            Path(event.dataset_path),
            handle.fileno() if handle is not None and not handle.closed else None,
        )
        return status if comment is None else _status(status, comment)

    def store_file(
        self,
        assoc: Any,
        sop_instance_uid: str,
        path: Path,
        fd: int | None,
        digest: tuple[str, int] | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> tuple[int, str | None]:
        """Ingest a received file; success only once its bytes are durable and indexed.

        `digest` is the file's SHA-256 (hex) and size when the receiver computed them while
        writing it; `meanwhile` runs while the store waits for its fsync and index commit.
        Returns the status and its Error Comment (None when there is nothing to explain).
        Never raises. Called by :meth:`handle_store` and by the express path.
        """
        try:
            with self._lock:
                context = self._contexts.get(assoc)
            if context is None:  # accepted before the handler could record it
                return Status.PROCESSING_FAILURE, "association not registered"
            result = self.ingestor.ingest(
                path,
                context.facts,
                fd=fd,
                expected_sop_instance_uid=sop_instance_uid,
                digest=digest,
                meanwhile=meanwhile,
            )
            with context.lock:
                if result.ok:
                    context.stored += 1
                else:
                    context.failed += 1
            return result.status, result.comment or None
        except Exception:
            log.exception("C-STORE handler failed")
            return Status.PROCESSING_FAILURE, None

    def refuse_store(self, assoc: Any, status: int, reason: str) -> tuple[int, str | None]:
        """A C-STORE whose data could not be received (the express path): audited, refused."""
        try:
            with self._lock:
                context = self._contexts.get(assoc)
            if context is None:
                return status, reason[:64]
            with context.lock:
                context.failed += 1
            result = self.ingestor.refuse(context.facts, status, reason)
            return result.status, result.comment or None
        except Exception:
            log.exception("cannot refuse C-STORE")
            return status, None

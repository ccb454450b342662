"""Ingest one received file: the single path shared by C-STORE and ``fiona import``.

``temporary file → header check → fsync → rename → index commit → status``. Every outcome
is a DICOM status (PS3.4 B.2.3, PS3.7 C) with an explanation for the sender; bytes FIONA
cannot accept are quarantined, never dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session

from fiona.audit import Clock, audit_event
from fiona.db.models import AuditEventType, Instance, QuarantinedFile
from fiona.errors import StorageError
from fiona.keys import keyed_hash
from fiona.logs import get_logger
from fiona.metrics import INSTANCES_RECEIVED
from fiona.scp.header import HeaderError, InstanceHeader, checked_header
from fiona.scp.index import IndexWriter, InstanceRecord, StoreOutcome
from fiona.scp.spool import Spool, file_digest, fsync_file, release_pages

__all__ = ["IngestResult", "Ingestor", "ReceiveFacts", "Status"]

log = get_logger(__name__)

# How long a store waits for its index commit before it answers a failure.
INDEX_TIMEOUT_SECONDS = 60.0


class Status:
    """C-STORE status codes FIONA answers with (PS3.4 Table B.2-1, PS3.7 C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC210
    PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class ReceiveFacts:
    """Who sent the bytes, over which association (or import run)."""

    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    association_id: str


@dataclass(frozen=True)
class IngestResult:
    """The DICOM status for the sender and what happened."""

    status: int
    comment: str | None = None
    outcome: StoreOutcome | None = None
    header: InstanceHeader | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


def _wait_quietly(future: Future[None]) -> None:
    """Wait for an fsync of a file not kept as it stands (the quarantine syncs again)."""
    with contextlib.suppress(OSError):
        future.result()


class Ingestor:
    """Takes received files into the spool and the index."""

    def __init__(
        self,
        spool: Spool,
        writer: IndexWriter,
        node_key: bytes,
        clock: Clock,
        *,
        release_pages: bool = False,
    ) -> None:
        self.spool = spool
        self.writer = writer
        self.node_key = node_key
        self.clock = clock
        self.release_pages = release_pages
        """Drop stored files from the page cache (fiona.scp.spool): for a node that does not
        forward them soon (no destinations); a forwarder reads them back within seconds."""
        # fsyncs of received files run here while the header is parsed and the file hashed
        # (both need only the page cache): one thread per concurrent association is plenty.
        self._syncer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fiona-fsync")

    def close(self) -> None:
        """Wait for fsyncs in flight (there are none once the associations ended)."""
        self._syncer.shutdown(wait=True)
        self.sync_folders()

    def sync_folders(self) -> None:
        """fsync the folders of renames whose fsync was put off (never raises)."""
        try:
            self.spool.sync_folders()
        except StorageError as exc:
            log.error("cannot sync spool folders", error=str(exc))

    def ingest(
        self,
        tmp_path: Path,
        facts: ReceiveFacts,
        *,
        fd: int | None = None,
        expected_sop_instance_uid: str | None = None,
        digest: tuple[str, int] | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> IngestResult:
        """Store the file at `tmp_path` (on the spool filesystem) durably and index it.

        `digest`: the file's SHA-256 (hex) and size, when the caller computed them as it
        wrote the file (otherwise the file is read back for them). `meanwhile` runs once the
        file's fsync and its index commit are under way, while this thread waits for them
        (the express path creates its next temporary file then: ~0.3 ms that would
        otherwise lengthen the cycle); its exceptions are logged, never raised.

        Never raises: every failure is an :class:`IngestResult` with a failure status.
        On success `tmp_path` no longer exists; on failure it may still exist and the
        caller deletes it (its bytes were quarantined if they were the problem).
        """
        try:
            return self._ingest(tmp_path, facts, fd, expected_sop_instance_uid, digest, meanwhile)
        except StorageError as exc:  # OutOfSpaceError included: both are 0xA700
            return self.refuse(facts, Status.OUT_OF_RESOURCES, str(exc))
        except Exception as exc:
            log.exception("store failed", association_id=facts.association_id)
            return self.refuse(
                facts, Status.PROCESSING_FAILURE, f"internal error: {type(exc).__name__}"
            )

    def _ingest(
        self,
        tmp_path: Path,
        facts: ReceiveFacts,
        fd: int | None,
        expected_sop_instance_uid: str | None,
        known_digest: tuple[str, int] | None,
        meanwhile: Callable[[], None] | None,
    ) -> IngestResult:
        # The received bytes already sit in tmp/ on the spool filesystem: the rename into
        # incoming/ needs no more space, so the floor is checked as things stand.
        self.spool.check_space()
        # The file's data goes to disk while this thread parses and hashes it (hashing in
        # another thread too was measured slower: the parse then waits for the GIL);
        # whatever happens next, this function returns only after that fsync finished.
        synced = (
            self._syncer.submit(fsync_file, tmp_path)
            if fd is None
            else self._syncer.submit(os.fsync, fd)
        )
        try:
            try:
                header = checked_header(tmp_path)
                if (
                    expected_sop_instance_uid is not None
                    and expected_sop_instance_uid != header.sop_instance_uid
                ):
                    raise HeaderError("SOPInstanceUID differs from the C-STORE request")
            except HeaderError as exc:
                _wait_quietly(synced)
                return self._quarantine(tmp_path, facts, str(exc), expected_sop_instance_uid)
            digest, size = known_digest or file_digest(tmp_path)
        except BaseException:
            _wait_quietly(synced)
            raise
        # A file whose digest came with it is not read again here: once synced, its pages
        # may leave the page cache (fiona.scp.spool). One read back for its digest is left.
        release = fd if self.release_pages and known_digest is not None else None
        return self._place(tmp_path, facts, header, digest, size, synced, meanwhile, release)

    def _place(
        self,
        tmp_path: Path,
        facts: ReceiveFacts,
        header: InstanceHeader,
        digest: str,
        size: int,
        synced: Future[None],
        meanwhile: Callable[[], None] | None,
        release: int | None = None,
    ) -> IngestResult:
        """Index the file and, once its fsync is done, rename it into place (both must work).

        `release`: the file's descriptor, if its pages are to leave the page cache once it
        is synced (after the header check, which read them).
        """
        final = self.spool.instance_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        # The index commit (a WAL fsync) runs in the writer thread while the file's data
        # is synced and it is renamed into place: success waits for both. A crash between the two
        # leaves a row without a file or a file without a row; restart reconciliation
        # repairs either, and the sender, never acknowledged, sends again.
        record = InstanceRecord(
            header=header,
            calling_ae_title=facts.calling_ae_title,
            called_ae_title=facts.called_ae_title,
            peer_address=facts.peer_address,
            association_id=facts.association_id,
            received_at=self.clock(),
            size_bytes=size,
            digest=digest,
            path=self.spool.relative(final),
        )
        pending = self.writer.index_instance(record)
        if meanwhile is not None:
            try:
                meanwhile()
            except Exception:
                log.exception("work beside a store failed")
        try:
            try:
                synced.result()
            except OSError as exc:
                raise self.spool.storage_error(exc) from exc
            if release is not None:
                release_pages(release)
            # The folder's fsync may wait: once the row (with the digest) is committed, a rename
            # lost to a power failure is redone from tmp/ at restart (see fiona.scp.spool).
            self.spool.commit_file(tmp_path, final, synced=True, defer_folder_sync=True)
        except StorageError:
            self._undo_index(pending, header.sop_instance_uid)
            raise
        try:
            outcome = pending.result(timeout=INDEX_TIMEOUT_SECONDS)
        except Exception as exc:  # noqa: BLE001 - the file stays; restart reconciliation indexes it
            log.error(
                "index commit failed; file kept for reconciliation",
                association_id=facts.association_id,
                error=type(exc).__name__,
            )
            return IngestResult(Status.PROCESSING_FAILURE, "index unavailable, retry later")
        if logging.getLogger(__name__).isEnabledFor(logging.DEBUG):
            log.debug(
                "instance stored",
                association_id=facts.association_id,
                outcome=outcome.value,
                study_key=keyed_hash(self.node_key, header.study_instance_uid),
                size_bytes=size,
            )
        INSTANCES_RECEIVED.labels(outcome.value.lower()).inc()
        return IngestResult(Status.SUCCESS, None, outcome, header)

    def _undo_index(self, pending: Future[StoreOutcome], sop_instance_uid: str) -> None:
        """The file could not be placed: flag a row that now points at nothing."""
        try:
            outcome = pending.result(timeout=INDEX_TIMEOUT_SECONDS)
        except Exception:  # noqa: BLE001 - nothing was indexed, nothing to undo
            return
        if outcome is StoreOutcome.DUPLICATE:
            return  # the earlier, identical file is still in place

        def flag(session: Session) -> None:
            session.execute(
                update(Instance)
                .where(Instance.sop_instance_uid == sop_instance_uid)
                .values(file_missing=True)
            )

        self.writer.submit(flag).result(timeout=INDEX_TIMEOUT_SECONDS)

    def _quarantine(
        self,
        tmp_path: Path,
        facts: ReceiveFacts,
        reason: str,
        sop_instance_uid: str | None,
    ) -> IngestResult:
        now = self.clock()
        digest, size = file_digest(tmp_path)
        target = self.spool.quarantine_file(
            tmp_path,
            reason,
            now,
            {
                "calling_ae_title": facts.calling_ae_title,
                "called_ae_title": facts.called_ae_title,
                "peer_address": facts.peer_address,
                "association_id": facts.association_id,
                "status": f"0x{Status.CANNOT_UNDERSTAND:04X}",
            },
        )
        row = QuarantinedFile(
            quarantined_at=now,
            path=self.spool.relative(target),
            reason=reason,
            status_code=Status.CANNOT_UNDERSTAND,
            calling_ae_title=facts.calling_ae_title,
            called_ae_title=facts.called_ae_title,
            peer_address=facts.peer_address,
            association_id=facts.association_id,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=None,
            size_bytes=size,
            digest=digest,
        )
        event = audit_event(
            AuditEventType.INSTANCE_QUARANTINED,
            actor=facts.calling_ae_title,
            occurred_at=now,
            association_id=facts.association_id,
            peer_address=facts.peer_address,
            reason=reason,
            path=self.spool.relative(target),
        )
        self.writer.add([row, event]).result(timeout=INDEX_TIMEOUT_SECONDS)
        log.warning(
            "instance quarantined",
            association_id=facts.association_id,
            reason=reason,
            path=self.spool.relative(target),
        )
        INSTANCES_RECEIVED.labels("quarantined").inc()
        return IngestResult(Status.CANNOT_UNDERSTAND, f"quarantined: {reason}"[:64])

    def refuse(self, facts: ReceiveFacts, status: int, reason: str) -> IngestResult:
        """Answer a store that cannot be taken with `status`, and audit it (never raises)."""
        INSTANCES_RECEIVED.labels("refused").inc()
        log.warning(
            "store refused",
            association_id=facts.association_id,
            status=f"0x{status:04X}",
            reason=reason,
        )
        try:
            self.writer.add(
                [
                    audit_event(
                        AuditEventType.STORE_REFUSED,
                        actor=facts.calling_ae_title,
                        occurred_at=self.clock(),
                        association_id=facts.association_id,
                        peer_address=facts.peer_address,
                        status=status,
                        reason=reason,
                    )
                ]
            ).result(timeout=INDEX_TIMEOUT_SECONDS)
        except Exception:
            log.exception("cannot record refusal")
        return IngestResult(status, reason[:64])

"""Senders: put de-identified instances into a destination and classify what happened.

``DicomSender`` C-STOREs one batch (one series of one request) per association. Presentation
contexts come from the batch's actual (SOP class, transfer syntax) pairs: the stored transfer
syntax plus Explicit VR Little Endian as a fallback, at most 128 contexts per association
(larger batches are split). An instance is sent in its stored encoding when that context was
accepted; an uncompressed instance is re-encoded by pynetdicom when only another uncompressed
syntax was accepted; a compressed one for which the destination accepted only Explicit VR Little
Endian is decompressed by pydicom's pixel data handlers (the ``decoders`` extra: pylibjpeg with
OpenJPEG and RLE, Pillow) — the only time FIONA decodes pixel data; without a decoder for it,
or if the destination accepts neither, it is a permanent failure naming both syntaxes.

``DicomWebSender`` POSTs one batch per STOW-RS request (``multipart/related;
type="application/dicom"``) and reads the response's Failed SOP Sequence (0008,1198) with each
instance's Failure Reason, and Warning Reasons in the Referenced SOP Sequence (0008,1199).

``FolderSender`` writes ``<path>/<project>/<Study>/<Series>/<SOP>.dcm`` atomically (temporary
file, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fiona.config import DicomDestination, DicomWebDestination, FolderDestination
from fiona.forwarder.classify import Kind, Outcome, classify_status, transport_failure
from fiona.forwarder.ledger import WorkItem
from fiona.scu import set_nodelay

__all__ = ["DicomSender", "DicomWebSender", "FolderSender", "Prepared", "Sender"]

MAX_CONTEXTS = 127
"""128 per association, one of them Verification: with it the association stands even when the
destination accepts none of the storage contexts, so each instance gets its own, permanent,
"no presentation context" outcome instead of a retried abort."""
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}

Prepared = tuple[WorkItem, Path]
"""A claimed item with its de-identified file (see :mod:`fiona.forwarder.prepared`)."""


class Sender(Protocol):
    """What the forwarder needs from a destination."""

    def send(self, batch: Sequence[Prepared]) -> list[tuple[WorkItem, Outcome]]: ...

    def probe(self) -> tuple[bool, str]: ...


def _contexts(batch: Sequence[Prepared]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for item, _data in batch:
        for syntax in (item.transfer_syntax_uid, ExplicitVRLittleEndian):
            pair = (item.sop_class_uid, syntax)
            if pair not in pairs:
                pairs.append(pair)
    return pairs


def split_for_contexts(batch: Sequence[Prepared]) -> list[list[Prepared]]:
    """Split a batch so that no association needs more than 128 presentation contexts."""
    groups: list[list[Prepared]] = []
    current: list[Prepared] = []
    for prepared in batch:
        if len(_contexts([*current, prepared])) > MAX_CONTEXTS:
            groups.append(current)
            current = []
        current.append(prepared)
    if current:
        groups.append(current)
    return groups


def _scu_only(event: evt.Event) -> None:
    """EVT_CONN_OPEN: Nagle off, and the association's reactor never takes a DIMSE message.

    pynetdicom's association reactor polls the DIMSE queue (``get_msg(block=False)``) to
    serve incoming requests, and ``send_c_store`` pauses it around each request. The pause
    has a window (the reactor passes ``_reactor_checkpoint.wait()`` just before the sender
    clears it, and is descheduled before it marks itself unpaused): then the reactor takes
    the C-STORE response, logs "Received unexpected C-STORE service message" and drops it,
    and the sender waits for the DIMSE timeout. Seen once in ~15,000 C-STOREs under CPU
    load (pynetdicom 3.0.4). FIONA's SCU associations never serve requests, so here the
    reactor's non-blocking poll finds nothing; responses are left for the caller, which
    waits for them with ``get_msg(block=True)``.
    """
    set_nodelay(event)
    dimse = event.assoc.dimse
    blocking_get = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block:
            return None, None
        return blocking_get(block=True)

    dimse.get_msg = get_msg  # type: ignore[method-assign]  # pynetdicom internals, pinned


def associate(ae: AE, destination: DicomDestination, contexts: list[Any] | None = None) -> Any:
    """Open an association to *destination* (TLS when configured), Nagle off."""
    tls_args = None
    if destination.tls is not None:
        from fiona.tls import client_context

        tls_args = client_context(destination.tls, destination.host)
    return ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        contexts=contexts,
        evt_handlers=[(evt.EVT_CONN_OPEN, _scu_only)],
        tls_args=tls_args,
    )


class DicomSender:
    """C-STORE SCU for one DICOM destination."""

    def __init__(self, name: str, destination: DicomDestination, calling_ae_title: str) -> None:
        self.name = name
        self.destination = destination
        self.calling_ae_title = destination.calling_ae_title or calling_ae_title

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae_title)
        timeout = self.destination.timeout
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = min(timeout, 30.0)
        return ae

    def probe(self) -> tuple[bool, str]:
        """C-ECHO the destination."""
        ae = self._ae()
        ae.add_requested_context(Verification)
        assoc = associate(ae, self.destination)
        if not assoc.is_established:
            return False, self._not_established(assoc).reason
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        return code == 0x0000, f"C-ECHO status {code!r}"

    def _not_established(self, assoc: object) -> Outcome:
        dest = self.destination
        where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        if getattr(assoc, "is_rejected", False):
            primitive = getattr(getattr(assoc, "acceptor", None), "primitive", None)
            result = getattr(primitive, "result", None)
            reason = getattr(primitive, "reason_str", "") or ""
            if result == 0x01:
                return transport_failure(
                    "rejected-permanent",
                    f"association rejected (permanent) by {where}: {reason}",
                    permanent=True,
                )
            return transport_failure(
                "rejected-transient", f"association rejected (transient) by {where}: {reason}"
            )
        answered = getattr(getattr(assoc, "acceptor", None), "primitive", None) is not None
        if answered and getattr(assoc, "is_aborted", False):
            return transport_failure(
                "aborted", f"association aborted by {where} (no presentation context accepted?)"
            )
        return transport_failure("unreachable", f"no association with {where} (refused/timeout)")

    def send(self, batch: Sequence[Prepared]) -> list[tuple[WorkItem, Outcome]]:
        results: list[tuple[WorkItem, Outcome]] = []
        for group in split_for_contexts(batch):
            results.extend(self._send_group(group))
        return results

    def _send_group(self, group: Sequence[Prepared]) -> list[tuple[WorkItem, Outcome]]:
        ae = self._ae()
        contexts = [build_context(sop, [syntax]) for sop, syntax in _contexts(group)]
        contexts.append(build_context(Verification))
        assoc = associate(ae, self.destination, contexts)
        if not assoc.is_established:
            failure = self._not_established(assoc)
            return [(item, failure) for item, _data in group]
        results: list[tuple[WorkItem, Outcome]] = []
        try:
            accepted = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
            # Result 0x03: the SOP class itself is not supported (0x04: only the syntaxes).
            unsupported = {
                str(cx.abstract_syntax) for cx in assoc.rejected_contexts if cx.result == 0x03
            }
            for index, (item, path) in enumerate(group):
                if not assoc.is_established:
                    lost = transport_failure("aborted", "association ended during the batch")
                    results.extend((rest, lost) for rest, _d in group[index:])
                    break
                results.append((item, self._store(assoc, accepted, unsupported, item, path)))
        finally:
            if assoc.is_established:
                assoc.release()
        return results

    def _store(
        self,
        assoc: object,
        accepted: set[tuple[str, str]],
        unsupported: set[str],
        item: WorkItem,
        path: Path,
    ) -> Outcome:
        sop, syntax = item.sop_class_uid, item.transfer_syntax_uid
        if (sop, syntax) in accepted:
            payload: object = path  # streamed from the file as it is (chunked send)
        elif syntax in _UNCOMPRESSED and any(s == sop and t in _UNCOMPRESSED for s, t in accepted):
            # pynetdicom re-encodes an uncompressed dataset for another uncompressed syntax.
            payload = dcmread(path)
        elif (sop, ExplicitVRLittleEndian) in accepted:
            try:
                payload = _decompressed(path)
            except Exception as exc:  # noqa: BLE001 - pydicom raises several types for "no decoder"
                return transport_failure(
                    "no-decoder",
                    f"{self.destination.ae_title} accepts only Explicit VR Little Endian for "
                    f"{UID(sop).name} and {UID(syntax).name} cannot be decompressed here "
                    f"({type(exc).__name__}; install fiona[decoders])",
                    permanent=True,
                )
        else:
            offered = UID(syntax).name
            if sop in unsupported:
                reason = f"{self.destination.ae_title} does not accept {UID(sop).name}"
            else:
                reason = (
                    f"{self.destination.ae_title} accepts neither {offered} nor Explicit VR "
                    f"Little Endian for {UID(sop).name}"
                )
            return transport_failure("no-context", reason, permanent=True)
        try:
            status = assoc.send_c_store(payload)  # type: ignore[attr-defined]
        except (RuntimeError, ValueError, OSError) as exc:
            return transport_failure(
                "send-error", f"C-STORE could not be sent: {type(exc).__name__}"
            )
        code = getattr(status, "Status", None)
        return classify_status(code if isinstance(code, int) else None)


def _decompressed(path: Path) -> object:
    """The dataset with its pixel data decoded to Explicit VR Little Endian."""
    dataset = dcmread(path)
    dataset.decompress()
    return dataset


_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


def _stow_reasons(payload: object, sequence: str, reason_tag: str) -> dict[str, int | None]:
    """SOP Instance UID → reason code from one sequence of a STOW-RS JSON response."""
    found: dict[str, int | None] = {}
    if not isinstance(payload, dict):
        return found
    items = (
        payload.get(sequence, {}).get("Value", [])
        if isinstance(payload.get(sequence), dict)
        else []
    )
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        uids = item.get(_REFERENCED_SOP_INSTANCE, {}).get("Value", [])
        reasons = item.get(reason_tag, {}).get("Value", []) if reason_tag in item else []
        if uids:
            reason = reasons[0] if reasons and isinstance(reasons[0], int) else None
            found[str(uids[0])] = reason
    return found


class DicomWebSender:
    """STOW-RS client for one DICOMweb destination."""

    def __init__(self, name: str, destination: DicomWebDestination) -> None:
        import requests

        self.name = name
        self.destination = destination
        self.session = requests.Session()
        if destination.username is not None and destination.password_file is not None:
            password = destination.password_file.read_text(encoding="utf-8").strip()
            self.session.auth = (destination.username, password)
        if destination.ca_file is not None:
            self.session.verify = str(destination.ca_file)

    def probe(self) -> tuple[bool, str]:
        import requests

        try:
            response = self.session.get(
                f"{self.destination.url}/studies", params={"limit": "1"},
                timeout=min(self.destination.timeout, 30.0),
            )  # fmt: skip
        except requests.RequestException as exc:
            return False, f"{self.destination.url}: {type(exc).__name__}"
        return response.status_code < 500, f"QIDO-RS answered HTTP {response.status_code}"

    def send(self, batch: Sequence[Prepared]) -> list[tuple[WorkItem, Outcome]]:
        import uuid

        import requests

        boundary = uuid.uuid4().hex
        parts = []
        for _item, path in batch:
            parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            parts.append(path.read_bytes())
            parts.append(b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        url = f"{self.destination.url}/studies"
        try:
            response = self.session.post(
                url,
                data=b"".join(parts),
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; '
                    f"boundary={boundary}",
                    "Accept": "application/dicom+json",
                },
                timeout=self.destination.timeout,
            )
        except requests.RequestException as exc:
            failure = transport_failure("unreachable", f"STOW-RS to {url}: {type(exc).__name__}")
            return [(item, failure) for item, _data in batch]
        code = response.status_code
        if code >= 500 or code == 429:
            failure = transport_failure("http-transient", f"STOW-RS answered HTTP {code}")
            return [(item, failure) for item, _data in batch]
        if code not in (200, 202, 409):
            failure = transport_failure(
                "http-refused", f"STOW-RS answered HTTP {code}: {response.text[:200]}",
                permanent=True,
            )  # fmt: skip
            return [(item, failure) for item, _data in batch]
        try:
            payload = response.json() if response.content else {}
        except ValueError:
            payload = {}
        if isinstance(payload, list) and payload:
            payload = payload[0]
        failed = _stow_reasons(payload, _FAILED_SOP_SEQUENCE, _FAILURE_REASON)
        warned = _stow_reasons(payload, _REFERENCED_SOP_SEQUENCE, _WARNING_REASON)
        results = []
        for item, _data in batch:
            uid = item.new_sop_instance_uid
            if uid in failed:
                reason = failed[uid]
                outcome = classify_status(reason if reason is not None else 0xC000)
            elif code == 409 and uid not in warned:
                outcome = transport_failure(
                    "http-conflict", "STOW-RS answered HTTP 409 without naming this instance",
                    permanent=True,
                )  # fmt: skip
            elif warned.get(uid):
                outcome = classify_status(warned[uid])
                if not outcome.kind.delivered:
                    outcome = Outcome(Kind.WARNING, "warning", outcome.reason, outcome.status)
            else:
                outcome = Outcome(Kind.SUCCESS, "success", f"stored (HTTP {code})", 0)
            results.append((item, outcome))
        return results


class FolderSender:
    """Writes de-identified files into a folder tree, durably."""

    def __init__(self, name: str, destination: FolderDestination) -> None:
        self.name = name
        self.root = destination.path

    def probe(self) -> tuple[bool, str]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            ok = os.access(self.root, os.W_OK)
        except OSError as exc:
            return False, f"{self.root}: {exc.strerror}"
        return ok, f"{self.root} writable" if ok else f"{self.root} not writable"

    def send(self, batch: Sequence[Prepared]) -> list[tuple[WorkItem, Outcome]]:
        results = []
        for item, path in batch:
            target = (
                self.root
                / item.project
                / item.new_study_instance_uid
                / item.new_series_instance_uid
                / f"{item.new_sop_instance_uid}.dcm"
            )
            try:
                _write_durably(target, path.read_bytes())
            except OSError as exc:
                results.append(
                    (
                        item,
                        transport_failure("write-error", f"cannot write {target}: {exc.strerror}"),
                    )
                )
            else:
                results.append((item, Outcome(Kind.SUCCESS, "written", f"written to {target}", 0)))
        return results


def _write_durably(target: Path, data: bytes) -> None:
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fiona-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


SenderFactory = Callable[[str], Sender]

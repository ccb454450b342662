"""Express receive: a plain C-STORE read, stored and answered by the association's DUL thread.

pynetdicom 3.0.4 hands every received P-DATA-TF PDU through four layers and two threads
before FIONA sees the instance: the DUL thread reads the PDU and queues an event, its state
machine turns the PDU into a primitive, the DIMSE provider appends the fragment to the
message's temporary file; the complete message is converted into a C-STORE primitive and
queued, the association thread wakes, finds the service class and calls FIONA's handler,
whose answer is converted back into a primitive and queued for the DUL thread to encode and
send. For one 0.5 MB CT instance that is ~1.5 ms of interpreter time and three thread
hand-offs on a strict request-and-response path.

:class:`ExpressReceiver` takes the place of ``DULServiceProvider._read_pdu_data`` for one
FIONA SCP association. It reads PDUs the same way and, for a plain C-STORE request, does the
work of those layers itself, in the DUL thread:

- the command (one PDV, implicit VR little endian) is decoded by :func:`decode_c_store`
  and checked as pynetdicom checks it (an accepted presentation context, valid UIDs);
- the temporary file gets the same preamble and File Meta Information as pynetdicom writes
  (:func:`~fiona.scp.filemeta.encode_file_meta`), then every data fragment as it arrives,
  hashed (SHA-256) on the way so that the store need not read the file back;
- the complete instance goes to the same store function as FIONA's ``EVT_C_STORE``
  handler, and its status goes back as the C-STORE-RSP pynetdicom would send (same bytes,
  :func:`encode_c_store_rsp`).

Everything else is handed to pynetdicom unchanged, PDU by PDU: associations that are not
established, other PDUs (release, abort), other DIMSE messages (C-ECHO, anything FIONA does
not serve), a command split over several PDVs, a command pynetdicom would refuse, and every
association with a handler for an event the express path does not raise (received or sent
PDUs and raw data, DIMSE messages, state machine transitions) or a different C-STORE handler.

Failures keep pynetdicom's outcomes: unreadable PDUs end the association (Evt19), a closed
connection is Evt17. Where pynetdicom's path would end the association without an answer,
this answers instead: a temporary file that cannot be written (a full disk) is answered
0xA700 with the reason, and the rest of that instance is read and dropped. A message cut off
by an abort or a closed connection leaves no temporary file behind
(:meth:`ExpressReceiver.close`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.uid import UID
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)

from fiona.logs import get_logger
from fiona.scp.cstore import decode_c_store, encode_c_store_rsp
from fiona.scp.filemeta import ReceivedFile, encode_file_meta

__all__ = ["ExpressReceiver", "StoreSink", "pdv_items", "receive"]

log = get_logger(__name__)

_P_DATA_TF = 0x04
_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, control header
_COMMAND = 0x01
_LAST = 0x02
_PREAMBLE = b"\x00" * 128 + b"DICM"
_OUT_OF_RESOURCES = 0xA700

# Handlers for these want objects the express path never builds: pynetdicom's path then.
_OBSERVED_EVENTS = (
    evt.EVT_DATA_RECV,
    evt.EVT_PDU_RECV,
    evt.EVT_PDU_SENT,
    evt.EVT_DIMSE_RECV,
    evt.EVT_DIMSE_SENT,
    evt.EVT_FSM_TRANSITION,
)


class StoreSink(Protocol):
    """Where a received instance goes: what FIONA's ``EVT_C_STORE`` handler does."""

    def store_file(
        self,
        assoc: Any,
        sop_instance_uid: str,
        path: Path,
        fd: int | None,
        digest: tuple[str, int] | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> tuple[int, str | None]:
        """Ingest the file at `path` (its SHA-256 and size if known), running `meanwhile`
        while the store waits for the disk; (status, comment)."""

    def refuse_store(self, assoc: Any, status: int, reason: str) -> tuple[int, str | None]:
        """Record a store that could not be received; (status, Error Comment)."""


@dataclass
class _Message:
    """The C-STORE request being received."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    file: ReceivedFile | None
    digest: Any = field(default_factory=hashlib.sha256)
    """SHA-256 of the file as written, so that the store need not read it back."""
    size: int = 0
    failure: str | None = None


def pdv_items(pdu: bytes | bytearray) -> list[tuple[int, int, int, int]]:
    """(presentation context ID, message control header, value start, value end) of each
    PDV item of a P-DATA-TF PDU (PS3.8 9.3.5); the value starts after the control header.

    Raises ValueError for an item cut short or with an impossible length.
    """
    items = []
    position, end = 6, len(pdu)
    while position < end:
        if position + 6 > end:
            raise ValueError("truncated presentation data value item")
        length, context_id, control = _PDV_HEADER.unpack_from(pdu, position)
        if length < 2 or position + 4 + length > end:
            raise ValueError("invalid presentation data value item length")
        items.append((context_id, control, position + 6, position + 4 + length))
        position += 4 + length
    return items


_PREALLOCATE_BYTES = 8 << 20
"""Reads up to this length go into a buffer of their size at once; longer ones (a PDU longer
than any maximum FIONA negotiates) grow as their bytes arrive, so that a length field alone
cannot make FIONA allocate gigabytes."""


def receive(sock: Any, count: int, start: bytes = b"") -> bytearray:
    """`start` and then the next `count` bytes from `sock`, read with ``recv_into`` into one
    buffer: fewer bytes if the peer closed first. Socket errors and timeouts propagate."""
    data = bytearray(len(start) + min(count, _PREALLOCATE_BYTES))
    data[: len(start)] = start
    received = len(start)
    wanted = len(start) + count
    while True:
        with memoryview(data) as view:
            while received < len(data):
                got = sock.recv_into(view[received:])
                if not got:
                    break
                received += got
        if received < len(data):  # the peer closed
            del data[received:]
            return data
        if received == wanted:
            return data
        data.extend(bytes(min(wanted - received, _PREALLOCATE_BYTES)))


def _valid_uid(value: str) -> bool:
    valid, _reason = _config.VALIDATORS["UI"](UID(value))
    return bool(valid)


class ExpressReceiver:
    """Reads one SCP association's PDUs; serves plain C-STOREs itself (module docstring).

    Parameters
    ----------
    dul : pynetdicom.dul.DULServiceProvider
        The association's DUL, before its thread starts (``EVT_CONN_OPEN``).
    sink : StoreSink
        Stores the received files.
    handler : callable
        The ``EVT_C_STORE`` handler the express path stands in for; while another is bound,
        C-STOREs take pynetdicom's path.
    """

    def __init__(self, dul: Any, sink: StoreSink, handler: Any) -> None:
        self.dul = dul
        self.assoc = dul.assoc
        self._sink = sink
        self._handler = handler
        self._message: _Message | None = None
        self._spare: ReceivedFile | None = None
        """The next message's temporary file, created while the last store waited."""
        self._lock = threading.Lock()  # the files: the DUL thread vs close()
        self._closed = False  # close() was called: the connection is closed
        self.served = 0
        """C-STORE requests answered by the express path."""

    def install(self) -> None:
        """Read this association's PDUs from now on (call before the DUL thread starts)."""
        self.dul._read_pdu_data = self.read_pdu_data

    # -- the DUL thread --------------------------------------------------------------------

    def read_pdu_data(self) -> None:
        """``DULServiceProvider._read_pdu_data``: one PDU, or a C-STORE's PDUs while they flow."""
        dul = self.dul
        while True:
            pdu = self._read_pdu()
            if pdu is None:
                self._drop_message()
                return
            if pdu[0] != _P_DATA_TF:
                self._drop_message()  # a release or abort request cuts off a message
                self._to_pynetdicom(pdu)
                return
            if not self._take(pdu):
                self._to_pynetdicom(pdu)
                return
            # More of the same message already waiting: read it now, not a reactor loop later.
            if self._message is None or not dul.socket.ready:
                return

    def _read_pdu(self) -> bytearray | None:
        """The next PDU, as pynetdicom reads it; None once the event for a failure is queued."""
        dul = self.dul
        try:
            sock = dul.socket.socket
            header = receive(sock, 6)
            if len(header) < 6:
                dul.event_queue.put("Evt17")  # connection closed before the PDU was received
                return None
            pdu_type, _, length = _PDU_HEADER.unpack(header)
            if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
                log.warning("unknown PDU type received", pdu_type=pdu_type)
                dul.event_queue.put("Evt19")
                return None
            pdu = receive(sock, length, bytes(header))
        except (OSError, TimeoutError, AttributeError):  # AttributeError: socket closed
            dul.event_queue.put("Evt17")
            return None
        if len(pdu) != 6 + length:
            log.warning("connection closed inside a PDU", received=len(pdu), expected=6 + length)
            dul.event_queue.put("Evt17")
            return None
        return pdu

    def _to_pynetdicom(self, pdu: bytearray) -> None:
        """The rest of ``DULServiceProvider._read_pdu_data``: decode, queue the event."""
        dul = self.dul
        try:
            decoded, event = dul._decode_pdu(pdu)
        except Exception:  # noqa: BLE001 - an unreadable PDU ends the association (Evt19)
            log.warning("unable to decode a received PDU")
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(decoded)

    def _may_start(self) -> bool:
        """Whether a new message may take the express path (see the module docstring)."""
        assoc = self.assoc
        if (
            not assoc.is_established
            or assoc._sent_release
            or self.dul.state_machine.current_state != "Sta6"
            or assoc.dimse.message is not None  # pynetdicom is assembling a message
            or not _config.STORE_RECV_CHUNKED_DATASET
        ):
            return False
        if any(assoc.get_handlers(event) for event in _OBSERVED_EVENTS):
            return False
        bound = assoc.get_handlers(evt.EVT_C_STORE)  # (handler, args), or [] when unbound
        return bool(bound) and bool(bound[0] == self._handler)

    def _take(self, pdu: bytearray) -> bool:
        """Store a P-DATA-TF PDU's fragments if it belongs on the express path."""
        try:
            items: list[tuple[int, int, int, int]] | None = pdv_items(pdu) or None
        except ValueError:
            items = None  # pynetdicom's decoder refuses it too (Evt19)
        message = self._message
        if message is None:
            if items is None or not self._may_start():
                return False
            context_id, control, start, end = items[0]
            rest = items[1:]
            if control & 0x03 != _COMMAND | _LAST or any(item[1] & _COMMAND for item in rest):
                return False  # a command in fragments, or a second message in the PDU
            if any(item[1] & _LAST for item in rest[:-1]):
                return False
            message = self._begin(context_id, bytes(pdu[start:end]))
            if message is None:
                return False
            with self._lock:
                self._message = message
        else:
            if self.dul.state_machine.current_state != "Sta6":  # aborted meanwhile
                self._drop_message()
                return False
            rest = items or []
            if (
                items is None
                or any(item[1] & _COMMAND for item in rest)
                or any(item[1] & _LAST for item in rest[:-1])
            ):
                # pynetdicom would end the association: a PDU it cannot decode, or a command
                # inside a data set.
                log.warning("invalid P-DATA-TF inside a C-STORE data set")
                self._drop_message()
                self.dul.event_queue.put("Evt19")
                return True
        if rest:
            self._write(message, pdu, rest)
            if rest[-1][1] & _LAST:
                self._finish(message)
        return True

    def _begin(self, context_id: int, command: bytes) -> _Message | None:
        """The message a C-STORE-RQ command starts, its file begun; None: pynetdicom's path."""
        decoded = decode_c_store(command)
        if decoded is None or not decoded[0]:
            return None
        values = decoded[1]
        message_id = values.get("MessageID")
        sop_class_uid = values.get("AffectedSOPClassUID")
        sop_instance_uid = values.get("AffectedSOPInstanceUID")
        context = self.assoc._accepted_cx.get(context_id)
        if (
            message_id is None
            or sop_class_uid is None
            or sop_instance_uid is None
            or context is None
            or not _valid_uid(sop_class_uid)
            or not _valid_uid(sop_instance_uid)
        ):
            return None
        try:
            meta = encode_file_meta(
                sop_class_uid,
                sop_instance_uid,
                str(context.transfer_syntax[0]),
                PYNETDICOM_IMPLEMENTATION_UID,
                PYNETDICOM_IMPLEMENTATION_VERSION,
            )
        except UnicodeEncodeError:
            return None
        message = _Message(context_id, message_id, sop_class_uid, sop_instance_uid, None)
        start = _PREAMBLE + meta
        try:
            message.file = self._new_file()
            message.file.write(start)
        except OSError as exc:
            self._fail(message, exc)
        message.digest.update(start)
        message.size = len(start)
        return message

    def _new_file(self) -> ReceivedFile:
        """A new temporary file in the spool's ``tmp/``: the spare, if there is one."""
        folder = tempfile.gettempdir()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and str(Path(spare.name).parent) == folder:
            return spare
        if spare is not None:
            self._remove(spare)
        return ReceivedFile(folder)

    def _prepare_spare(self) -> None:
        """Create the next temporary file now. Creating one costs ~0.3 ms on some disks:
        done while the store waits for its fsync and index commit, it lengthens nothing
        (in a thread of its own, or after the answer, it slowed the cycle by 9-15%)."""
        try:
            spare = ReceivedFile(tempfile.gettempdir())
        except OSError:
            return  # the next message creates its own (and answers if that fails)
        with self._lock:
            if self._spare is None and not self._closed:
                self._spare = spare
                return
        self._remove(spare)

    def _write(
        self, message: _Message, pdu: bytearray, items: list[tuple[int, int, int, int]]
    ) -> None:
        with self._lock:
            if message.failure is not None or message.file is None or message.file.closed:
                return
            try:
                with memoryview(pdu) as view:
                    for _context, _control, start, end in items:
                        fragment = view[start:end]
                        message.file.write(fragment)
                        message.digest.update(fragment)  # without the GIL, as the peer sends
                        message.size += end - start
                message.file.flush()
            except (OSError, ValueError) as exc:  # ValueError: closed by close()
                self._fail(message, exc)

    def _fail(self, message: _Message, exc: Exception) -> None:
        """The temporary file cannot be written: drop it, answer the failure at the end."""
        message.failure = f"cannot write received data: {getattr(exc, 'strerror', None) or exc}"
        log.error("cannot write a received instance", error=type(exc).__name__)
        self._close_file(message)

    def _finish(self, message: _Message) -> None:
        """The instance is complete: store it, answer, forget it."""
        with self._lock:
            if self._message is not message:  # dropped meanwhile (connection closed)
                return
            self._message = None
        dul = self.dul
        dul._idle_timer.restart()
        file = message.file
        if message.failure is not None or file is None or file.closed:
            status, comment = self._sink.refuse_store(
                self.assoc, _OUT_OF_RESOURCES, message.failure or "data set not received"
            )
        else:
            status, comment = self._sink.store_file(
                self.assoc,
                message.sop_instance_uid,
                Path(file.name),
                file.fileno(),
                (message.digest.hexdigest(), message.size),
                self._prepare_spare,
            )
        self._close_file(message)
        dul._idle_timer.restart()
        self.served += 1
        if self.assoc.is_established:
            self._respond(message, status, comment)

    def _respond(self, message: _Message, status: int, comment: str | None) -> None:
        """Send the C-STORE-RSP (as pynetdicom would encode it)."""
        try:
            command = encode_c_store_rsp(
                message.message_id,
                status,
                message.sop_class_uid,
                message.sop_instance_uid,
                comment,
            )
        except UnicodeEncodeError:
            command = None
        limit = self.assoc.dimse.maximum_pdu_size
        if command is None or (limit and len(command) + 6 > limit):
            self._respond_through_pynetdicom(message, status, comment)
            return
        self.dul.socket.send(
            _PDU_HEADER.pack(_P_DATA_TF, 0, len(command) + 6)
            + _PDV_HEADER.pack(len(command) + 2, message.context_id, _COMMAND | _LAST)
            + command
        )

    def _respond_through_pynetdicom(
        self, message: _Message, status: int, comment: str | None
    ) -> None:
        from pynetdicom.dimse_primitives import C_STORE

        response = C_STORE()
        response.MessageIDBeingRespondedTo = message.message_id
        response.AffectedSOPClassUID = message.sop_class_uid
        response.AffectedSOPInstanceUID = message.sop_instance_uid
        response.Status = status
        if comment is not None:
            response.ErrorComment = comment  # type: ignore[assignment]
        self.assoc.dimse.send_msg(response, message.context_id)  # queued; this thread sends

    # -- any thread ------------------------------------------------------------------------

    def _drop_message(self) -> None:
        """Forget a message cut off before its end, and its temporary file."""
        with self._lock:
            message, self._message = self._message, None
            if message is not None:
                self._close_file(message)

    def close(self) -> None:
        """The connection closed: drop a message cut off, remove the temporary files."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            self._remove(spare)
        self._drop_message()

    @classmethod
    def _close_file(cls, message: _Message) -> None:
        if message.file is not None:
            cls._remove(message.file)

    @staticmethod
    def _remove(file: ReceivedFile) -> None:
        with contextlib.suppress(OSError):
            file.close()
        with contextlib.suppress(OSError):
            os.unlink(file.name)  # gone already once stored: it was renamed into place

"""C-STORE command sets encoded and decoded without pydicom datasets.

pynetdicom 3.0.4 turns every DIMSE message into a pydicom ``Dataset`` of command elements:
on the way out it builds one from the primitive and encodes it twice (once to compute the
Command Group Length, once to send); on the way in it converts every element of the decoded
set onto a new primitive (``message_to_primitive``). For C-STORE, the one message FIONA
handles thousands of times a minute in each direction, that is ~0.4 ms of GIL time to send
and ~0.2 ms to receive each command, for six or seven short elements whose layout PS3.7 fixes
(9.3.1: implicit VR little endian, group 0000, ascending tags).

:func:`install` wraps ``DIMSEServiceProvider.send_msg`` and ``DIMSEMessage.message_to_primitive``:

- a C-STORE request sent from a file (chunked send, FIONA's forwarder) or a C-STORE response
  goes out as the bytes :func:`encode_c_store_rq` / :func:`encode_c_store_rsp` build —
  identical to pynetdicom's (tested);
- a received C-STORE request or response whose command set holds only the usual elements
  becomes its primitive straight from the bytes (:func:`decode_c_store`) — with the same
  values pynetdicom's conversion gives (tested).

Anything else takes pynetdicom's path unchanged: an ``EVT_DIMSE_SENT`` handler (it wants the
message object), Move Originator or Offending Element parameters, an Error Comment received,
text that is not ASCII, a command that does not fit one PDV.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

__all__ = ["decode_c_store", "encode_c_store_rq", "encode_c_store_rsp", "install"]

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_DATASET_PRESENT = 0x0001
_NO_DATASET = 0x0101
_ELEMENT = struct.Struct("<HHL")
_US_VALUE = struct.Struct("<H")


def _text(element: int, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _us(element: int, value: int) -> bytes:
    return _ELEMENT.pack(0x0000, element, 2) + _US_VALUE.pack(value)


def _with_group_length(body: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, 0x0000, 4) + struct.pack("<L", len(body)) + body


def encode_c_store_rq(
    message_id: int, priority: int, sop_class_uid: str, sop_instance_uid: str
) -> bytes:
    """The command set of a C-STORE-RQ with a data set, as pynetdicom encodes it.

    Raises UnicodeEncodeError for a UID that is not ASCII.
    """
    return _with_group_length(
        b"".join(
            (
                _text(0x0002, sop_class_uid.encode("ascii"), b"\x00"),
                _us(0x0100, _C_STORE_RQ),
                _us(0x0110, message_id),
                _us(0x0700, priority),
                _us(0x0800, _DATASET_PRESENT),
                _text(0x1000, sop_instance_uid.encode("ascii"), b"\x00"),
            )
        )
    )


def encode_c_store_rsp(
    message_id: int,
    status: int,
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
    error_comment: str | None = None,
) -> bytes:
    """The command set of a C-STORE-RSP, as pynetdicom encodes it.

    Raises UnicodeEncodeError for text that is not ASCII.
    """
    parts = []
    if sop_class_uid is not None:
        parts.append(_text(0x0002, sop_class_uid.encode("ascii"), b"\x00"))
    parts += (
        _us(0x0100, _C_STORE_RSP),
        _us(0x0120, message_id),
        _us(0x0800, _NO_DATASET),
        _us(0x0900, status),
    )
    if error_comment is not None:
        parts.append(_text(0x0902, error_comment.encode("ascii"), b" "))
    if sop_instance_uid is not None:
        parts.append(_text(0x1000, sop_instance_uid.encode("ascii"), b"\x00"))
    return _with_group_length(b"".join(parts))


# element -> (primitive parameter, is a UID); CommandField and CommandDataSetType are checked
_RQ_ELEMENTS = {
    0x0002: ("AffectedSOPClassUID", True),
    0x0110: ("MessageID", False),
    0x0700: ("Priority", False),
    0x1000: ("AffectedSOPInstanceUID", True),
}
_RSP_ELEMENTS = {
    0x0002: ("AffectedSOPClassUID", True),
    0x0120: ("MessageIDBeingRespondedTo", False),
    0x0900: ("Status", False),
    0x1000: ("AffectedSOPInstanceUID", True),
}


def decode_c_store(encoded: bytes) -> tuple[bool, dict[str, Any]] | None:
    """(is a request, primitive parameters) of a plain C-STORE command set, else None.

    None for anything but a C-STORE-RQ with a data set or a C-STORE-RSP without one that
    carries only the elements above (pynetdicom's own conversion handles the rest).
    """
    elements: dict[int, bytes] = {}
    pos, end = 0, len(encoded)
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = _ELEMENT.unpack_from(encoded, pos)
        pos += 8
        if group != 0x0000 or pos + length > end or element in elements:
            return None
        elements[element] = encoded[pos : pos + length]
        pos += length
    try:
        command = _US_VALUE.unpack(elements.pop(0x0100))[0]
        dataset_type = _US_VALUE.unpack(elements.pop(0x0800))[0]
    except (KeyError, struct.error):
        return None
    elements.pop(0x0000, None)
    if command == _C_STORE_RQ and dataset_type != _NO_DATASET:
        known, request = _RQ_ELEMENTS, True
    elif command == _C_STORE_RSP and dataset_type == _NO_DATASET:
        known, request = _RSP_ELEMENTS, False
    else:
        return None
    values: dict[str, Any] = {}
    for element, raw in elements.items():
        entry = known.get(element)
        if entry is None:
            return None
        name, is_uid = entry
        if is_uid:
            text = raw.rstrip(b"\x00 ")
            if not text or max(text) > 0x7E or min(text) < 0x21:
                return None
            values[name] = text.decode("ascii")
        elif len(raw) == 2:
            values[name] = _US_VALUE.unpack(raw)[0]
        else:
            return None
    return request, values


_installed = threading.Lock()


def install() -> None:
    """Put the fast paths in place for every association in this process (idempotent)."""
    from pynetdicom import evt
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA

    with _installed:
        pynetdicom_send = DIMSEServiceProvider.send_msg
        if getattr(pynetdicom_send, "_fiona", False):
            return
        pynetdicom_to_primitive = DIMSEMessage.message_to_primitive

        def _pdv(context_id: int, header: bytes, data: bytes) -> Any:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, header + data))
            return pdata

        def _fast_command(primitive: Any) -> bytes | None:
            if primitive.MessageIDBeingRespondedTo is not None:
                if primitive.OffendingElement is not None or not isinstance(primitive.Status, int):
                    return None
                return encode_c_store_rsp(
                    primitive.MessageIDBeingRespondedTo,
                    primitive.Status,
                    primitive.AffectedSOPClassUID,
                    primitive.AffectedSOPInstanceUID,
                    primitive.ErrorComment,
                )
            if (
                primitive.MoveOriginatorApplicationEntityTitle is not None
                or primitive.MoveOriginatorMessageID is not None
                or primitive.DataSet is not None
                or getattr(primitive, "_dataset_path", None) is None
                or primitive.AffectedSOPClassUID is None
                or primitive.AffectedSOPInstanceUID is None
            ):
                return None
            return encode_c_store_rq(
                primitive.MessageID,
                primitive.Priority,
                primitive.AffectedSOPClassUID,
                primitive.AffectedSOPInstanceUID,
            )

        def send_msg(self: Any, primitive: Any, context_id: int) -> None:
            if type(primitive) is C_STORE and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
                try:
                    command = _fast_command(primitive)
                except UnicodeEncodeError:
                    command = None
                limit = self.maximum_pdu_size
                if command is not None and (not limit or len(command) + 6 <= limit):
                    send = self.dul.send_pdu
                    send(_pdv(context_id, b"\x03", command))
                    if primitive.MessageIDBeingRespondedTo is None:
                        _send_file(send, context_id, primitive._dataset_path, limit)
                    return
            pynetdicom_send(self, primitive, context_id)

        def _send_file(send: Any, context_id: int, where: Any, limit: int) -> None:
            """The data set fragments, as ``DIMSEMessage.encode_msg`` reads them from a file."""
            path, offset = where
            with open(path, "rb") as f:
                length = f.seek(0, 2) - f.seek(offset)
                chunk = length if not limit else limit - 6
                left = length
                while left > chunk:
                    send(_pdv(context_id, b"\x00", f.read(chunk)))
                    left -= chunk
                send(_pdv(context_id, b"\x02", f.read(chunk)))

        def message_to_primitive(self: Any) -> Any:
            if type(self) in (C_STORE_RQ, C_STORE_RSP):
                decoded = decode_c_store(self.encoded_command_set.getvalue())
                if decoded is not None and decoded[0] == (type(self) is C_STORE_RQ):
                    primitive = C_STORE()
                    for name, value in decoded[1].items():
                        setattr(primitive, name, value)
                    if decoded[0]:
                        primitive.DataSet = self.data_set
                    primitive._context_id = self.context_id
                    primitive._dataset_path = self._data_set_path
                    primitive._dataset_file = self._data_set_file
                    return primitive
            return pynetdicom_to_primitive(self)

        send_msg._fiona = True  # type: ignore[attr-defined]
        message_to_primitive._pynetdicom = pynetdicom_to_primitive  # type: ignore[attr-defined]
        DIMSEServiceProvider.send_msg = send_msg  # type: ignore[method-assign]
        DIMSEMessage.message_to_primitive = message_to_primitive  # type: ignore[method-assign]

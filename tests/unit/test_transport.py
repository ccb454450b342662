"""FIONA's changes to pynetdicom's transport: one-buffer reads, reactor wake-ups, codecs."""

from __future__ import annotations

import queue
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from fiona.scp.express import receive


def test_reads_exactly_the_requested_bytes_across_many_sends() -> None:
    left, right = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB, arriving in pieces
    extra = b"NEXT-PDU"

    def send() -> None:
        for start in range(0, len(payload), 65_000):
            right.sendall(payload[start : start + 65_000])
        right.sendall(extra)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        got = receive(left, len(payload))
        assert bytes(got) == payload
        # Nothing beyond the request was consumed: the next PDU is still there.
        assert bytes(receive(left, len(extra))) == extra
    finally:
        sender.join()
        left.close()
        right.close()


def test_a_closed_peer_returns_what_arrived() -> None:
    left, right = socket.socketpair()
    right.sendall(b"partial")
    right.close()
    try:
        got = receive(left, 100)
        assert bytes(got) == b"partial"  # the reader then reports the short PDU (Evt17)
    finally:
        left.close()


def _association(sock: socket.socket) -> SimpleNamespace:
    """The parts of a pynetdicom Association that :func:`wake_on_work` touches."""
    dul = SimpleNamespace(
        socket=SimpleNamespace(socket=sock),
        to_provider_queue=queue.Queue(),
        _run_loop_delay=0.001,
    )
    return SimpleNamespace(dimse=SimpleNamespace(msg_queue=queue.Queue()), dul=dul)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``time`` as pynetdicom sees it once FIONA's SCP is set up (restored afterwards)."""
    import pynetdicom.association
    import pynetdicom.dul

    from fiona.scp import wakeups

    monkeypatch.setattr(pynetdicom.association, "time", pynetdicom.association.time)
    monkeypatch.setattr(pynetdicom.dul, "time", pynetdicom.dul.time)
    wakeups.install()
    assert pynetdicom.dul.time is not time  # both modules see the stand-in
    assert pynetdicom.association.time.monotonic is time.monotonic  # the rest is `time`
    return pynetdicom.association.time


def _run_as(thread_object: Any, work: Any) -> None:
    """Run `work` in a thread whose identity is `thread_object`'s mark (as pynetdicom's
    Association and DULServiceProvider are themselves the threads)."""
    from fiona.scp import wakeups

    mark = getattr(thread_object, wakeups._ATTRIBUTE)

    def target() -> None:
        setattr(threading.current_thread(), wakeups._ATTRIBUTE, mark)
        work()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the loop was not woken"


def test_reactor_poll_waits_on_the_dimse_queue_only_in_marked_threads(
    stand_in: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SCP reactors wake on a queued message; every other sleep is a real sleep."""
    from fiona.scp import wakeups

    left, right = socket.socketpair()
    assoc = _association(left)
    messages = assoc.dimse.msg_queue
    waits: list[float | None] = []

    class Recording(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            return False

    messages.not_empty = Recording(messages.mutex)
    wakeups.wake_on_work(assoc)
    real_sleeps: list[float] = []
    monkeypatch.setattr(wakeups.time, "sleep", real_sleeps.append)

    def reactor() -> None:
        stand_in.sleep(0.001)  # empty queue: waits on it (for 5 ms at most)
        messages.put("C-STORE-RQ")
        stand_in.sleep(0.001)  # a message is waiting: no wait at all
        stand_in.sleep(0.0001)  # another loop's sleep: real

    stand_in.sleep(0.001)  # this thread is not marked: real sleep
    _run_as(assoc, reactor)
    left.close()
    right.close()
    assert real_sleeps == [0.001, 0.0001]
    assert waits == [wakeups._REACTOR_IDLE_SECONDS]


def test_the_dul_sleeps_until_the_peer_sends_or_a_pdu_is_queued(
    stand_in: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without either, a marked DUL sleeps its idle delay (a minute here): the thread
    ending at all shows that it was woken."""
    from fiona.scp import wakeups

    monkeypatch.setattr(wakeups, "DUL_IDLE_SECONDS", 60.0)
    left, right = socket.socketpair()
    assoc = _association(left)
    wakeups.wake_on_work(assoc)
    dul = assoc.dul
    assert dul._run_loop_delay == 60.0

    def answer_queued() -> None:
        dul.to_provider_queue.put("P-DATA (C-STORE-RSP)")
        stand_in.sleep(60.0)

    _run_as(dul, answer_queued)
    assert dul.to_provider_queue.get_nowait() == "P-DATA (C-STORE-RSP)"

    def peer_sends() -> None:
        right.sendall(b"\x04\x00")  # the first bytes of the next P-DATA-TF
        stand_in.sleep(60.0)

    _run_as(dul, peer_sends)
    left.close()
    right.close()


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even and odd
        ("1.2.840.10008.5.1.4.1.1.4", "2.25.1234567890123456789012345", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.3", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_file_meta_bytes_are_pydicoms(sop_class: str, sop_instance: str, syntax: str) -> None:
    """Each received file starts exactly as it did when pydicom wrote its File Meta."""
    import io
    import warnings

    import pynetdicom.dimse_messages as messages
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    from fiona.scp.filemeta import install

    expected = io.BytesIO()
    write_file_meta_info(
        expected,
        create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
        ),
    )
    install()
    meta = messages.create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
    )
    assert isinstance(meta, tuple)  # FIONA's encoder, not a pydicom dataset
    got = io.BytesIO()
    messages.write_file_meta_info(got, meta)
    assert got.getvalue() == expected.getvalue()
    # A value pydicom must encode (not ASCII) still goes through pydicom.
    odd = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that the UID is invalid
        messages.write_file_meta_info(
            odd,
            messages.create_file_meta(
                sop_class_uid=sop_class, sop_instance_uid="1.2.3.4\u00e9", transfer_syntax=syntax
            ),
        )
    assert odd.getvalue().startswith(b"\x02\x00\x00\x00UL")


def _c_store_rsp(**values: Any) -> Any:
    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.Status = 0x0000
    for keyword, value in values.items():
        setattr(rsp, keyword, value)
    return rsp


def _fake_assoc(handlers: list[Any] | None = None, **more: Any) -> Any:
    """An association as far as pynetdicom's event triggers look at it (`handlers` bound)."""
    return SimpleNamespace(
        get_handlers=lambda _event: handlers or [],
        _abort_nonblocking=lambda: None,
        _abort_blocking=lambda: None,
        **more,
    )


def _sent(
    provider_class: Any, rsp: Any, *, handlers: list[Any] | None = None, limit: int = 16384
) -> list[bytes]:
    """What ``send_msg`` hands to the DUL for `rsp`: each P-DATA's (context, PDV) values."""
    sent: list[Any] = []
    assoc = _fake_assoc(
        handlers, is_requestor=False, requestor=SimpleNamespace(maximum_length=limit)
    )
    provider = SimpleNamespace(assoc=assoc, dul=SimpleNamespace(send_pdu=sent.append))
    provider.maximum_pdu_size = limit
    provider_class.send_msg(provider, rsp, 3)
    return [value for pdata in sent for value in pdata.presentation_data_value_list]


@pytest.mark.parametrize(
    "values",
    [
        {
            "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "AffectedSOPInstanceUID": "2.25.1234567890123456789",  # odd length: padded
        },
        {
            "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.7",
            "AffectedSOPInstanceUID": "1.2.3.44",
            "Status": 0xC210,
            "ErrorComment": "cannot parse dataset: EOFError",  # odd length: padded
        },
        {"Status": 0xA700, "ErrorComment": "disk full"},  # no UIDs at all
    ],
)
def test_c_store_responses_are_pynetdicoms_bytes(values: dict[str, Any]) -> None:
    """Each C-STORE answer leaves exactly as pynetdicom's own message encoding sends it."""
    from pynetdicom.dimse import DIMSEServiceProvider

    from fiona.scp.cstore import install

    install()
    fast = _sent(DIMSEServiceProvider, _c_store_rsp(**values))
    # pynetdicom's own path, taken because an EVT_DIMSE_SENT handler wants its message
    messages: list[Any] = []
    slow = _sent(
        DIMSEServiceProvider,
        _c_store_rsp(**values),
        handlers=[(lambda event: messages.append(event.message), None)],
    )
    assert len(messages) == 1 and messages[0].command_set.Status == values.get("Status", 0)
    assert fast == slow
    assert len(fast) == 1 and fast[0][0] == 3 and fast[0][1][:1] == b"\x03"


def test_c_store_responses_pynetdicom_must_encode_still_go_through_it() -> None:
    from pynetdicom.dimse import DIMSEServiceProvider

    from fiona.scp.cstore import encode_c_store_rsp, install

    install()
    comment = "Zeichensatz: \u00fc"  # not ASCII: pydicom encodes it
    with pytest.raises(UnicodeEncodeError):
        encode_c_store_rsp(7, 0xC000, None, None, comment)
    (value,) = _sent(DIMSEServiceProvider, _c_store_rsp(Status=0xC000, ErrorComment=comment))
    assert comment.encode("latin-1") in value[1] or comment.encode() in value[1]


@pytest.mark.parametrize("limit", [16384, 0, 4096 + 6])
def test_c_store_requests_from_a_file_are_pynetdicoms_bytes(limit: int, tmp_path: Any) -> None:
    """What the forwarder sends (command, then the file in fragments) is byte for byte
    what pynetdicom's own encoding sends, whatever the peer's maximum PDU length."""
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dimse_primitives import C_STORE

    from fiona.scp.cstore import install

    install()
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 64)  # 16 KiB after the meta

    def request() -> Any:
        req = C_STORE()
        req.MessageID = 12
        req.Priority = 2
        req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        req.AffectedSOPInstanceUID = "2.25.987654321"
        req._dataset_path = (path, 132)
        return req

    fast = _sent(DIMSEServiceProvider, request(), limit=limit)
    slow = _sent(
        DIMSEServiceProvider, request(), limit=limit, handlers=[(lambda event: None, None)]
    )
    assert fast == slow
    assert b"".join(value[1:] for _, value in fast[1:]) == path.read_bytes()[132:]


@pytest.mark.parametrize(
    "values",
    [
        {"MessageID": 3, "Priority": 0, "AffectedSOPInstanceUID": "1.2.3.4"},
        {"MessageID": 65535, "Priority": 1, "AffectedSOPInstanceUID": "2.25.123"},
        {"MessageIDBeingRespondedTo": 3, "Status": 0, "AffectedSOPInstanceUID": "1.2.3.4"},
        {"MessageIDBeingRespondedTo": 9, "Status": 0xB000, "AffectedSOPInstanceUID": "1.2.33"},
        # pynetdicom's own conversion: parameters the fast path leaves alone
        {"MessageIDBeingRespondedTo": 9, "Status": 0xC210, "ErrorComment": "bad header"},
        {"MessageID": 3, "Priority": 0, "MoveOriginatorApplicationEntityTitle": "MOVER"},
    ],
)
def test_received_c_store_commands_become_the_same_primitives(values: dict[str, Any]) -> None:
    import io

    from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
    from pynetdicom.dimse_primitives import C_STORE

    from fiona.scp.cstore import decode_c_store, install

    install()
    primitive = C_STORE()
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    for keyword, value in values.items():
        setattr(primitive, keyword, value)
    request = "MessageID" in values
    if request:
        primitive.DataSet = io.BytesIO(b"\x08\x00\x16\x00")
        if "MoveOriginatorApplicationEntityTitle" in values:
            primitive.MoveOriginatorMessageID = 5
    message = C_STORE_RQ() if request else C_STORE_RSP()
    message.primitive_to_message(primitive)
    (command, *_) = list(message.encode_msg(1, 16384))

    def received() -> Any:
        incoming = DIMSEMessage()
        incoming.decode_msg(command)
        return incoming

    ours = received().message_to_primitive()
    plain = "ErrorComment" not in values and "MoveOriginatorApplicationEntityTitle" not in values
    assert (decode_c_store(command.presentation_data_value_list[0][1][1:]) is not None) == plain
    theirs = DIMSEMessage.message_to_primitive._pynetdicom(received())  # type: ignore[attr-defined]
    names = (
        "MessageID",
        "MessageIDBeingRespondedTo",
        "Priority",
        "Status",
        "AffectedSOPClassUID",
        "AffectedSOPInstanceUID",
        "ErrorComment",
        "MoveOriginatorApplicationEntityTitle",
        "MoveOriginatorMessageID",
        "_context_id",
    )
    assert type(ours) is C_STORE
    for name in names:
        assert getattr(ours, name) == getattr(theirs, name), name
        assert type(getattr(ours, name)) is type(getattr(theirs, name)), name
    assert ours.AffectedSOPInstanceUID == values.get("AffectedSOPInstanceUID")


def _fake_dul(handlers: list[Any] | None = None) -> Any:
    return SimpleNamespace(assoc=_fake_assoc(handlers))


def test_p_data_values_are_read_in_place_and_equal_pynetdicoms() -> None:
    """A received P-DATA-TF decodes to the same items as pynetdicom's, as views of the buffer."""
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    from fiona.scp.handlers import _decode_pdu_in_place

    primitive = P_DATA()
    primitive.presentation_data_value_list = [
        [1, b"\x03" + b"command" * 20],
        [3, b"\x00" + bytes(range(256)) * 512],
    ]
    wire = bytearray(P_DATA_TF(primitive).encode())
    ours, event = _decode_pdu_in_place(_fake_dul(), wire)
    theirs, their_event = DULServiceProvider._decode_pdu(_fake_dul(), bytearray(wire))
    assert event == their_event == "Evt10"
    got = ours.to_primitive().presentation_data_value_list
    want = theirs.to_primitive().presentation_data_value_list
    assert [(c, bytes(v)) for c, v in got] == want
    assert all(isinstance(v, memoryview) for _, v in got)  # no copy of the fragment
    assert ours.to_primitive().presentation_data_value_list[1][1][1:] == want[1][1][1:]


@pytest.mark.parametrize(
    "damage",
    [
        lambda wire: wire[:-3],  # the last item is cut short
        lambda wire: wire[:6] + b"\x00\x00\x00\x01\x01" + wire[6:],  # an item without a value
        lambda wire: wire + b"\x00\x00",  # a stray partial item header
    ],
)
def test_malformed_p_data_is_refused(damage: Any) -> None:
    """pynetdicom's reader turns the exception into Evt19 (the association is aborted)."""
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    from fiona.scp.handlers import _decode_pdu_in_place

    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, b"\x02" + b"data" * 100]]
    with pytest.raises(ValueError):
        _decode_pdu_in_place(_fake_dul(), bytearray(damage(bytes(P_DATA_TF(primitive).encode()))))


def test_other_pdus_and_observed_associations_take_pynetdicoms_decoder() -> None:
    from pynetdicom.pdu import A_RELEASE_RQ, P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    from fiona.scp.handlers import _decode_pdu_in_place

    pdu, event = _decode_pdu_in_place(_fake_dul(), bytearray(A_RELEASE_RQ().encode()))
    assert isinstance(pdu, A_RELEASE_RQ) and event == "Evt12"
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, b"\x02" + b"data" * 100]]
    wire = bytearray(P_DATA_TF(primitive).encode())
    seen: list[Any] = []
    pdu, _ = _decode_pdu_in_place(_fake_dul([(seen.append, None)]), wire)
    assert len(seen) == 2  # EVT_DATA_RECV and EVT_PDU_RECV were triggered
    assert isinstance(pdu.presentation_data_value_items[0].presentation_data_value, bytes)


def test_received_files_are_plain_files_that_never_clobber(tmp_path: Any) -> None:
    """pynetdicom's temporary file for a C-STORE, as FIONA makes it: what pynetdicom and the
    handler use of it works, the bytes are exact, and it never overwrites an existing file."""
    import os

    import fiona.scp.filemeta as filemeta

    first = filemeta.ReceivedFile(str(tmp_path))
    number = int(first.name.rsplit("-", 1)[1].split(".")[0])
    clash = tmp_path / f"rx-{os.getpid()}-{number + 1}.dcm"
    clash.write_bytes(b"left by an earlier process")
    second = filemeta.ReceivedFile(str(tmp_path))
    assert second.name != str(clash) and clash.read_bytes() == b"left by an earlier process"

    payload = bytes(range(256)) * 2048  # 512 KiB in 128 KiB fragments, as pynetdicom writes them
    assert first  # pynetdicom tests the object's truth
    first.write(b"\x00" * 128 + b"DICM")
    for start in range(0, len(payload), 131072):
        first.write(memoryview(payload)[start : start + 131072])
        first.file.flush()  # pynetdicom's call
    os.fsync(first.fileno())
    assert not first.closed
    first.close()
    assert first.closed
    assert (tmp_path / first.name).read_bytes() == b"\x00" * 128 + b"DICM" + payload
    second.close()

    # installed, pynetdicom's chunked receive gets one (in the temporary folder: the spool's)
    import tempfile

    import pynetdicom.dimse_messages as messages

    filemeta.install()
    previous, tempfile.tempdir = tempfile.tempdir, str(tmp_path / "spool-tmp")
    (tmp_path / "spool-tmp").mkdir()
    try:
        made = messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
        made.close()
        other = messages.NamedTemporaryFile(delete=True, mode="w+b", suffix=".x")  # not ours
        other.close()
    finally:
        tempfile.tempdir = previous
    assert isinstance(made, filemeta.ReceivedFile)
    assert os.path.dirname(made.name) == str(tmp_path / "spool-tmp")
    assert not isinstance(other, filemeta.ReceivedFile)


def test_a_pdu_longer_than_the_preallocation_grows_as_its_bytes_arrive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The express path reads a PDU into a buffer of its declared length only up to a cap:
    beyond it, the buffer grows with the bytes received, so a length field alone (up to
    4 GiB) allocates nothing; a peer that closes early yields the bytes that came."""
    import os

    from fiona.scp import express

    monkeypatch.setattr(express, "_PREALLOCATE_BYTES", 1000)
    payload = os.urandom(5000)
    header = b"\x04\x00" + len(payload).to_bytes(4, "big")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = threading.Thread(target=lambda: (theirs.sendall(payload), theirs.close()))
        sender.start()
        pdu = express.receive(ours, len(payload), header)
        sender.join()
    assert bytes(pdu) == header + payload
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(payload[:1500])
        theirs.close()
        cut = express.receive(ours, 0xFFFFFFFF, b"\x04\x00\xff\xff\xff\xff")
    assert bytes(cut) == b"\x04\x00\xff\xff\xff\xff" + payload[:1500]

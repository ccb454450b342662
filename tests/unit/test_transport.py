"""FIONA's changes to pynetdicom's transport: one-buffer PDU reads, reactor wake-ups."""

from __future__ import annotations

import queue
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from fiona.scp.handlers import _recv_exactly


def _reader(sock: socket.socket) -> SimpleNamespace:
    return SimpleNamespace(socket=sock)


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
        got = _recv_exactly(_reader(left), len(payload))
        assert bytes(got) == payload
        # Nothing beyond the request was consumed: the next PDU is still there.
        assert bytes(_recv_exactly(_reader(left), len(extra))) == extra
    finally:
        sender.join()
        left.close()
        right.close()


def test_a_closed_peer_returns_what_arrived() -> None:
    left, right = socket.socketpair()
    right.sendall(b"partial")
    right.close()
    try:
        got = _recv_exactly(_reader(left), 100)
        assert bytes(got) == b"partial"  # pynetdicom then reports the short PDU (Evt17)
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

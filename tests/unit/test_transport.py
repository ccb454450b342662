"""FIONA's replacement for pynetdicom's socket read (one buffer, ``recv_into``)."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

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

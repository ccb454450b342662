"""Wake pynetdicom's polling threads when there is work, instead of polling for it.

pynetdicom 3.0.4 runs two polling loops for every association:

- the **association reactor** (``Association._run_reactor``) sleeps 1 ms, then looks at
  the DIMSE message queue: every C-STORE request waited ~0.5 ms on average between
  arriving complete and reaching FIONA's handler (0.45 to 0.5 ms of a ~7.5 ms receive
  cycle; 0.15 ms with this);
- the **DUL reactor** (``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay``
  whenever it found nothing to do, then looks at the socket and at the queue of PDUs to
  send. A short delay answers quickly but burns CPU: at 0.2 ms the DUL thread of one
  busy association took ~2.7 ms of CPU per received instance, much of it polling, on a
  machine where receiving is CPU-bound.

:func:`install` replaces the ``time`` name inside ``pynetdicom.association`` and
``pynetdicom.dul`` with a stand-in whose ``sleep`` is the real one, except in the threads
of FIONA's SCP associations (marked by :func:`wake_on_work`), for the loop's own polling
sleep only:

- the association reactor waits on its DIMSE queue's condition: it returns as soon as a
  message is queued, and otherwise after 5 ms instead of 1 ms;
- the DUL thread waits in ``poll()`` on its socket and on a pipe that every PDU queued
  for sending writes to: it returns as soon as the peer sends or FIONA answers, and
  otherwise sleeps its full delay (:data:`DUL_IDLE_SECONDS`, long, so an idle
  association costs almost nothing).

SCU associations are never marked (their reactor must not race the sender for responses).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import ssl
import threading
import time
import weakref
from typing import Any

__all__ = ["DUL_IDLE_SECONDS", "install", "wake_on_work"]

_ATTRIBUTE = "_fiona_wake_on"
_REACTOR_SLEEP = 0.001  # Association._run_reactor's hard-coded poll
_REACTOR_IDLE_SECONDS = 0.005
"""How long a marked reactor waits for a DIMSE message instead of its 1 ms: a release or
abort request (which arrive on another queue) is noticed at that pace."""
DUL_IDLE_SECONDS = 0.005
"""The DUL's ``_run_loop_delay`` for marked associations: the longest a loop sleeps when
nothing wakes it (its timers, e.g. the network timeout, are checked at that pace)."""


class _DulWaker:
    """Wakes one association's DUL thread: the peer's bytes, or a PDU to send."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport  # pynetdicom's AssociationSocket (its .socket may change)
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        weakref.finalize(self, _close, self.read_fd, self.write_fd)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending
            os.write(self.write_fd, b"\0")

    def wait(self, seconds: float) -> None:
        sock = getattr(self.transport, "socket", None)
        if sock is None or sock.fileno() < 0:
            time.sleep(seconds)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: poll() cannot see them
        # poll(), not select(): select() refuses descriptors above 1023.
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            poller.register(self.read_fd, select.POLLIN)
            events = poller.poll(seconds * 1000)
        except (OSError, ValueError):  # closed meanwhile: the loop will notice
            time.sleep(seconds)
            return
        if any(fd == self.read_fd for fd, _ in events):
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self.read_fd, 4096)


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _PollingTime:
    """``time`` as the pynetdicom modules see it (only ``sleep`` differs)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        mark: tuple[queue.Queue[Any] | _DulWaker, float] | None = getattr(
            threading.current_thread(), _ATTRIBUTE, None
        )
        if mark is None or seconds != mark[1]:  # not the loop's own poll: a real sleep
            time.sleep(seconds)
            return
        waiting_on = mark[0]
        if isinstance(waiting_on, _DulWaker):
            waiting_on.wait(seconds)
            return
        with waiting_on.not_empty:
            if not waiting_on.queue:  # the deque behind the Queue; its mutex is held here
                waiting_on.not_empty.wait(_REACTOR_IDLE_SECONDS)


_installed = threading.Lock()


def install() -> None:
    """Put the stand-in in place (idempotent; it changes only marked threads)."""
    import pynetdicom.association
    import pynetdicom.dul

    with _installed:
        for module in (pynetdicom.association, pynetdicom.dul):
            if not isinstance(getattr(module, "time", None), _PollingTime):
                setattr(module, "time", _PollingTime())  # noqa: B010


def wake_on_work(assoc: Any) -> None:
    """Mark a new SCP association (EVT_CONN_OPEN, before its threads start).

    Its reactor wakes when a DIMSE message is queued; its DUL thread when the peer sends
    or a PDU is queued for sending, and otherwise polls every :data:`DUL_IDLE_SECONDS`.
    """
    setattr(assoc, _ATTRIBUTE, (assoc.dimse.msg_queue, _REACTOR_SLEEP))
    dul = assoc.dul
    waker = _DulWaker(dul.socket)
    outgoing = dul.to_provider_queue
    put = outgoing.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        waker.wake()

    outgoing.put = put_and_wake
    dul._run_loop_delay = DUL_IDLE_SECONDS
    setattr(dul, _ATTRIBUTE, (waker, DUL_IDLE_SECONDS))

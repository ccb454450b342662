"""``fiona serve --forwarder``: the forwarding service in a process of its own.

The primary ``fiona serve`` starts it after it has migrated the database and reconciled the
spool, restarts it if it exits, wakes it with SIGUSR1 when a study becomes stable and stops
it with SIGTERM (in-flight batches finish, up to the grace period). Its own interpreter means
its own GIL: de-identification and C-STORE sending no longer slow the C-STORE handlers down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
from typing import Any

from fiona.audit import utcnow
from fiona.config import FionaConfig
from fiona.db import make_engine, make_sessionmaker
from fiona.forwarder.service import Forwarder
from fiona.keys import load_node_key
from fiona.logs import get_logger
from fiona.scp.server import configure_pynetdicom
from fiona.scp.spool import Spool

__all__ = ["die_with_parent", "run_forwarder"]

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1
FORWARDER_NICENESS = 5
"""Added to the forwarding process's nice value: when the cores are busy, receiving goes first."""


def die_with_parent(parent: int) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux).

    Returns False if the parent is already gone (the caller should exit). Elsewhere the
    caller's own check of ``os.getppid()`` is the fallback.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    return os.getppid() == parent


def run_forwarder(config: FionaConfig, stop: threading.Event, grace: float) -> int:
    """Run the forwarder until *stop* is set or the primary is gone; returns an exit status."""
    parent = os.getppid()
    if not die_with_parent(parent):
        return 1
    # Receiving first: a modality waits for each C-STORE answer, forwarding does not.
    os.nice(FORWARDER_NICENESS)
    spool = Spool(config.storage.path, config.storage.min_free_mb)
    configure_pynetdicom(spool)  # the same process-wide options as the receiving process
    engine = make_engine(config.database.url)
    forwarder = Forwarder(
        config, make_sessionmaker(engine), spool.root, load_node_key(spool.root), utcnow
    )

    def _on_wake(_signum: int, _frame: Any) -> None:
        forwarder.kick()

    signal.signal(signal.SIGUSR1, _on_wake)
    forwarder.start()
    log.info("forwarder process running", pid=os.getpid())
    status = 0
    while not stop.wait(0.5):
        if os.getppid() != parent:
            log.error("primary process gone; forwarder stopping")
            status = 1
            break
    forwarder.stop(grace)
    engine.dispose()
    log.info("forwarder process stopped")
    return status

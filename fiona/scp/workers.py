"""Secondary receiving processes (``node.workers``), supervised by the primary.

Each worker is ``fiona serve --worker`` on the same configuration: it listens on the same
port (SO_REUSEPORT) and writes to the same spool and database, but leaves spool
reconciliation and the stability sweep to the primary. A worker that dies is restarted; a
worker whose primary died (kill -9) stops by itself rather than linger on the port;
a stop signal to the primary stops every worker the same graceful way.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from fiona.logs import get_logger

__all__ = ["WorkerPool"]

log = get_logger(__name__)

_RESTART_BACKOFF_SECONDS = 2.0


class WorkerPool:
    """Start, supervise and stop `count` worker processes."""

    def __init__(self, config_path: Path, count: int, grace: float) -> None:
        self.config_path = config_path
        self.count = count
        self.grace = grace
        self.processes: list[subprocess.Popen[bytes]] = []
        self._restart_not_before = 0.0

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [
            sys.executable,
            "-m",
            "fiona",
            "serve",
            "--worker",
            "--config",
            str(self.config_path),
            "--grace",
            str(self.grace),
        ]
        return subprocess.Popen(command)  # stdout/stderr: the primary's (JSON lines)

    def start(self) -> None:
        self.processes = [self._spawn() for _ in range(self.count)]
        log.info("workers started", pids=[p.pid for p in self.processes])

    def supervise(self) -> None:
        """Restart workers that exited (with a short backoff)."""
        now = time.monotonic()
        for index, process in enumerate(self.processes):
            code = process.poll()
            if code is None or now < self._restart_not_before:
                continue
            log.error("worker exited; restarting", pid=process.pid, exit_status=code)
            self.processes[index] = self._spawn()
            self._restart_not_before = now + _RESTART_BACKOFF_SECONDS

    def signal_stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        """Wait for every worker to finish; kill what outlives the grace period."""
        deadline = time.monotonic() + self.grace + 15
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop; killing it", pid=process.pid)
                process.kill()
                process.wait()

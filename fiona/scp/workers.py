"""Child processes of ``fiona serve``, supervised by the primary.

* **Receiving workers** (``node.workers`` > 1): ``fiona serve --worker`` on the same
  configuration. Each accepts from the primary's listening socket, which it inherits
  (``--listen-fd``; a busy process leaves a new connection to an idle one, see
  :class:`fiona.scp.server.SharedListenerServer`), and writes to the same spool and
  database, but leaves spool reconciliation and the stability sweep to the primary. A worker
  whose primary died (kill -9) stops by itself, gracefully, rather than linger on the port.
* **The forwarder** (``forwarding.separate_process``, the default when destinations are
  configured): ``fiona serve --forwarder``. De-identifying and sending then run on their own
  interpreter (their own GIL) instead of competing with the C-STORE handlers. The kernel
  kills it if the primary dies (``PR_SET_PDEATHSIG``), so that a crash of the node is a crash
  of the whole node: the next start resumes from the ledger, with no sender of the old
  generation still talking to a destination.

A child that exits is restarted (with a short backoff) — a receiving worker after the
primary has recovered its temporary folder (:func:`fiona.scp.recovery.recover_folder_of`);
a stop signal to the primary stops every child the same graceful way.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fiona.logs import get_logger

__all__ = ["ChildPool", "forwarder_pool"]

log = get_logger(__name__)

_RESTART_BACKOFF_SECONDS = 2.0


class ChildPool:
    """Start, supervise and stop `count` processes of ``fiona serve <flag>``."""

    def __init__(
        self,
        config_path: Path,
        count: int,
        grace: float,
        flag: str = "--worker",
        listen_fds: tuple[int | None, int | None] = (None, None),
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.config_path = config_path
        self.count = count
        self.grace = grace
        self.flag = flag
        self.listen_fds = listen_fds
        self.role = flag.lstrip("-")
        self.processes: list[subprocess.Popen[bytes]] = []
        self._restart_not_before = 0.0
        self.on_exit = on_exit
        """Called with the id of a child that exited, before it is replaced."""

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [
            sys.executable,
            "-m",
            "fiona",
            "serve",
            self.flag,
            "--config",
            str(self.config_path),
            "--grace",
            str(self.grace),
        ]
        inherited = []
        for option, fd in zip(("--listen-fd", "--tls-listen-fd"), self.listen_fds, strict=True):
            if fd is not None:
                command += [option, str(fd)]
                inherited.append(fd)
        # stdout/stderr: the primary's (JSON lines)
        return subprocess.Popen(command, pass_fds=inherited)

    def start(self) -> None:
        self.processes = [self._spawn() for _ in range(self.count)]
        log.info(f"{self.role}s started", pids=[p.pid for p in self.processes])

    def supervise(self) -> None:
        """Restart children that exited (with a short backoff)."""
        now = time.monotonic()
        for index, process in enumerate(self.processes):
            code = process.poll()
            if code is None or now < self._restart_not_before:
                continue
            log.error(f"{self.role} exited; restarting", pid=process.pid, exit_status=code)
            if self.on_exit is not None:
                try:
                    self.on_exit(process.pid)
                except Exception:
                    log.exception(f"clean-up after a {self.role} failed", pid=process.pid)
            self.processes[index] = self._spawn()
            self._restart_not_before = now + _RESTART_BACKOFF_SECONDS

    def notify(self) -> None:
        """Wake the children (SIGUSR1): for the forwarder, "a study became stable"."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGUSR1)

    def signal_stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        """Wait for every child to finish; kill what outlives the grace period."""
        deadline = time.monotonic() + self.grace + 15
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(f"{self.role} did not stop; killing it", pid=process.pid)
                process.kill()
                process.wait()


def forwarder_pool(config_path: Path, grace: float) -> ChildPool:
    """The one forwarder process."""
    return ChildPool(config_path, 1, grace, flag="--forwarder")

"""Run the web application with uvicorn in a thread of ``fiona serve``'s primary process."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn
from starlette.applications import Starlette

from fiona.logs import get_logger

__all__ = ["WebServer"]

log = get_logger(__name__)


class WebServer:
    """uvicorn on (host, port) in a daemon thread; ``start`` returns once it listens."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,  # FIONA's logging; uvicorn's records go through it
            access_log=False,  # query strings may name studies: no access log
            lifespan="off",
            server_header=False,
        )
        self.host, self.port = host, port
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="fiona-web", daemon=True)

    def _run(self) -> None:
        # uvicorn exits (SystemExit) when it cannot bind; start() reports it
        with contextlib.suppress(SystemExit):
            self._server.run()

    def start(self, timeout: float = 15.0) -> bool:
        """Start serving; False (and an error log line) if it does not listen in time."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                log.error(
                    "web interface not started: cannot listen", host=self.host, port=self.port
                )
                return False
            time.sleep(0.05)
        log.info("web interface listening", host=self.host, port=self.port)
        return True

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

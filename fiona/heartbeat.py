"""Small state files other processes read: when a loop last did its work.

``<storage>/state/<name>.json`` holds ``{"at": <UTC ISO time>, ...}``. The forwarding
process's pipeline writes ``pipeline`` (at most every :data:`INTERVAL` seconds) and the REDCap
poller writes ``redcap`` after each poll; the web interface's dashboard and ``/readyz`` read
them. Written atomically (rename), not fsynced: losing the last beat in a crash is harmless.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["INTERVAL", "Heartbeat", "read_beat"]

INTERVAL = 10.0


class Heartbeat:
    def __init__(self, storage: Path, name: str, interval: float = INTERVAL) -> None:
        self.path = storage / "state" / f"{name}.json"
        self.interval = interval
        self._last = float("-inf")

    def beat(self, now: datetime, force: bool = False, **facts: Any) -> None:
        """Record *now* (and *facts*) unless the last beat is younger than the interval."""
        if not force and time.monotonic() - self._last < self.interval:
            return
        self._last = time.monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"at": now.isoformat(), **facts}))
            tmp.replace(self.path)
        except OSError:
            pass  # a full disk shows elsewhere; the beat is only a hint


def read_beat(storage: Path, name: str) -> dict[str, Any] | None:
    """The last beat of *name* (its ``at`` as a datetime), or None."""
    try:
        data = json.loads((storage / "state" / f"{name}.json").read_text())
        data["at"] = datetime.fromisoformat(data["at"])
        return dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None

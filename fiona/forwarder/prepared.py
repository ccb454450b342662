"""Prepared files: de-identified bytes written once, when an instance is prepared.

``<storage>/prepared/<request id>/<instance id>-<digest prefix>.dcm``

Preparing an instance de-identifies it (to learn its new UIDs and the digest the ledger
records); its bytes are kept here so that every destination's sender streams this file instead
of de-identifying the original again. The folder is a cache, never the record:

* files are written without fsync, to a temporary name and renamed, so a file that exists is
  whole — as long as the machine has not crashed since; that is why the forwarder empties the
  folder each time it starts;
* the name carries the digest the ledger recorded, so a file of an earlier preparation (before
  an operator re-prepared the request under a changed profile) is never sent in its place;
* a missing file is rebuilt from the original in the spool (de-identification is
  deterministic) and checked against the digest; files go when no destination still needs
  them.

Bytes a destination refused for good are kept in ``<storage>/quarantine/outgoing/<request
id>/<destination>/<new SOP Instance UID>.dcm`` with a JSON sidecar giving the reason: what was
refused, de-identified, for the operator to inspect until the request is retried.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from fiona.logs import get_logger

__all__ = ["PreparedFiles"]

log = get_logger(__name__)

_DIGEST_PREFIX = 16


class PreparedFiles:
    """The prepared-files cache and the outgoing quarantine of one storage folder."""

    def __init__(self, storage: Path) -> None:
        self.root = storage / "prepared"
        self.outgoing = storage / "quarantine" / "outgoing"

    def path(self, request_id: int, instance_id: int, digest: str) -> Path:
        return self.root / str(request_id) / f"{instance_id}-{digest[:_DIGEST_PREFIX]}.dcm"

    def write(self, request_id: int, instance_id: int, digest: str, data: bytes) -> Path | None:
        """Keep *data* for the senders; None if it cannot be written (they rebuild it)."""
        target = self.path(request_id, instance_id, digest)
        tmp = target.with_name(f".{uuid.uuid4().hex}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("cannot keep a prepared file", error=type(exc).__name__)
            return None
        return target

    def reset(self) -> None:
        """Empty the cache (at forwarder start: only files written since are trusted)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def discard(self, request_id: int, instance_ids: Iterable[int]) -> None:
        """Remove the prepared files of instances no destination still needs."""
        folder = self.root / str(request_id)
        for instance_id in instance_ids:
            for path in folder.glob(f"{instance_id}-*.dcm"):
                path.unlink(missing_ok=True)

    def discard_request(self, request_id: int) -> None:
        shutil.rmtree(self.root / str(request_id), ignore_errors=True)

    # -- outgoing quarantine ---------------------------------------------------------------

    def quarantine_path(self, request_id: int, destination: str, new_sop_uid: str) -> Path:
        return self.outgoing / str(request_id) / destination / f"{new_sop_uid}.dcm"

    def quarantine(
        self,
        source: Path,
        request_id: int,
        destination: str,
        new_sop_uid: str,
        facts: dict[str, object],
        now: datetime,
    ) -> Path | None:
        """Keep the refused bytes with the reason; None if that failed (the ledger has it)."""
        target = self.quarantine_path(request_id, destination, new_sop_uid)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)  # the prepared file may still serve other destinations
            except OSError:
                shutil.copyfile(source, target)
            sidecar = {"quarantined_at": now.isoformat(), "destination": destination, **facts}
            target.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
        except OSError as exc:
            log.warning("cannot quarantine refused bytes", error=type(exc).__name__)
            return None
        return target

    def release_quarantine(self, request_id: int) -> int:
        """Operator retried the request: drop its quarantined copies; returns how many."""
        folder = self.outgoing / str(request_id)
        count = sum(1 for _ in folder.rglob("*.dcm")) if folder.exists() else 0
        shutil.rmtree(folder, ignore_errors=True)
        return count

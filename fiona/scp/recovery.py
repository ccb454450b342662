"""Restart recovery: make the spool and the index agree again.

Run before the SCP accepts associations:

* an index row whose file is missing from ``incoming/`` while a temporary file left in
  ``tmp/`` has the row's SHA-256 is a rename the power failure took (the folder's fsync is
  put off, see :mod:`fiona.scp.spool`): the file is moved into place;
* the other temporary files, left by transfers that were cut off, are removed — their
  senders never got a success status, so they still hold the data and will send it again —
  and so are the emptied folders of the processes that left them. The folder of a process
  that still runs (a ``fiona import`` beside the restart, a worker of the stopped node not
  yet gone) is left alone: its files are in use — unless that process started after the
  folder last changed (after a reboot a process id can be another process's);
* files under ``incoming/`` without an index row (a crash between rename and commit) are
  indexed, attributed to the pseudo-association ``recovered``;
* index rows whose file is gone are flagged ``file_missing`` with an audit event.

When a receiving worker dies while the node runs (a crash, ``kill -9``; the primary restarts
it), :func:`recover_folder_of` does the part of this for its folder at once: a file whose
index row was committed before the rename (the row's SOP Instance UID and SHA-256, its file
not in place) goes into place; the rest, and the folder, are removed. Every minute the
primary does the same for any other stopped process's folder (:func:`recover_stopped_folders`:
a ``fiona import`` cut off).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from fiona.audit import audit_event
from fiona.db.models import AuditEventType, Instance
from fiona.logs import get_logger
from fiona.scp.header import HeaderError, read_header
from fiona.scp.index import IndexWriter, InstanceRecord
from fiona.scp.spool import Spool, file_digest

__all__ = ["ReconcileResult", "reconcile", "recover_folder_of", "recover_stopped_folders"]

log = get_logger(__name__)

RECOVERED = "recovered"


@dataclass(frozen=True)
class ReconcileResult:
    """Counts of what reconciliation found and did."""

    temporary_removed: int
    files_restored: int
    """Moved from ``tmp/`` into place for their index rows (renames a crash undid)."""
    files_indexed: int
    rows_missing_file: int
    unreadable: int


def reconcile(
    session_factory: sessionmaker[Session],
    spool: Spool,
    writer: IndexWriter,
    now: datetime,
) -> ReconcileResult:
    """Reconcile spool and index (see the module docstring)."""
    with session_factory() as session:
        rows = session.execute(select(Instance.path, Instance.file_missing, Instance.digest)).all()
    known = {path: flagged for path, flagged, _digest in rows}
    on_disk = {spool.relative(path) for path in spool.incoming.glob("*/*/*.dcm")}
    absent = {  # the SHA-256 of each row whose file is not where the row says -> its path
        # (flagged ones too: a file kept under its temporary name by a process that looked
        # running at an earlier start is restored now)
        digest: path
        for path, _flagged, digest in rows
        if path not in on_disk
    }
    leftovers, folders = _leftovers(spool)
    restored = _restore_renames(spool, absent, leftovers)
    on_disk.update(restored)
    removed = _remove(leftovers, folders)

    indexed = unreadable = 0
    for relative in sorted(on_disk):
        if relative in known and not known[relative]:
            continue
        path = spool.root / relative
        try:
            header = read_header(path)
        except HeaderError as exc:
            unreadable += 1
            log.warning("unreadable file in spool", path=relative, reason=str(exc))
            continue
        digest, size = file_digest(path)
        writer.index_instance(
            InstanceRecord(
                header=header,
                calling_ae_title=RECOVERED,
                called_ae_title=RECOVERED,
                peer_address=RECOVERED,
                association_id=RECOVERED,
                received_at=now,
                size_bytes=size,
                digest=digest,
                path=relative,
            )
        ).result()
        indexed += 1

    missing = [p for p, flagged in known.items() if p not in on_disk and not flagged]
    if missing:
        with session_factory() as session, session.begin():
            for chunk_start in range(0, len(missing), 500):
                chunk = missing[chunk_start : chunk_start + 500]
                session.execute(
                    update(Instance).where(Instance.path.in_(chunk)).values(file_missing=True)
                )
            session.add(
                audit_event(
                    AuditEventType.FILE_MISSING,
                    actor="fiona",
                    occurred_at=now,
                    count=len(missing),
                )
            )
    result = ReconcileResult(removed, len(restored), indexed, len(missing), unreadable)
    if removed or restored or indexed or missing or unreadable:
        writer.add(
            [
                audit_event(
                    AuditEventType.SPOOL_RECONCILED,
                    actor="fiona",
                    occurred_at=now,
                    temporary_removed=removed,
                    files_restored=restored,
                    files_indexed=indexed,
                    rows_missing_file=len(missing),
                    unreadable=unreadable,
                )
            ]
        ).result()
    log.info(
        "spool reconciled",
        temporary_removed=removed,
        files_restored=restored,
        files_indexed=indexed,
        rows_missing_file=len(missing),
        unreadable=unreadable,
    )
    return result


def recover_folder_of(
    session_factory: sessionmaker[Session], spool: Spool, pid: int, now: datetime
) -> tuple[int, int]:
    """Clear the temporary folder of receiving process *pid*, which died; returns the files
    put in place and the files removed. A process that still runs is left alone."""
    folder = spool.tmp_root / str(pid)
    if not folder.is_dir() or _running(pid, folder):
        return 0, 0
    return _recover_folder(session_factory, spool, pid, folder, now)


def recover_stopped_folders(
    session_factory: sessionmaker[Session], spool: Spool, now: datetime
) -> int:
    """:func:`recover_folder_of` for every process folder in ``tmp/`` whose process has
    stopped — a ``fiona import`` cut off, a worker of this node that died — while the node
    runs on; returns how many folders there were."""
    stopped = [
        (int(entry.name), Path(entry.path))
        for entry in os.scandir(spool.tmp_root)
        if entry.is_dir(follow_symlinks=False)
        and entry.name.isdigit()
        and int(entry.name) != os.getpid()
        and not _running(int(entry.name), Path(entry.path))
    ]
    for pid, folder in stopped:
        _recover_folder(session_factory, spool, pid, folder, now)
    return len(stopped)


def _recover_folder(
    session_factory: sessionmaker[Session], spool: Spool, pid: int, folder: Path, now: datetime
) -> tuple[int, int]:
    files, folders = _contents(folder)
    restored = [
        target
        for path, size in files
        if size
        and (target := _indexed_target(session_factory, spool, path)) is not None
        and spool.place_if_absent(path, spool.root / target)
    ]
    removed = _remove(files, [*folders, folder])
    if restored or removed:
        with session_factory() as session, session.begin():
            if restored:
                session.execute(
                    update(Instance).where(Instance.path.in_(restored)).values(file_missing=False)
                )
            session.add(
                audit_event(
                    AuditEventType.SPOOL_RECONCILED,
                    actor="fiona",
                    occurred_at=now,
                    process=pid,
                    temporary_removed=removed,
                    files_restored=restored,
                )
            )
        log.warning("a receiving process died: its temporary files recovered", pid=pid,
                    files_restored=len(restored), temporary_removed=removed)  # fmt: skip
    return len(restored), removed


def _indexed_target(session_factory: sessionmaker[Session], spool: Spool, path: Path) -> str | None:
    """Where *path* belongs if an index row holds it (its SOP Instance UID and SHA-256) and
    the row's file is not in place; else None."""
    try:
        header = read_header(path)
    except HeaderError:
        return None  # cut off mid-transfer: its sender never got a success status
    with session_factory() as session:
        row = session.execute(
            select(Instance.path, Instance.digest).where(
                Instance.sop_instance_uid == header.sop_instance_uid
            )
        ).one_or_none()
    if row is None or os.path.lexists(spool.root / row.path):
        return None
    digest, _size = file_digest(path)
    return str(row.path) if digest == row.digest else None


def _leftovers(spool: Spool) -> tuple[list[tuple[Path, int]], list[Path]]:
    """The temporary files nobody is writing (with their sizes), and the folders to remove
    once they are gone, deepest first: everything under ``tmp/`` — loose files of earlier
    versions, the upload folders in it — but for the folders of other processes that run."""
    files: list[tuple[Path, int]] = []
    folders: list[Path] = []
    own = spool.tmp
    for entry in os.scandir(spool.tmp_root):
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False):
            files.append((path, entry.stat().st_size))
            continue
        if path != own and entry.name.isdigit() and _running(int(entry.name), path):
            continue
        inside, subfolders = _contents(path)
        files += inside
        folders += subfolders
        if path != own:
            folders.append(path)
    return files, folders


def _contents(folder: Path) -> tuple[list[tuple[Path, int]], list[Path]]:
    """The files under *folder* (with their sizes) and its subfolders, deepest first."""
    files: list[tuple[Path, int]] = []
    folders: list[Path] = []
    for top, subfolders, names in os.walk(folder, topdown=False):
        files.extend((Path(top) / name, os.lstat(Path(top) / name).st_size) for name in names)
        folders.extend(Path(top) / name for name in subfolders)
    return files, folders


def _remove(files: list[tuple[Path, int]], folders: list[Path]) -> int:
    """Delete *files* and then *folders* (deepest first; one that is not empty stays): the
    number of files with content removed."""
    removed = 0
    for path, size in files:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue  # moved into place
        if size:  # empty: a file made ahead for a store that never came
            removed += 1
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty: something else put a file there
            folder.rmdir()
    return removed


def _running(pid: int, folder: Path) -> bool:
    """Whether the process that made *folder*, ``tmp/<pid>``, still runs (its files are in use).

    After a reboot another process may have the id: a process that started after the folder
    was last changed did not make it (a folder's modification time only grows while its
    process adds and removes files), and the folder is treated as a stopped one's.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it runs
    started = _start_time(pid)
    try:
        changed = folder.stat().st_mtime
    except OSError:
        return True
    return started is None or started <= changed + 1.0


def _start_time(pid: int) -> float | None:
    """When process *pid* started (seconds since the epoch; Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    # Field 22 (starttime, in clock ticks since boot) counts from after the ")" of the name.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None


def _restore_renames(
    spool: Spool, absent: dict[str, str], leftovers: list[tuple[Path, int]]
) -> list[str]:
    """Move temporary files into place whose SHA-256 a row without its file holds (`absent`:
    digest -> the row's path); the paths restored."""
    candidates = [path for path, size in leftovers if size]
    restored: list[str] = []
    for candidate in candidates if absent else []:
        digest, _size = file_digest(candidate)
        target = absent.pop(digest, None)
        if target is None:
            continue
        spool.commit_file(candidate, spool.root / target)  # folders synced at once
        restored.append(target)
        log.warning("file restored from tmp/ after a crash", path=target)
    return restored

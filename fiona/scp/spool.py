"""The spool: durable writes of received bytes, quarantine, free-space checks.

Layout under the storage folder (one filesystem, so that renames are atomic)::

    incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    incoming/<StudyInstanceUID>/<SeriesInstanceUID>.json    (series metadata, when stable)
    quarantine/<YYYYMMDD>/<uuid>.dcm  + <uuid>.json          (bytes we could not accept)
    tmp/<pid>/                                 (files being received, one folder per process)

Durability (the promise behind a C-STORE success): write to a temporary file on the same
filesystem, fsync it, commit the index row (its SHA-256 included), rename the file into
place — only then is the success status returned. The folder's fsync, which makes the
rename itself durable, is put off for a new instance in an existing series folder (it cost
~0.5 ms per instance on the critical path): the folders are synced when the association
ends, a journaling filesystem commits it within seconds anyway, and should the power fail
before that, the file is still durable under its temporary name in ``tmp/`` and restart
recovery moves it into place by its index row's digest (:mod:`fiona.scp.recovery`). A
replacement (the path exists) and a new folder are synced at once, as before.

Temporary folders: each process that receives (``node.workers``, ``fiona import``) writes
its temporary files in a folder of its own, ``tmp/<pid>``. Creating a file holds its
folder's lock for the whole inode search, and a rename out of it takes the lock again; two
workers sharing one ``tmp/`` spun on that lock for each other (BENCHMARKS.md). A process
removes its folder when it stops; restart recovery, and the primary every minute, go
through the folders of processes that no longer run.

Page cache: on a node that forwards nothing, a received file's pages leave the page cache
once it is on disk (:func:`release_pages`). Nothing reads it again soon; keeping gigabytes
of received data cached would push out what the machine does use, and growing the cache
costs more than reusing its pages: on a virtual machine whose freed memory goes back to the
host (a balloon, free page reporting), every new page-cache page is a fault on the host —
~2 ms per MB measured here, the largest single cost of a C-STORE (BENCHMARKS.md). A node
with destinations keeps them: its forwarder reads each file back within seconds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fiona.errors import OutOfSpaceError, StorageError

__all__ = [
    "Spool",
    "file_digest",
    "fsync_dir",
    "fsync_file",
    "is_valid_uid",
    "release_pages",
    "write_json_atomic",
]

# PS3.5 9.1: digits and dots, at most 64 characters. Leading zeros occur in the wild and
# are accepted; anything else could escape the spool folder as a path.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# This process's temporary folder -> the services using it (Spool.claim_tmp, release_tmp).
_TMP_USERS: Counter[Path] = Counter()
_TMP_LOCK = threading.Lock()

_CHUNK = 1 << 20


def is_valid_uid(value: object) -> bool:
    """Return whether `value` is a UID that is safe to use as a file name."""
    return isinstance(value, str) and len(value) <= 64 and _UID.match(value) is not None


def file_digest(path: Path | str) -> tuple[str, int]:
    """Return the SHA-256 (hex) and size of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fsync_file(path: Path) -> None:
    """fsync a file's data and metadata, by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def release_pages(fd: int) -> None:
    """Drop a synced file's (clean) pages from the page cache (see the module); advice only."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def fsync_dir(path: Path) -> None:
    """fsync a folder so that a rename or a new entry in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_entry(path: Path, created: list[Path]) -> None:
    """Make a new name durable: fsync its folder, and the parent of each folder just created
    for it (``created``, as :meth:`Spool._makedirs` returns them)."""
    fsync_dir(path.parent)
    for folder in created:
        fsync_dir(folder.parent)


def write_json_atomic(path: Path, content: Any) -> None:
    """Write JSON next to `path`, fsync, and rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class _FolderSyncs:
    """Folders holding renames whose fsync was put off (:meth:`Spool.commit_file`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: set[Path] = set()

    def add(self, folder: Path) -> None:
        with self._lock:
            self._folders.add(folder)

    def take(self) -> set[Path]:
        with self._lock:
            folders, self._folders = self._folders, set()
        return folders


@dataclass(frozen=True)
class Spool:
    """The storage folder and what may be done in it."""

    root: Path
    min_free_mb: int
    _unsynced: _FolderSyncs = field(
        default_factory=_FolderSyncs, init=False, repr=False, compare=False
    )

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def tmp_root(self) -> Path:
        """The folder of every process's temporary folder (see the module docstring)."""
        return self.root / "tmp"

    @property
    def tmp(self) -> Path:
        """This process's temporary folder, ``tmp/<pid>``."""
        return self.tmp_root / str(os.getpid())

    def prepare(self) -> None:
        """Create the shared folders (idempotent); a receiver also calls :meth:`claim_tmp`."""
        for folder in (self.root, self.incoming, self.quarantine, self.tmp_root):
            folder.mkdir(parents=True, exist_ok=True)

    def claim_tmp(self) -> Path:
        """Create this process's temporary folder for a service that receives; it calls
        :meth:`release_tmp` when it stops (several services of one process share it)."""
        folder = self.tmp
        with _TMP_LOCK:
            folder.mkdir(parents=True, exist_ok=True)
            # Changed now, after this process started: it is this process's from here on,
            # even if a process of an earlier boot with the same id left it (recovery).
            os.utime(folder)
            _TMP_USERS[folder] += 1
        return folder

    def release_tmp(self) -> None:
        """The last service of this process to stop removes its temporary folder, if
        nothing is left in it (a file left there waits for restart recovery)."""
        folder = self.tmp
        with _TMP_LOCK:
            _TMP_USERS[folder] -= 1
            if _TMP_USERS[folder] > 0:
                return
            del _TMP_USERS[folder]
            with contextlib.suppress(OSError):  # not empty, or gone
                folder.rmdir()

    def free_bytes(self) -> int:
        """Free space on the spool filesystem for an unprivileged writer."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def check_space(self) -> None:
        """Raise :class:`OutOfSpaceError` if free space is below ``min_free_mb``."""
        floor = self.min_free_mb * 1024 * 1024
        free = self.free_bytes()
        if free < floor:
            raise OutOfSpaceError(
                f"free space {free // (1024 * 1024)} MB is below storage.min_free_mb "
                f"{self.min_free_mb} MB"
            )

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives; the UIDs must have passed :func:`is_valid_uid`."""
        return self.incoming / study_uid / series_uid / f"{sop_uid}.dcm"

    def series_metadata_path(self, study_uid: str, series_uid: str) -> Path:
        return self.incoming / study_uid / f"{series_uid}.json"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def commit_file(
        self, tmp_path: Path, final: Path, *, synced: bool = False, defer_folder_sync: bool = False
    ) -> None:
        """Make a received temporary file durable and move it to `final`.

        Parameters
        ----------
        tmp_path : Path
            The temporary file, on the spool filesystem.
        final : Path
            Its place under ``incoming/``; an existing file there is replaced atomically.
        synced : bool
            The caller has already fsynced `tmp_path`'s data (after its last write).
        defer_folder_sync : bool
            The index row holding the file's digest is committed: the folder's fsync may
            wait for :meth:`sync_folders` (see the module docstring) unless the rename
            replaces a file or the folder is new.
        """
        try:
            if not synced:
                fsync_file(tmp_path)
            created = self._makedirs(final.parent)
            defer = defer_folder_sync and not created and not os.path.lexists(final)
            os.replace(tmp_path, final)
            if defer:
                self._unsynced.add(final.parent)
                return
            _sync_entry(final, created)
        except OSError as exc:
            raise self.storage_error(exc) from exc

    def place_if_absent(self, path: Path, final: Path) -> bool:
        """Move `path` to `final` durably unless a file is there already (then False, `path`
        left alone): a recovered file never overwrites one a sender stored meanwhile."""
        try:
            fsync_file(path)
            created = self._makedirs(final.parent)
            try:
                os.link(path, final)
            except FileExistsError:
                return False
            _sync_entry(final, created)
            os.unlink(path)
        except OSError as exc:
            raise self.storage_error(exc) from exc
        return True

    def sync_folders(self) -> None:
        """fsync the folders whose renames :meth:`commit_file` left unsynced."""
        for folder in self._unsynced.take():
            try:
                fsync_dir(folder)
            except FileNotFoundError:
                pass  # removed since (its renames with it)
            except OSError as exc:
                raise self.storage_error(exc) from exc

    @staticmethod
    def storage_error(exc: OSError) -> StorageError:
        """The StorageError for a failed write (OutOfSpaceError when the disk is full)."""
        if exc.errno == errno.ENOSPC:
            return OutOfSpaceError(f"disk full while storing: {exc.strerror}")
        return StorageError(f"cannot store file: {exc.strerror or exc}")

    def _makedirs(self, folder: Path) -> list[Path]:
        created: list[Path] = []
        missing = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for item in reversed(missing):
            try:
                item.mkdir()
                created.append(item)
            except FileExistsError:
                pass
        return created

    def quarantine_file(
        self, source: Path, reason: str, now: datetime, facts: dict[str, Any]
    ) -> Path:
        """Move (or copy, across filesystems) bytes into the quarantine with the reason.

        Returns the quarantined file's path. The reason travels in a JSON sidecar so the
        folder is self-explaining even without the database.
        """
        folder = self.quarantine / now.strftime("%Y%m%d")
        folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        target = folder / f"{name}.dcm"
        try:
            if source.parent == self.tmp:
                fsync_file(source)
                os.replace(source, target)
            else:
                shutil.copyfile(source, target)
            write_json_atomic(
                folder / f"{name}.json",
                {"reason": reason, "quarantined_at": now.isoformat(), **facts},
            )
        except OSError as exc:
            raise StorageError(f"cannot quarantine file: {exc.strerror or exc}") from exc
        return target

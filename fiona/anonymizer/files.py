"""De-identify files and folders (``fiona anonymize``).

Outputs are named by their new UIDs, ``OUT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOP
InstanceUID>.dcm``: original file names often carry names or dates, so they are never reused.
A single input file may instead be written to an explicit ``OUT`` file name ending in ``.dcm``.
Each output is written to a temporary file and renamed into place, so an interrupted run leaves
no half-written file. Inputs are only read: a file that cannot be processed stays where it is
and is reported with the reason.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fiona.anonymizer.engine import Context, anonymize_bytes
from fiona.anonymizer.profile import Profile
from fiona.errors import DeidentificationError

__all__ = ["FolderReport", "anonymize_path", "iter_inputs"]

_DICOMDIR_CLASS = b"1.2.840.10008.1.3.10"


@dataclass
class FolderReport:
    """What ``anonymize_path`` did: counts and the files it could not process, with reasons."""

    written: int = 0
    unchanged: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)


def iter_inputs(source: Path) -> Iterator[Path]:
    """Every regular file under *source* (or *source* itself), in a stable order."""
    if source.is_file():
        yield source
        return
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_file():
                yield path


def _looks_like_dicom(head: bytes) -> bool:
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fiona-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def anonymize_path(
    source: Path,
    destination: Path,
    profile: Profile,
    context: Context,
    *,
    progress: Callable[[Path], None] | None = None,
) -> FolderReport:
    """De-identify *source* (a file or a folder, recursively) into *destination*."""
    report = FolderReport()
    single_target = (
        source.is_file() and destination.suffix.lower() == ".dcm" and not destination.is_dir()
    )
    for path in iter_inputs(source):
        try:
            _one(path, destination, single_target, profile, context, report)
        except OSError as exc:
            report.failed.append((path, f"{type(exc).__name__}: {exc.strerror or exc}"))
        if progress is not None:
            progress(path)
    return report


def _one(
    path: Path,
    destination: Path,
    single_target: bool,
    profile: Profile,
    context: Context,
    report: FolderReport,
) -> None:
    data = path.read_bytes()
    if not _looks_like_dicom(data[:132]):
        report.skipped.append((path, "not a DICOM file"))
        return
    if _DICOMDIR_CLASS in data[:400] and data[128:132] == b"DICM":
        report.skipped.append((path, "a DICOMDIR (build a new one from the output)"))
        return
    try:
        result = anonymize_bytes(data, profile, context)
    except DeidentificationError as exc:
        report.failed.append((path, str(exc)))
        return
    if not (result.study_instance_uid and result.series_instance_uid and result.sop_instance_uid):
        report.failed.append((path, "no Study, Series or SOP Instance UID to name the output"))
        return
    if single_target:
        target = destination
    else:
        target = (
            destination
            / result.study_instance_uid
            / result.series_instance_uid
            / f"{result.sop_instance_uid}.dcm"
        )
    if target.exists():
        if target.read_bytes() == result.data:
            report.unchanged += 1
            report.studies.add(result.study_instance_uid)
            return
        report.failed.append(
            (path, f"{target} exists with other content (two inputs share a SOP Instance UID)")
        )
        return
    _write_atomically(target, result.data)
    report.written += 1
    report.studies.add(result.study_instance_uid)

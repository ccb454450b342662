"""``fiona report tags``: every element of a study's original and de-identified data, side by side.

For checking data from an unknown source before a project goes live (an MMIV TODO): per
series, one instance (the first received) is de-identified with the project's profile exactly
as the forwarder would, and every non-empty element at any depth, private ones included, is
listed with its original and its de-identified value. Values that survived unchanged are the
ones to look at: an identifier in an unexpected place stays unchanged.

The output holds original values (patient data): protected output, for the screen of the
person checking the profile; FIONA never logs it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from io import BytesIO
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fiona.anonymizer.engine import anonymize_bytes
from fiona.anonymizer.projects import project_deidentification
from fiona.config import FionaConfig
from fiona.db import Instance, RequestStatus, Series, Study, TransferRequest

__all__ = ["Change", "ElementRow", "SeriesTags", "TagReportError", "tag_report"]

BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
SHOWN_LENGTH = 80


class TagReportError(Exception):
    """The report cannot be made (the message says why)."""


class Change(Enum):
    KEPT = "kept"
    """Present and unchanged in the output: check that it identifies nobody."""
    CHANGED = "changed"
    REMOVED = "removed"
    ADDED = "added"


@dataclass(frozen=True)
class ElementRow:
    path: str
    """``(gggg,eeee)``, nested as ``(0008,1140)[0].(0008,1155)``."""
    name: str
    vr: str
    original: str | None
    deidentified: str | None

    @property
    def change(self) -> Change:
        if self.original is None:
            return Change.ADDED
        if self.deidentified is None:
            return Change.REMOVED
        return Change.KEPT if self.original == self.deidentified else Change.CHANGED


@dataclass
class SeriesTags:
    series_instance_uid: str
    modality: str | None
    instances: int
    sop_instance_uid: str
    new_series_instance_uid: str | None
    rows: list[ElementRow] = field(default_factory=list)
    error: str | None = None
    """Why this series' instance could not be de-identified (the profile refuses it)."""


def _text(element: DataElement) -> str:
    """The element's value as compared and shown; binary values by length and digest."""
    value = element.value
    if element.VR in BINARY_VRS or isinstance(value, bytes | bytearray):
        raw = bytes(value) if isinstance(value, bytes | bytearray) else b""
        return f"<{len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()[:12]}>"
    if element.VM > 1:
        return "\\".join(str(v) for v in value)
    return str(value)


def _walk(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, DataElement]]:
    for element in ds:
        path = f"{prefix}({element.tag.group:04X},{element.tag.element:04X})"
        if element.VR == "SQ":
            for index, item in enumerate(element.value or ()):
                yield from _walk(item, f"{path}[{index}].")
            continue
        if element.value is None or element.value == "" or element.value == b"":
            continue
        yield path, element


def _name(element: DataElement) -> str:
    if element.tag.is_private:
        return f"private ({element.private_creator})" if element.private_creator else "private"
    return element.keyword or element.name


def compare(original: Dataset, deidentified: Dataset) -> list[ElementRow]:
    """Every non-empty element of either dataset, in original order, then additions."""
    before = dict(_walk(original))
    after = dict(_walk(deidentified))
    rows = [
        ElementRow(
            path,
            _name(element),
            element.VR,
            _text(element),
            _text(after[path]) if path in after else None,
        )
        for path, element in before.items()
    ]
    rows.extend(
        ElementRow(path, _name(element), element.VR, None, _text(element))
        for path, element in after.items()
        if path not in before
    )
    return rows


def tag_report(
    config: FionaConfig,
    session: Session,
    study_uid: str,
    project: str | None = None,
    pseudonym: str | None = None,
) -> tuple[str, list[SeriesTags]]:
    """(project, per-series comparison) for a received study."""
    # Data from the field (and MMIV's long UIDs) break VR rules: shown as they are.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        raise TagReportError(f"{study_uid}: FIONA holds no such study")
    requests = session.scalars(
        select(TransferRequest).where(
            TransferRequest.study_instance_uid == study_uid,
            TransferRequest.status != RequestStatus.CANCELLED,
        )
    ).all()
    if project is None:
        candidates = sorted({r.transfer_project_name for r in requests}) or sorted(config.projects)
        if len(candidates) != 1:
            raise TagReportError(
                "give --project: the study's requests or the configuration name "
                f"{', '.join(candidates) or 'no project'}"
            )
        project = candidates[0]
    settings = project_deidentification(config, project)
    request = next((r for r in requests if r.transfer_project_name == project), None)
    context = settings.context(
        pseudonym or (request.transfer_name if request else "PSEUDONYM"),
        event=request.transfer_event_name if request else "",
        site=(request.transfer_site or "") if request else "",
        date_offset_days=request.transfer_date_offset_days if request else None,
    )
    report: list[SeriesTags] = []
    for series in session.scalars(
        select(Series).where(Series.study_id == study.id).order_by(Series.id)
    ):
        first = session.scalars(
            select(Instance).where(Instance.series_id == series.id).order_by(Instance.id).limit(1)
        ).first()
        if first is None:
            continue
        count = session.scalar(
            select(func.count()).select_from(Instance).where(Instance.series_id == series.id)
        )
        entry = SeriesTags(
            series.series_instance_uid, series.modality, count or 0, first.sop_instance_uid, None
        )
        report.append(entry)
        data = (Path(config.storage.path) / first.path).read_bytes()
        original = dcmread(BytesIO(data))
        try:
            result = anonymize_bytes(data, settings.profile, context)
        except Exception as exc:  # noqa: BLE001  # DeidentificationError and what the profile raises
            entry.error = f"{type(exc).__name__}: {exc}"
            entry.rows = compare(original, Dataset())
            continue
        entry.new_series_instance_uid = result.series_instance_uid
        entry.rows = compare(original, dcmread(BytesIO(result.data)))
    return project, report

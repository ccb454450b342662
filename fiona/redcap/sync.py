"""Transfer requests from a REDCap project, FIONA's answers written back, arrived studies shown.

The contract is MMIV's "Incoming" REDCap project (``config/redcap/``): one record per study,
its record id the original StudyInstanceUID; the non-repeating instrument ``incoming_studies``
describes the study, the repeating ``series`` its series, and each instance of the repeating
``transfers`` is one transfer request. Project admins fill the request fields; FIONA fills the
rest. One :meth:`RedcapSource.sync` pass:

1. **Read requests**: every ``transfers`` row with a project name, no transfer date and a status
   other than ``cancelled`` (``filterLogic``). A row FIONA has not seen becomes a request in the
   ``transfer_requests`` table (source ``redcap``, ``external_ref`` = ``<record>#<instance>``);
   from there it is validated, held or processed exactly like a request made with ``fiona
   request add``. A row whose request fields changed since the last read is taken again if
   the request has not started sending (new, waiting, held, or failed before anything was
   prepared); a later change is refused with a message in the row (a new transfer is the way to
   send again) — the study's data never goes out under two pseudonyms by accident.
2. **Write status back**: for every request whose status changed since its last write
   (and every row refused at entry), the FIONA fields — ``transfer_status``, ``transfer_date``
   (only once ``sent``: MMIV's "transfer done" mark), ``transfer_mapped_uid``,
   ``transfer_error`` (checkbox), ``transfer_error_message`` — are compared with what REDCap
   holds and only differences are written: values with ``overwriteBehavior=normal``, and,
   because ``normal`` never blanks a field, cleared values in a second, ``overwrite`` call
   limited to those fields. Then they are read back; only values REDCap kept count as written.
3. **Incoming records** (``write_incoming``): each study that became stable since its last write
   gets its record (sender and called AE titles, PatientID/Name, description, date, accession)
   and a ``series`` instance per series with its file count; a late series gets a new instance.

Only this module knows REDCap's field names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from fiona.config import FionaConfig, RedcapConfig, read_token
from fiona.db import (
    Instance,
    RequestStatus,
    Series,
    Study,
    StudyState,
    TransferRequest,
)
from fiona.redcap.client import RedcapClient, RedcapError, Row
from fiona.requests import create_request, entry_problems, record_change, restart_request

__all__ = [
    "ERROR_CHOICES",
    "OPEN_REQUESTS",
    "RECORD_ID",
    "REQUEST_FIELDS",
    "STATUS_FIELDS",
    "RedcapSource",
    "SyncResult",
]

log = structlog.get_logger("fiona.redcap")

RECORD_ID = "study_instance_uid"
TRANSFERS = "transfers"
SERIES = "series"
REQUEST_FIELDS = (
    "transfer_project_name",
    "transfer_name",
    "transfer_event_name",
    "transfer_site",
    "transfer_date_offset_days",
    "transfer_requested_date",
    "transfer_requested_by",
)
"""Written by project admins; FIONA only reads them."""
STATUS_FIELDS = (
    "transfer_status",
    "transfer_date",
    "transfer_mapped_uid",
    "transfer_error",
    "transfer_error_message",
)
"""Written by FIONA (``@READONLY`` in the data dictionary)."""
ERROR_CHOICES = {"de-identification": "1", "sending": "2", "verification": "2", "held": "4"}
"""``transfer_error`` checkbox codes. 1 and 2 are MMIV's (3 is MMIV's "performed pixel
anonymization", which FIONA does not do); 4 is FIONA's "held"."""
_ERROR_CODES = sorted(set(ERROR_CHOICES.values()))
INCOMING_FIELDS = (
    "study_institution_name",
    "study_aetitle_sender",
    "study_aetitle_addressed",
    "study_patient_name",
    "study_patient_id",
    "study_description",
    "study_date",
    "study_time",
    "study_accession_number",
)
SERIES_FIELDS = (
    "series_instance_uid",
    "series_description",
    "series_date",
    "series_time",
    "series_num_files",
    "series_sequence_name",
)
OPEN_REQUESTS = (
    '[transfer_project_name] <> "" and [transfer_date] = "" and [transfer_status] <> "cancelled"'
)
"""The ``filterLogic`` of requests FIONA still has to look at."""
_CHUNK = 100
_INCOMING_BATCH = 50


@dataclass
class SyncResult:
    """What one pass did (counts; nothing identifying)."""

    created: int = 0
    changed: int = 0
    refused_changes: int = 0
    rejected: int = 0
    written: int = 0
    incoming: int = 0
    problems: list[str] = field(default_factory=list)
    """Per-row problems, for ``fiona request sync`` (may name record ids: not for logs)."""


def _ref(row: Row) -> str:
    return f"{row.get(RECORD_ID, '')}#{row.get('redcap_repeat_instance', '')}"


def _digest(row: Row) -> str:
    values = [row.get(name, "") for name in REQUEST_FIELDS]
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _local(moment: datetime) -> str:
    """REDCap's ``datetime_ymd`` in this machine's local time (what admins read)."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def _parse_requested(value: str) -> datetime | None:
    for pattern in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return datetime.strptime(value.strip(), pattern).astimezone()
        except ValueError:
            continue
    return None


class RedcapSource:
    """One REDCap project as the source of transfer requests."""

    def __init__(
        self,
        config: FionaConfig,
        session_factory: sessionmaker[Session],
        node_key: bytes,
        clock: Callable[[], datetime],
        client: RedcapClient | None = None,
    ) -> None:
        settings = config.requests.redcap
        if settings is None:
            raise ValueError("requests.source is not redcap")
        self.config = config
        self.settings: RedcapConfig = settings
        self.session_factory = session_factory
        self.node_key = node_key
        self.clock = clock
        self.client = client or RedcapClient(
            settings.url,
            lambda: read_token(settings.token_file),
            settings.timeout_seconds,
            settings.ca_file,
        )
        self._checked = False

    # -- the project's shape ---------------------------------------------------------------------

    def check_project(self) -> None:
        """Refuse a REDCap project that lacks FIONA's fields (a ``refused`` error naming them)."""
        metadata = self.client.metadata()
        names = {row.get("field_name", ""): row for row in metadata}
        needed = [RECORD_ID, *REQUEST_FIELDS, *STATUS_FIELDS]
        if self.settings.write_incoming:
            needed += [*INCOMING_FIELDS, *SERIES_FIELDS]
        problems = []
        missing = [name for name in needed if name not in names]
        if missing:
            problems.append(f"fields missing: {', '.join(missing)}")
        if metadata and metadata[0].get("field_name") != RECORD_ID:
            problems.append(f"the record id (first field) must be {RECORD_ID}")
        error = names.get("transfer_error")
        if error is not None:
            choices = {
                part.split(",", 1)[0].strip()
                for part in error.get("select_choices_or_calculations", "").split("|")
            }
            if error.get("field_type") != "checkbox" or not set(_ERROR_CODES) <= choices:
                problems.append(
                    f"transfer_error must be a checkbox with codes {', '.join(_ERROR_CODES)}"
                )
        repeating = self.client.repeating_forms()
        forms = {name: row.get("form_name", "") for name, row in names.items()}
        for name in ("transfer_project_name", "series_instance_uid"):
            form = forms.get(name)
            if form and form not in repeating and (name in needed):
                problems.append(f"instrument {form} (with {name}) must be repeating")
        if problems:
            raise RedcapError(
                "refused",
                "the REDCap project does not follow FIONA's data dictionary",
                "; ".join(problems) + " (see config/redcap/ in FIONA's sources)",
            )
        self._checked = True

    # -- one pass --------------------------------------------------------------------------------

    def sync(self) -> SyncResult:
        """Read requests, write statuses back, write Incoming records; raises RedcapError."""
        if not self._checked:
            self.check_project()
        result = SyncResult()
        rows = self.client.export_records(
            [RECORD_ID, *REQUEST_FIELDS, *STATUS_FIELDS], filter_logic=OPEN_REQUESTS
        )
        transfers = {
            _ref(row): row for row in rows if row.get("redcap_repeat_instrument") == TRANSFERS
        }
        rejected = self._take(transfers, result)
        self._write_back(transfers, rejected, result)
        if self.settings.write_incoming:
            self._write_incoming(result)
        return result

    def _take(self, rows: dict[str, Row], result: SyncResult) -> dict[str, str]:
        """Create and update requests from *rows*; returns rows refused at entry → why."""
        rejected: dict[str, str] = {}
        now = self.clock()
        with self.session_factory() as session, session.begin():
            known: dict[str, TransferRequest] = {}
            for refs in _chunks(sorted(rows)):
                for request in session.scalars(
                    select(TransferRequest).where(
                        TransferRequest.source == "redcap", TransferRequest.external_ref.in_(refs)
                    )
                ):
                    known[request.external_ref or ""] = request
            for ref, row in rows.items():
                found = known.get(ref)
                problems = self._problems(row)
                if found is None:
                    if problems:
                        rejected[ref] = "; ".join(problems)
                        result.rejected += 1
                        result.problems.append(f"{ref}: {rejected[ref]}")
                        continue
                    self._create(session, ref, row, now)
                    result.created += 1
                elif found.external_digest != _digest(row):
                    if problems:
                        found.external_digest = _digest(row)
                        found.transfer_error_message = (
                            f"change in REDCap not accepted: {'; '.join(problems)}"
                        )
                        found.updated_at = now
                        result.refused_changes += 1
                        result.problems.append(f"{ref}: {'; '.join(problems)}")
                    elif self._change(session, found, row, now):
                        result.changed += 1
                    else:
                        result.refused_changes += 1
        return rejected

    def _problems(self, row: Row) -> list[str]:
        problems = entry_problems(self.config, row.get(RECORD_ID, ""), "")
        problems = [p.replace("study_instance_uid", "the record id") for p in problems]
        offset = row.get("transfer_date_offset_days", "").strip()
        if offset and not offset.lstrip("-").isdigit():
            problems.append("transfer_date_offset_days is not a whole number")
        return problems

    @staticmethod
    def _values(row: Row) -> dict[str, Any]:
        offset = row.get("transfer_date_offset_days", "").strip()
        return {
            "project": row.get("transfer_project_name", "").strip(),
            "pseudonym": row.get("transfer_name", "").strip(),
            "event": row.get("transfer_event_name", "").strip(),
            "site": row.get("transfer_site", "").strip() or None,
            "date_offset_days": int(offset) if offset else None,
        }

    def _create(self, session: Session, ref: str, row: Row, now: datetime) -> None:
        request = create_request(
            session,
            study_instance_uid=row[RECORD_ID],
            requested_by=row.get("transfer_requested_by", "").strip() or "redcap",
            now=now,
            node_key=self.node_key,
            source="redcap",
            **self._values(row),
        )
        requested = _parse_requested(row.get("transfer_requested_date", ""))
        if requested is not None:
            request.transfer_requested_date = requested
        request.external_ref = ref
        request.external_digest = _digest(row)

    def _change(self, session: Session, request: TransferRequest, row: Row, now: datetime) -> bool:
        """Apply an admin's change if the request has not started; returns whether it did."""
        values = self._values(row)
        before = {
            "project": request.transfer_project_name,
            "pseudonym": request.transfer_name,
            "event": request.transfer_event_name,
            "site": request.transfer_site,
            "date_offset_days": request.transfer_date_offset_days,
        }
        fields = sorted(name for name, value in values.items() if before[name] != value)
        request.external_digest = _digest(row)
        open_ = (RequestStatus.NEW, RequestStatus.WAITING_FOR_DATA, RequestStatus.HELD)
        if not fields:
            return True  # only the requested date or requester changed
        if request.status in open_ or (
            request.status == RequestStatus.FAILED and request.study_id is None
        ):
            request.transfer_project_name = values["project"]
            request.transfer_name = values["pseudonym"]
            request.transfer_event_name = values["event"]
            request.transfer_site = values["site"]
            request.transfer_date_offset_days = values["date_offset_days"]
            restart_request(session, request, now, "redcap", RequestStatus.NEW, "edit",
                            fields=fields)  # fmt: skip
            return True
        request.transfer_error_message = (
            f"changed in REDCap after sending began ({', '.join(fields)}): not applied; "
            "add a new transfer to send the study again"
        )
        request.updated_at = now
        record_change(session, request, now, "redcap", "edit-refused",
                      previous=request.status.value, fields=fields)  # fmt: skip
        return False

    # -- status back to REDCap -------------------------------------------------------------------

    @staticmethod
    def _status_row(request: TransferRequest) -> Row:
        flags = set((request.transfer_error or "").split(","))
        codes = {ERROR_CHOICES[f] for f in flags if f in ERROR_CHOICES}
        row = {
            "transfer_status": request.status.value,
            "transfer_date": (
                _local(request.transfer_date)
                if request.status == RequestStatus.SENT and request.transfer_date
                else ""
            ),
            "transfer_mapped_uid": request.transfer_mapped_uid or "",
            "transfer_error_message": request.transfer_error_message or "",
        }
        for code in _ERROR_CODES:
            row[f"transfer_error___{code}"] = "1" if code in codes else "0"
        return row

    def _write_back(
        self, exported: dict[str, Row], rejected: dict[str, str], result: SyncResult
    ) -> None:
        desired: dict[str, Row] = {}
        versions: dict[str, tuple[int, int]] = {}
        with self.session_factory() as session:
            pending = session.scalars(
                select(TransferRequest)
                .where(
                    TransferRequest.source == "redcap",
                    TransferRequest.external_ref.is_not(None),
                    TransferRequest.external_synced_revision.is_(None)
                    | (TransferRequest.revision != TransferRequest.external_synced_revision),
                )
                .order_by(TransferRequest.id)
                .limit(500)
            ).all()
            for request in pending:
                ref = request.external_ref or ""
                desired[ref] = self._status_row(request)
                versions[ref] = (request.id, request.revision)
        for ref, reason in rejected.items():
            desired[ref] = {
                "transfer_status": RequestStatus.FAILED.value,
                "transfer_error_message": f"not accepted: {reason}",
            }
        if not desired:
            return
        current = {ref: row for ref, row in exported.items() if ref in desired}
        missing = sorted({ref.rsplit("#", 1)[0] for ref in desired if ref not in current})
        current.update(self._transfer_rows(missing))
        normal: list[Row] = []
        blank: list[Row] = []
        for ref, want in desired.items():
            have = current.get(ref)
            if have is None:
                request_id = versions[ref][0] if ref in versions else None
                log.warning("a request's REDCap row is gone: not written", request=request_id)
                continue
            key = {
                RECORD_ID: have[RECORD_ID],
                "redcap_repeat_instrument": TRANSFERS,
                "redcap_repeat_instance": have["redcap_repeat_instance"],
            }
            values = {k: v for k, v in want.items() if have.get(k, "") != v and v}
            blanks = {k: "" for k, v in want.items() if have.get(k, "") != v and not v}
            if values:
                normal.append({**key, **values})
            if blanks:
                blank.append({**key, **blanks})
        if normal:
            self.client.import_records(normal)
        if blank:
            self.client.import_records(blank, overwrite=True)
        if normal or blank:
            # Read back: only what REDCap kept counts as written.
            records = sorted({ref.rsplit("#", 1)[0] for ref in desired})
            current = self._transfer_rows(records)
        kept = [
            ref
            for ref, want in desired.items()
            if ref in current and all(current[ref].get(k, "") == v for k, v in want.items())
        ]
        lost = [ref for ref in desired if ref in current and ref not in kept]
        now = self.clock()
        with self.session_factory() as session, session.begin():
            for ref in kept:
                if ref not in versions:
                    continue
                request_id, revision = versions[ref]
                # A change committed meanwhile has a higher revision: it stays pending. This
                # UPDATE names ``revision`` itself, so it does not bump it.
                session.execute(
                    update(TransferRequest)
                    .where(TransferRequest.id == request_id)
                    .values(
                        external_synced_at=now,
                        external_synced_revision=revision,
                        revision=TransferRequest.revision,
                    )
                )
        result.written += len([ref for ref in kept if ref in versions])
        if lost:
            raise RedcapError(
                "refused",
                f"REDCap did not keep FIONA's status fields for {len(lost)} requests",
                "records: " + ", ".join(lost[:10]),
            )

    def _transfer_rows(self, records: Sequence[str]) -> dict[str, Row]:
        rows: dict[str, Row] = {}
        for chunk in _chunks(records):
            for row in self.client.export_records([RECORD_ID, *STATUS_FIELDS], records=chunk):
                if row.get("redcap_repeat_instrument") == TRANSFERS:
                    rows[_ref(row)] = row
        return rows

    # -- Incoming records ------------------------------------------------------------------------

    def _write_incoming(self, result: SyncResult) -> None:
        storage = self.config.storage.path
        with self.session_factory() as session:
            studies = session.scalars(
                select(Study)
                .where(
                    Study.state == StudyState.STABLE,
                    Study.incoming_written_stable_at.is_(None)
                    | (Study.stable_at != Study.incoming_written_stable_at),
                )
                .order_by(Study.id)
                .limit(_INCOMING_BATCH)
            ).all()
            if not studies:
                return
            plans = [(study.id, study.stable_at, self._study_rows(session, study, storage))
                     for study in studies]  # fmt: skip
        uids = [rows[0][RECORD_ID] for _, _, rows in plans if rows]
        known: dict[tuple[str, str], str] = {}
        last: dict[str, int] = {}
        for chunk in _chunks(uids):
            for row in self.client.export_records([RECORD_ID, "series_instance_uid"], chunk):
                if row.get("redcap_repeat_instrument") != SERIES:
                    continue
                instance = row.get("redcap_repeat_instance", "")
                known[(row[RECORD_ID], row.get("series_instance_uid", ""))] = instance
                if instance.isdigit():
                    last[row[RECORD_ID]] = max(last.get(row[RECORD_ID], 0), int(instance))
        out: list[Row] = []
        for _, _, rows in plans:
            for row in rows:
                if row.get("redcap_repeat_instrument") == SERIES:
                    key = (row[RECORD_ID], row["series_instance_uid"])
                    if key not in known:
                        last[row[RECORD_ID]] = last.get(row[RECORD_ID], 0) + 1
                        known[key] = str(last[row[RECORD_ID]])
                    row["redcap_repeat_instance"] = known[key]
                out.append(row)
        if out:
            self.client.import_records(out)
        now = self.clock()
        with self.session_factory() as session, session.begin():
            for study_id, stable_at, _ in plans:
                session.execute(
                    update(Study)
                    .where(Study.id == study_id)
                    .values(incoming_written_at=now, incoming_written_stable_at=stable_at)
                )
        result.incoming += len(plans)

    def _study_rows(self, session: Session, study: Study, storage: Path) -> list[Row]:
        """The Incoming record of *study* and one ``series`` row per series (instance unset).

        Each series' first instance is read once; the study's values come from its first.
        """
        firsts = dict(
            session.execute(
                select(Instance.series_id, func.min(Instance.id))
                .where(Instance.study_id == study.id)
                .group_by(Instance.series_id)
            ).all()
        )
        if not firsts:
            return []
        instances = {
            instance.id: instance
            for instance in session.scalars(
                select(Instance).where(Instance.id.in_(firsts.values()))
            )
        }
        headers = {
            instance_id: _header(storage / instance.path, (*_STUDY_TAGS, *_SERIES_TAGS))
            for instance_id, instance in instances.items()
        }
        first = instances[min(instances)]
        header = headers[first.id]
        rows: list[Row] = [
            {
                RECORD_ID: study.study_instance_uid,
                "redcap_repeat_instrument": "",
                "redcap_repeat_instance": "",
                "study_institution_name": header.get("InstitutionName", ""),
                "study_aetitle_sender": first.calling_ae_title,
                "study_aetitle_addressed": first.called_ae_title,
                "study_patient_name": header.get("PatientName", ""),
                "study_patient_id": header.get("PatientID", ""),
                "study_description": header.get("StudyDescription", ""),
                "study_date": header.get("StudyDate", ""),
                "study_time": header.get("StudyTime", ""),
                "study_accession_number": header.get("AccessionNumber", ""),
            }
        ]
        for series in session.scalars(
            select(Series).where(Series.study_id == study.id).order_by(Series.id)
        ):
            values = headers.get(firsts.get(series.id, -1), {})
            rows.append(
                {
                    RECORD_ID: study.study_instance_uid,
                    "redcap_repeat_instrument": SERIES,
                    "redcap_repeat_instance": "",
                    "series_instance_uid": series.series_instance_uid,
                    "series_description": values.get("SeriesDescription", ""),
                    "series_date": values.get("SeriesDate", ""),
                    "series_time": values.get("SeriesTime", ""),
                    "series_num_files": str(series.instance_count),
                    "series_sequence_name": values.get("SequenceName", ""),
                }
            )
        return rows


_STUDY_TAGS = (
    "PatientName",
    "PatientID",
    "InstitutionName",
    "StudyDescription",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
)
_SERIES_TAGS = ("SeriesDescription", "SeriesDate", "SeriesTime", "SequenceName")


def _header(path: Path, keywords: Sequence[str]) -> dict[str, str]:
    """The text of *keywords* in one stored file ({} if it cannot be read: logged, no values)."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))
    except Exception as exc:  # noqa: BLE001 - any unreadable file: the record is written without
        log.warning("header not readable for the REDCap record", error=type(exc).__name__)
        return {}
    out: dict[str, str] = {}
    for keyword in keywords:
        value = ds.get(keyword)
        if value is not None and value != "":
            out[keyword] = str(value).strip()
    return out

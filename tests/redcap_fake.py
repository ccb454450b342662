"""A local fake of the REDCap API, faithful to the parts FIONA uses.

It serves one project on ``http://127.0.0.1:<port>/api/`` built from FIONA's shipped data
dictionary (``config/redcap/``) with ``series`` and ``transfers`` repeating, and behaves as
REDCap's API documentation says:

* POST only, form-encoded; every call needs the project's token, else HTTP 403 with REDCap's
  ``{"error": "You do not have permissions to use the API"}``.
* ``content=metadata``, ``content=repeatingFormsEvents``.
* ``content=record`` export (``format=json``, ``type=flat``): ``fields[]``/``fields[n]``,
  ``records[]``, ``filterLogic`` (REDCap logic: ``[field]``, ``[checkbox(code)]``, strings,
  numbers, ``= <> != < > <= >=``, ``and``/``or``, parentheses), evaluated per row — a row of a
  repeating instrument sees its own fields and the record's non-repeating ones; checkbox fields
  expand to ``name___code`` columns; ``redcap_repeat_instrument``/``_instance`` columns; rows
  without data in the requested fields are left out.
* ``content=record`` import (``data`` JSON, ``overwriteBehavior`` normal/overwrite — normal
  never blanks a stored value, ``returnContent`` count/ids): unknown fields, fields of another
  instrument, non-repeating instruments given an instance, and values failing their validation
  (integer, datetime_ymd, checkbox 0/1) are refused with HTTP 400 and a REDCap-style message.
* Fault switches: :meth:`FakeRedcap.fault` queues answers (an HTTP status, an empty 200, a
  non-JSON 200) for the next calls; :attr:`FakeRedcap.delay` slows every answer down.

Every call is recorded in :attr:`FakeRedcap.calls` without its token; :attr:`tokens` keeps the
tokens seen (to check FIONA sends its token only in the body).
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

DICTIONARY = Path(__file__).resolve().parents[1] / "config" / "redcap"
DICTIONARY_CSV = DICTIONARY / "fiona_incoming_data_dictionary.csv"
TOKEN = "0123456789ABCDEF0123456789ABCDEF"
NO_PERMISSION = "You do not have permissions to use the API"

Key = tuple[str, int] | None
"""A row of a record: None for the non-repeating instruments, (instrument, instance)."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def load_dictionary(path: Path = DICTIONARY_CSV) -> list[dict[str, str]]:
    """The data dictionary as REDCap's ``content=metadata`` returns it."""
    names = {
        "Variable / Field Name": "field_name",
        "Form Name": "form_name",
        "Section Header": "section_header",
        "Field Type": "field_type",
        "Field Label": "field_label",
        "Choices, Calculations, OR Slider Labels": "select_choices_or_calculations",
        "Field Note": "field_note",
        "Text Validation Type OR Show Slider Number": "text_validation_type_or_show_slider_number",
        "Identifier?": "identifier",
        "Field Annotation": "field_annotation",
    }
    with path.open(newline="", encoding="utf-8") as fh:
        return [{names[k]: v for k, v in row.items() if k in names} for row in csv.DictReader(fh)]


# -- REDCap logic (the subset filterLogic needs) ---------------------------------------------

_TOKENS = re.compile(
    r"\s*(?:(?P<field>\[[a-z0-9_]+(?:\([A-Za-z0-9_]+\))?\])|\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)'"
    r"|(?P<num>-?\d+(?:\.\d+)?)|(?P<op><>|!=|>=|<=|=|>|<)|(?P<paren>[()])"
    r"|(?P<word>(?i:and|or)\b))"
)


def parse_logic(text: str) -> Callable[[Callable[[str], str]], bool]:
    """Compile REDCap logic into a predicate over a field lookup; ValueError if malformed."""
    tokens: list[tuple[str, str]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKENS.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"cannot parse logic at {text[position : position + 10]!r}")
        kind = match.lastgroup or ""
        value = match.group(kind)
        tokens.append(("str" if kind in ("dq", "sq") else kind, value))
        position = match.end()
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> tuple[str, str]:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("logic ends too early")
        pos += 1
        return tokens[pos - 1]

    def operand() -> Callable[[Callable[[str], str]], str]:
        kind, value = take()
        if kind == "field":
            name = value[1:-1]
            return lambda get: get(name)
        if kind in ("str", "num"):
            return lambda get: value
        raise ValueError(f"unexpected {value!r}")

    def factor() -> Callable[[Callable[[str], str]], bool]:
        token = peek()
        if token == ("paren", "("):
            take()
            inner = expression()
            if take() != ("paren", ")"):
                raise ValueError("missing )")
            return inner
        left = operand()
        kind, op = take()
        if kind != "op":
            raise ValueError(f"expected a comparison, got {op!r}")
        right = operand()
        return lambda get: _compare(left(get), op, right(get))

    def conjunction() -> Callable[[Callable[[str], str]], bool]:
        parts = [factor()]
        while (token := peek()) is not None and token[0] == "word" and token[1].lower() == "and":
            take()
            parts.append(factor())
        return lambda get: all(part(get) for part in parts)

    def expression() -> Callable[[Callable[[str], str]], bool]:
        parts = [conjunction()]
        while (token := peek()) is not None and token[0] == "word" and token[1].lower() == "or":
            take()
            parts.append(conjunction())
        return lambda get: any(part(get) for part in parts)

    predicate = expression()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos][1]!r}")
    return predicate


def _compare(left: str, op: str, right: str) -> bool:
    a: Any = left
    b: Any = right
    with contextlib.suppress(ValueError):
        a, b = float(left), float(right)
    if op == "=":
        return bool(a == b)
    if op in ("<>", "!="):
        return bool(a != b)
    if left == "" or right == "":
        return False  # REDCap: an empty value is never less or greater
    return bool({"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op])


# -- the project -----------------------------------------------------------------------------


class FakeRedcap:
    """One REDCap project behind a local HTTP API (see the module docstring)."""

    def __init__(
        self,
        token: str = TOKEN,
        dictionary: list[dict[str, str]] | None = None,
        repeating: tuple[str, ...] = ("series", "transfers"),
    ) -> None:
        self.token = token
        self.metadata = dictionary if dictionary is not None else load_dictionary()
        self.repeating = set(repeating)
        self.fields = {row["field_name"]: row for row in self.metadata}
        self.record_id = self.metadata[0]["field_name"]
        self.records: dict[str, dict[Key, dict[str, str]]] = {}
        self.calls: list[dict[str, Any]] = []
        self.tokens: list[str] = []
        self.delay = 0.0
        self._faults: deque[tuple[str, int]] = deque()
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # -- test-side helpers ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/api/"

    def fault(self, kind: str, status: int = 500, times: int = 1) -> None:
        """Answer the next *times* calls with ``status`` (HTTP *status*), ``empty`` or
        ``garbage`` (a 200 without JSON)."""
        with self._lock:
            self._faults.extend([(kind, status)] * times)

    def add_transfer(self, record: str, **values: str) -> int:
        """An admin adds a ``transfers`` instance to *record*; returns its instance number."""
        with self._lock:
            rows = self.records.setdefault(record, {None: {}})
            instance = 1 + max((k[1] for k in rows if k and k[0] == "transfers"), default=0)
            rows[("transfers", instance)] = {k: v for k, v in values.items() if v != ""}
            return instance

    def edit_transfer(self, record: str, instance: int, **values: str) -> None:
        with self._lock:
            row = self.records[record][("transfers", instance)]
            for name, value in values.items():
                if value == "":
                    row.pop(name, None)
                else:
                    row[name] = value

    def transfer(self, record: str, instance: int = 1) -> dict[str, str]:
        with self._lock:
            return dict(self.records.get(record, {}).get(("transfers", instance), {}))

    def base(self, record: str) -> dict[str, str]:
        with self._lock:
            return dict(self.records.get(record, {}).get(None, {}))

    def series(self, record: str) -> dict[int, dict[str, str]]:
        with self._lock:
            rows = self.records.get(record, {})
            return {k[1]: dict(v) for k, v in rows.items() if k and k[0] == "series"}

    def calls_of(self, content: str, action: str = "export") -> list[dict[str, Any]]:
        return [
            c
            for c in self.calls
            if c.get("content") == content and c.get("action", "export") == action
        ]

    # -- server --------------------------------------------------------------------------------

    def start(self) -> Self:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                self._reply(405, {"error": "The API accepts POST requests only"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8")
                status, answer = fake.handle(self.path, self.headers.get_content_type(), body)
                if fake.delay:
                    time.sleep(fake.delay)
                self._reply(status, answer)

            def _reply(self, status: int, answer: Any) -> None:
                raw = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (a timeout test)
                    self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the API -------------------------------------------------------------------------------

    def handle(self, path: str, content_type: str, body: str) -> tuple[int, Any]:
        if path.rstrip("/") != "/api":
            return 404, {"error": "not found"}
        with self._lock:
            if self._faults:
                kind, status = self._faults.popleft()
                if kind == "status":
                    return status, b"<html><body>Internal Server Error</body></html>"
                if kind == "empty":
                    return 200, b""
                return 200, b"<html>REDCap is being upgraded</html>"
        if content_type != "application/x-www-form-urlencoded":
            return 400, {"error": "The fake REDCap reads form-encoded POSTs only"}
        pairs = parse_qsl(body, keep_blank_values=True)
        params: dict[str, Any] = {}
        for name, value in pairs:
            if name == "token":
                self.tokens.append(value)
                continue
            base = re.sub(r"\[\d*\]$", "", name)
            if base != name:
                params.setdefault(base, []).append(value)
            else:
                params[name] = value
        token = next((value for name, value in pairs if name == "token"), "")
        with self._lock:
            self.calls.append(params)
            if token != self.token:
                return 403, {"error": NO_PERMISSION}
            try:
                return 200, self._dispatch(params)
            except ApiError as exc:
                return exc.status, {"error": str(exc)}

    def _dispatch(self, params: dict[str, Any]) -> Any:
        if params.get("format", "xml") != "json":
            raise ApiError(400, "The fake REDCap answers format=json only")
        content = params.get("content")
        if content == "metadata":
            return self.metadata
        if content == "repeatingFormsEvents":
            return [{"form_name": form, "custom_form_label": ""} for form in sorted(self.repeating)]
        if content == "record":
            if params.get("type", "flat") != "flat":
                raise ApiError(400, "The fake REDCap supports type=flat only")
            if params.get("action", "export") == "import":
                return self._import(params)
            if params.get("action", "export") == "export":
                return self._export(params)
        raise ApiError(400, 'The value of the parameter "content" is not valid')

    @staticmethod
    def _list(params: dict[str, Any], name: str) -> list[str]:
        value = params.get(name, [])
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return list(value)

    def _columns(self, name: str) -> list[str]:
        field = self.fields[name]
        if field["field_type"] == "checkbox":
            return [f"{name}___{code}" for code in self._choices(name)]
        return [name]

    def _choices(self, name: str) -> list[str]:
        choices = self.fields[name].get("select_choices_or_calculations", "")
        return [part.split(",", 1)[0].strip() for part in choices.split("|") if part.strip()]

    def _export(self, params: dict[str, Any]) -> list[dict[str, str]]:
        names = self._list(params, "fields")
        unknown = [n for n in names if n not in self.fields]
        if unknown:
            raise ApiError(
                400,
                'The following values in the parameter "fields" are not valid: '
                + ", ".join(f"'{n}'" for n in unknown),
            )
        wanted = [
            row["field_name"]
            for row in self.metadata
            if (not names or row["field_name"] in names) and row["field_type"] != "descriptive"
        ]
        if self.record_id not in wanted:
            wanted.insert(0, self.record_id)
        logic = params.get("filterLogic", "")
        try:
            predicate = parse_logic(logic) if logic.strip() else None
        except ValueError as exc:
            raise ApiError(400, f"The filterLogic is not valid: {exc}") from None
        records = self._list(params, "records") or list(self.records)
        out: list[dict[str, str]] = []
        for record in records:
            rows = self.records.get(record)
            if rows is None:
                continue
            for key in sorted(rows, key=lambda k: ("",) if k is None else (k[0], k[1])):
                form_fields = [
                    name
                    for name in wanted
                    if name != self.record_id and self._form_of_row(name, key)
                ]
                stored = rows[key]
                has_data = any(
                    stored.get(column, "") != ""
                    for name in form_fields
                    for column in self._columns(name)
                )
                only_id = len(wanted) == 1
                if not has_data and not (only_id and key is None):
                    continue
                if predicate is not None and not predicate(self._lookup(record, key)):
                    continue
                row = {self.record_id: record}
                if self.repeating:
                    row["redcap_repeat_instrument"] = key[0] if key else ""
                    row["redcap_repeat_instance"] = str(key[1]) if key else ""
                for name in wanted:
                    if name == self.record_id:
                        continue
                    in_row = self._form_of_row(name, key)
                    for column in self._columns(name):
                        if self.fields[name]["field_type"] == "checkbox" and in_row:
                            row[column] = stored.get(column, "0")
                        else:
                            row[column] = stored.get(column, "") if in_row else ""
                out.append(row)
        return out

    def _form_of_row(self, name: str, key: Key) -> bool:
        form = self.fields[name]["form_name"]
        if key is None:
            return form not in self.repeating
        return form == key[0]

    def _lookup(self, record: str, key: Key) -> Callable[[str], str]:
        rows = self.records[record]

        def get(reference: str) -> str:
            name, _, code = reference.partition("(")
            if name == self.record_id:
                return record
            if name not in self.fields:
                raise ApiError(400, f"The filterLogic names an unknown field: {name}")
            source = rows.get(key, {}) if self._form_of_row(name, key) else rows.get(None, {})
            if code:
                return source.get(f"{name}___{code.rstrip(')')}", "0")
            return source.get(name, "")

        return get

    def _import(self, params: dict[str, Any]) -> Any:
        try:
            data = json.loads(params.get("data", ""))
        except ValueError:
            raise ApiError(400, "The data being imported is not formatted correctly") from None
        if not isinstance(data, list):
            raise ApiError(400, "The data being imported is not formatted correctly")
        overwrite = params.get("overwriteBehavior", "normal") == "overwrite"
        columns = {
            column: name
            for name in self.fields
            for column in self._columns(name)
            if self.fields[name]["field_type"] != "descriptive"
        }
        errors: list[str] = []
        staged: list[tuple[str, Key, dict[str, str]]] = []
        for row in data:
            record = str(row.get(self.record_id, "")).strip()
            if not record:
                errors.append(f"a row has no {self.record_id}")
                continue
            instrument = str(row.get("redcap_repeat_instrument", "") or "")
            instance = str(row.get("redcap_repeat_instance", "") or "")
            key: Key = None
            if instrument:
                if instrument not in self.repeating:
                    errors.append(f"{record}: {instrument} is not a repeating instrument")
                    continue
                if not instance.isdigit() or int(instance) < 1:
                    errors.append(f"{record}: redcap_repeat_instance {instance!r} is not valid")
                    continue
                key = (instrument, int(instance))
            values: dict[str, str] = {}
            for column, value in row.items():
                if column in (self.record_id, "redcap_repeat_instrument", "redcap_repeat_instance"):
                    continue
                name = columns.get(column)
                if name is None:
                    errors.append(
                        "The following fields were not found in the project as real data "
                        f"fields: {column}"
                    )
                    continue
                if not self._form_of_row(name, key):
                    errors.append(
                        f"{record}: field {column} is not on instrument "
                        f"{key[0] if key else 'of the non-repeating part'}"
                    )
                    continue
                text = "" if value is None else str(value)
                problem = self._invalid(name, column, text)
                if problem:
                    errors.append(f'{record}, {column}, "{text}": {problem}')
                    continue
                values[column] = text
            staged.append((record, key, values))
        if errors:
            raise ApiError(400, "\n".join(errors))
        written: list[str] = []
        for record, key, values in staged:
            rows = self.records.setdefault(record, {None: {}})
            stored = rows.setdefault(key, {})
            for column, value in values.items():
                if value != "":
                    stored[column] = value
                elif overwrite:
                    stored.pop(column, None)
            if record not in written:
                written.append(record)
        if params.get("returnContent", "count") == "ids":
            return written
        return {"count": len(written)}

    def _invalid(self, name: str, column: str, value: str) -> str:
        if value == "":
            return ""
        field = self.fields[name]
        if field["field_type"] == "checkbox":
            return "" if value in ("0", "1") else "checkbox values are 0 or 1"
        validation = field.get("text_validation_type_or_show_slider_number", "")
        if validation == "integer" and not re.fullmatch(r"-?\d+", value):
            return "the value is not an integer"
        if validation == "datetime_ymd" and not re.fullmatch(
            r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", value
        ):
            return "the value is not a datetime in Y-M-D H:M format"
        return ""

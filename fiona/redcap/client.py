"""A small client of the REDCap API: records and metadata, nothing else FIONA needs.

REDCap's API is one endpoint taking form-encoded POSTs (``token``, ``content``, ``format``…)
and answering JSON. What can go wrong, and what FIONA does about it:

* **transient** — a timeout, a refused connection, a 5xx, or a 200 whose body is empty or not
  JSON (REDCap behind a proxy that is restarting does that): the call is tried again a few
  times with a growing pause; if it still fails, the poll gives up and the poller backs off.
* **forbidden** — 401/403: the token is wrong, revoked, or lacks the API right. Retrying cannot
  help; the poller raises an alert and waits for a new token (never a retry loop).
* **refused** — another 4xx: REDCap understood and said no (a field missing from the project,
  bad filter logic, a value failing validation). A configuration problem: alert, no loop.

The token travels only in POST bodies, never in a URL, a log line or an exception. REDCap's
error text can quote record values (patient names of "Incoming" records), so it is kept on the
exception for the operator's terminal (``fiona request sync``) and never logged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import requests

__all__ = ["RedcapClient", "RedcapError", "Row"]

Row = dict[str, str]
"""One row of a flat record export/import: field name → text."""

Kind = Literal["transient", "forbidden", "refused"]


class RedcapError(Exception):
    """A failed API call. ``kind`` says what to do; ``str()`` is safe to log, ``detail`` (REDCap's
    own message, which may quote record values) is not."""

    def __init__(self, kind: Kind, summary: str, detail: str = "") -> None:
        super().__init__(summary)
        self.kind: Kind = kind
        self.detail = detail


class RedcapClient:
    """Calls one REDCap project's API with the token read by *token* (at every call)."""

    def __init__(
        self,
        url: str,
        token: Callable[[], str],
        timeout: float = 30.0,
        ca_file: Path | None = None,
        attempts: int = 3,
        pause: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self._token = token
        self.timeout = timeout
        self.verify: bool | str = str(ca_file) if ca_file is not None else True
        self.attempts = attempts
        self.pause = pause
        self._sleep = sleep
        self._http = requests.Session()
        self._http.trust_env = False  # no proxy from the environment sees the token

    def close(self) -> None:
        self._http.close()

    # -- the API calls FIONA makes -------------------------------------------------------------

    def metadata(self) -> list[Row]:
        """The project's data dictionary (``content=metadata``)."""
        return self._rows(self.call({"content": "metadata"}))

    def repeating_forms(self) -> set[str]:
        """Instruments set up as repeating (``content=repeatingFormsEvents``)."""
        return {
            row.get("form_name", "")
            for row in self._rows(self.call({"content": "repeatingFormsEvents"}))
        }

    def export_records(
        self,
        fields: Sequence[str],
        records: Iterable[str] = (),
        filter_logic: str = "",
    ) -> list[Row]:
        """Flat rows of ``content=record`` (raw values), limited to *fields* and *records*."""
        params: list[tuple[str, str]] = [
            ("content", "record"),
            ("action", "export"),
            ("type", "flat"),
            ("rawOrLabel", "raw"),
        ]
        params += [(f"fields[{i}]", name) for i, name in enumerate(fields)]
        params += [(f"records[{i}]", record) for i, record in enumerate(records)]
        if filter_logic:
            params.append(("filterLogic", filter_logic))
        return self._rows(self.call(params))

    def import_records(self, rows: Sequence[Row], overwrite: bool = False) -> int:
        """Write *rows*; returns REDCap's count of records written.

        ``overwrite=False`` is REDCap's ``normal``: a blank value leaves the stored one alone;
        ``True`` blanks it.
        """
        answer = self.call(
            [
                ("content", "record"),
                ("action", "import"),
                ("type", "flat"),
                ("overwriteBehavior", "overwrite" if overwrite else "normal"),
                ("forceAutoNumber", "false"),
                ("returnContent", "count"),
                ("data", json.dumps(list(rows))),
            ]
        )
        if not isinstance(answer, dict) or not isinstance(answer.get("count"), int | str):
            raise RedcapError("transient", "REDCap's import answer has no count")
        return int(answer["count"])

    # -- the transport -------------------------------------------------------------------------

    def call(self, params: dict[str, str] | list[tuple[str, str]]) -> Any:
        """POST one API call and return the decoded JSON, retrying transient failures."""
        items = list(params.items()) if isinstance(params, dict) else list(params)
        for attempt in range(1, self.attempts + 1):
            try:
                return self._post(items)
            except RedcapError as exc:
                if exc.kind != "transient" or attempt == self.attempts:
                    raise
                self._sleep(self.pause * 2 ** (attempt - 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _post(self, items: list[tuple[str, str]]) -> Any:
        body = [("token", self._token()), *items, ("format", "json"), ("returnFormat", "json")]
        try:
            response = self._http.post(
                self.url, data=body, timeout=self.timeout, verify=self.verify,
                allow_redirects=False,
            )  # fmt: skip
        except requests.Timeout:
            raise RedcapError("transient", f"no answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            # The message of a connection error names the URL, never the body (the token).
            raise RedcapError("transient", f"cannot reach REDCap: {type(exc).__name__}") from None
        status = response.status_code
        text = response.text
        if status in (401, 403):
            raise RedcapError(
                "forbidden", f"REDCap refused the token (HTTP {status})", _message(text)
            )
        if status >= 500 or status in (408, 429):
            raise RedcapError("transient", f"REDCap answered HTTP {status}", _message(text))
        if status >= 300:
            raise RedcapError("refused", f"REDCap refused the call (HTTP {status})", _message(text))
        if not text.strip():
            raise RedcapError("transient", "REDCap answered with an empty body")
        try:
            answer = json.loads(text)
        except ValueError:
            raise RedcapError("transient", "REDCap's answer is not JSON") from None
        if isinstance(answer, dict) and "error" in answer:
            raise RedcapError("refused", "REDCap reported an error", str(answer["error"]))
        return answer

    @staticmethod
    def _rows(answer: Any) -> list[Row]:
        if not isinstance(answer, list) or not all(isinstance(row, dict) for row in answer):
            raise RedcapError("transient", "REDCap's answer is not a list of rows")
        return [{str(k): "" if v is None else str(v) for k, v in row.items()} for row in answer]


def _message(text: str) -> str:
    try:
        answer = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(answer, dict) and "error" in answer:
        return str(answer["error"])
    return text[:2000]

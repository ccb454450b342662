"""Configuration: one YAML file, validated at start-up into a frozen, typed object.

Every error names the file and the key path (``node.port``) and the CLI exits with
status 2. Relative paths (the storage folder, a SQLite file) resolve against the folder
that holds the configuration file, so a configuration works from any working directory.

Later stages add their sections (``destinations``, ``routing``, ``requests``) as further
fields of :class:`FionaConfig`; unknown keys are errors, so a typo never passes silently.
"""

from __future__ import annotations

import ipaddress
import os
import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url

from fiona.errors import ConfigError

__all__ = [
    "DatabaseConfig",
    "DestinationConfig",
    "DestinationTls",
    "DicomDestination",
    "DicomWebDestination",
    "FionaConfig",
    "FolderDestination",
    "ForwardingConfig",
    "LoggingConfig",
    "NodeConfig",
    "NodeTls",
    "ProjectConfig",
    "RedcapConfig",
    "RequestsConfig",
    "RoutingConfig",
    "StorageConfig",
    "load_config",
    "read_secret",
    "read_token",
    "resolve_config_path",
]

ENV_VAR = "FIONA_CONFIG"

# PS3.5 6.2: AE is 16 characters of the default repertoire, no backslash or control
# characters; leading/trailing spaces are not significant and a title of spaces is invalid.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)"
        )
    return value.strip()


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _existing_file(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"{value} is not a readable file")
    return value


class NodeTls(_Frozen):
    """A second, TLS-only listener of the SCP (DICOM TLS, usually port 2762)."""

    port: Annotated[int, Field(ge=1, le=65535)]
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    """If set, a client must present a certificate signed by these CAs."""

    _files = field_validator("cert_file", "key_file", "ca_file")(_existing_file)


class DestinationTls(_Frozen):
    """DICOM TLS towards a destination; its certificate is always verified."""

    ca_file: Path | None = None
    """CAs that sign the destination's certificate (default: the system's)."""
    cert_file: Path | None = None
    key_file: Path | None = None
    """FIONA's client certificate, if the destination asks for one."""
    server_hostname: str | None = None
    """The name in the destination's certificate (default: ``host``)."""

    _files = field_validator("cert_file", "key_file", "ca_file")(_existing_file)

    @model_validator(mode="after")
    def _pair(self) -> DestinationTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class NodeConfig(_Frozen):
    """The DICOM node FIONA runs (its SCP)."""

    ae_title: str = "FIONA"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 11112
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 20
    """Per receiving process."""
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    """Receiving processes sharing the listening socket (a busy one leaves new associations
    to an idle one); one per core scales best."""
    accept_any_called_ae: bool = False
    """Accept every called AE title (FIONA's historical "promiscuous" mode)."""
    allowed_calling_ae_titles: tuple[str, ...] = ()
    """If not empty, only these calling AE titles may associate."""
    allowed_peers: tuple[str, ...] = ()
    """If not empty, only peers in these addresses/networks (CIDR) may associate."""
    maximum_pdu_size: Annotated[int, Field(ge=0)] = 1_048_576
    """Largest P-DATA PDU FIONA accepts (0 = no limit). Large PDUs cost less CPU."""
    acse_timeout: Annotated[float, Field(gt=0)] = 30.0
    dimse_timeout: Annotated[float, Field(gt=0)] = 60.0
    network_timeout: Annotated[float, Field(gt=0)] = 60.0
    tls: NodeTls | None = None
    """An additional DICOM TLS listener."""

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _calling(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v) for v in value)

    @field_validator("allowed_peers")
    @classmethod
    def _peers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an IP address or network: {exc}") from None
        return value

    def peer_allowed(self, address: str) -> bool:
        """Return whether a peer address may associate (``allowed_peers``)."""
        if not self.allowed_peers:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net, strict=False) for net in self.allowed_peers)


class DicomDestination(_Frozen):
    """A DICOM peer FIONA C-STOREs to (the research PACS)."""

    kind: Literal["dicom"]
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    ae_title: str
    """The called AE title."""
    calling_ae_title: str | None = None
    """Default: ``node.ae_title``."""
    max_associations: Annotated[int, Field(ge=1, le=32)] = 2
    """Parallel associations to this destination."""
    timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """Seconds for the association, each DIMSE exchange and the network."""
    batch_size: Annotated[int, Field(ge=1, le=10000)] = 200
    """Instances sent per association (one series at most)."""
    verify: bool = False
    """After a request is delivered, C-FIND the new study here and compare instance counts."""
    tls: DestinationTls | None = None

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _titles(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)


class FolderDestination(_Frozen):
    """A folder the de-identified files are written to (``<path>/<project>/<Study>/…``)."""

    kind: Literal["folder"]
    path: Path
    max_associations: Annotated[int, Field(ge=1, le=32)] = 1
    """Parallel writers."""
    batch_size: Annotated[int, Field(ge=1, le=10000)] = 500


class DicomWebDestination(_Frozen):
    """A DICOMweb service FIONA stores to with STOW-RS (``POST <url>/studies``)."""

    kind: Literal["dicomweb"]
    url: str
    """The DICOMweb root, e.g. ``https://pacs.example.org/dicom-web``."""
    username: str | None = None
    password_file: Path | None = None
    """HTTP basic authentication; the password is read from this file, never logged."""
    ca_file: Path | None = None
    """CA bundle for https (default: the system's)."""
    max_associations: Annotated[int, Field(ge=1, le=32)] = 2
    """Parallel requests."""
    timeout: Annotated[float, Field(gt=0, le=3600)] = 120.0
    batch_size: Annotated[int, Field(ge=1, le=10000)] = 50
    """Instances per STOW-RS request (one series at most)."""

    _files = field_validator("password_file", "ca_file")(_existing_file)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _auth(self) -> DicomWebDestination:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


DestinationConfig = Annotated[
    DicomDestination | FolderDestination | DicomWebDestination, Field(discriminator="kind")
]


class ForwardingConfig(_Frozen):
    """Retries and the circuit breaker, for every destination."""

    retry_base_seconds: Annotated[float, Field(gt=0, le=86400)] = 10.0
    """First retry after about this long; each further one waits twice as long (with jitter)."""
    retry_cap_seconds: Annotated[float, Field(gt=0, le=86400)] = 900.0
    """Longest wait between two attempts. Transient failures are retried without end."""
    breaker_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    """Consecutive failed associations that open a destination's circuit breaker."""
    breaker_probe_seconds: Annotated[float, Field(gt=0, le=86400)] = 30.0
    """While open, C-ECHO (or check the folder) this often; resume when it answers."""
    poll_seconds: Annotated[float, Field(gt=0, le=3600)] = 1.0
    """How often idle senders look for due work, and the pipeline for new instances."""
    stream_while_receiving: bool = True
    """A request whose study is still arriving is prepared and sent as instances come in; it
    is complete (``sent``) only once the study is stable and every instance is delivered.
    ``false``: wait until the study is stable before sending anything."""
    separate_process: bool = True
    """``fiona serve`` runs de-identification and sending in a process of its own, so that
    they do not compete with receiving for one interpreter lock. ``false``: threads of the
    receiving process (fewer processes, slower when both are busy)."""


class StorageConfig(_Frozen):
    """The spool: original files, quarantine and temporary files, on one filesystem."""

    path: Path = Path("var")
    min_free_mb: Annotated[int, Field(ge=0)] = 512


class DatabaseConfig(_Frozen):
    """The ledger: SQLite (embedded default) or PostgreSQL."""

    url: str = "sqlite:///var/fiona.db"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except Exception as exc:  # noqa: BLE001 - sqlalchemy raises several types here
            raise ValueError(f"not a database URL: {exc}") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite:/// and postgresql+psycopg:// URLs are supported")
        if url.get_backend_name() == "postgresql" and url.get_driver_name() not in ("psycopg",):
            raise ValueError("use the psycopg 3 driver: postgresql+psycopg://user@host/db")
        return value


class LoggingConfig(_Frozen):
    """Operator logs: JSON lines on stdout."""

    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value


class ApprovalConfig(_Frozen):
    """The ethics/data-protection approval that allows a project to receive data."""

    reference: str = ""
    """E.g. ``REK 2020/123``: shown in holds and audit rows."""
    start: date | None = None
    end: date | None = None
    """Inclusive: data is forwarded on ``end`` and held from the day after."""

    @model_validator(mode="after")
    def _order(self) -> ApprovalConfig:
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError("end is before start")
        return self

    def covers(self, day: date) -> bool:
        return (self.start is None or self.start <= day) and (self.end is None or day <= self.end)


class ProjectConfig(_Frozen):
    """A research project: its AE titles and how its data is de-identified.

    ``profile`` is a built-in profile name (``mmiv``, ``dzhk``, ``basic``) or a path to a
    profile YAML file. ``uid_scheme`` ``hmac`` (the default for new projects) keys UIDs with
    the project's secret: ``secret_file`` (at least 16 bytes, never logged) or, when unset,
    ``<storage>/secrets/<ID>.key``, created on first use (back it up: without it, later data
    no longer maps to the same UIDs). (Issue 6 adds routing, destinations, pseudonym patterns
    and approval windows.)
    """

    number: str | None = None
    """The project's number (``P<yy>_<nn>``, e.g. ``P20_01``): usable wherever its id is."""
    ae_titles: tuple[str, ...] = ()
    """Called AE titles that mean "this project" (mode B: the sender is trusted)."""
    active: bool = True
    destinations: tuple[str, ...] = ()
    """Names from ``destinations:``; every de-identified instance goes to each."""
    profile: str = "basic"
    uid_scheme: Literal["mmiv", "mmiv-hex", "hmac"] = "hmac"
    secret_file: Path | None = None
    date_offset_days: Annotated[int, Field(ge=-36500, le=36500)] = 42
    pseudonym_pattern: str | None = None
    """A regular expression every pseudonym must match in full (e.g. ``^BICAM\\d{3}$``);
    requests with another pseudonym are held."""
    approval: ApprovalConfig | None = None
    """Requests outside the approval window are held."""
    sites: dict[str, str] = {}
    """Site code → name; a request's site goes to ClinicalTrialSiteID, its name to
    ClinicalTrialSiteName (where the profile writes them)."""
    drop: tuple[str, ...] = ()
    """Modalities never forwarded for this project (e.g. ``[PR, SC]``)."""

    @field_validator("number")
    @classmethod
    def _number(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"P\d{2}_\d{2}", value):
            raise ValueError(f"{value!r} is not a project number like P20_01")
        return value

    @field_validator("pseudonym_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    def pseudonym_problem(self, pseudonym: str) -> str | None:
        """Why *pseudonym* is not acceptable for this project (None: it is)."""
        if not pseudonym.strip():
            return "the pseudonym is empty"
        if self.pseudonym_pattern is not None and not re.fullmatch(
            self.pseudonym_pattern, pseudonym
        ):
            return f"the pseudonym does not match the project's pattern {self.pseudonym_pattern}"
        return None

    @model_validator(mode="after")
    def _deidentification(self) -> ProjectConfig:
        from fiona.anonymizer.profile import load_profile

        try:
            load_profile(self.profile)
        except ConfigError as exc:
            raise ValueError(f"profile {self.profile!r}: {exc}") from None
        if self.secret_file is not None:
            read_secret(self.secret_file)
        return self

    @field_validator("ae_titles")
    @classmethod
    def _ae_titles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v) for v in value)


class RedcapConfig(_Frozen):
    """A REDCap project holding the transfer requests (``requests.source: redcap``).

    The project follows MMIV's "Incoming" data dictionary (``config/redcap/``): one record per
    study, its record id the StudyInstanceUID, with the repeating instruments ``series`` and
    ``transfers``.
    """

    url: str
    """The API endpoint, e.g. ``https://redcap.example.org/api/``. Plain ``http`` is refused
    except to this machine (the token would travel in clear)."""
    token_file: Path
    """A file holding the project's API token (32 hex digits); only FIONA's user may read it.
    Read again at every poll, so a new token needs no restart."""
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    """How long one API call may take before it counts as failed (and is retried later)."""
    ca_file: Path | None = None
    """CAs that sign the REDCap server's certificate (default: the system's)."""
    write_incoming: bool = True
    """Write a record for every received study (and its series) so that project admins see
    arrived studies in REDCap, as MMIV FIONA does. The record holds the study's PatientID and
    PatientName: REDCap must be protected like FIONA's own database."""
    max_backoff_seconds: Annotated[float, Field(gt=0, le=86400)] = 900.0
    """Longest wait between two polls while REDCap fails (timeouts, 5xx, garbled answers)."""

    _ca = field_validator("ca_file")(_existing_file)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL of the REDCap API, e.g. https://host/api/")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("use https: the API token would travel in clear over http")
        return value

    @field_validator("token_file")
    @classmethod
    def _token_file(cls, value: Path) -> Path:
        read_token(value)
        return value


class RequestsConfig(_Frozen):
    """Where transfer requests come from.

    ``table`` (the default): FIONA's own ``transfer_requests`` table, filled by ``fiona request
    add``/``import`` (and later the web interface); the forwarder looks at it every
    ``forwarding.poll_seconds``. ``redcap``: a REDCap project, read every ``poll_seconds``
    (requests land in the same table; FIONA writes their status back).
    """

    source: Literal["table", "redcap"] = "table"
    poll_seconds: Annotated[float, Field(gt=0, le=86400)] = 10.0
    """How often an external source is read (unused by ``table``, which is local)."""
    redcap: RedcapConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _redcap_section(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("source") == "redcap":
            if data.get("redcap") is None:
                raise ValueError("source redcap needs a redcap: {url, token_file} section")
            return {"poll_seconds": 60.0, **data}  # a remote server: once a minute
        if data.get("redcap") is not None:
            raise ValueError("a redcap section is only read with source: redcap")
        return data


_TOKEN = re.compile(r"[0-9A-Fa-f]{32}|[0-9A-Fa-f]{64}")


def read_token(path: Path) -> str:
    """A REDCap API token from *path* (the value never appears in an error)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise ValueError(f"cannot read token_file {path}: {reason or exc}") from None
    if mode & 0o007:
        raise ValueError(f"token_file {path} is readable by other users: chmod 600 it")
    if not _TOKEN.fullmatch(text):
        raise ValueError(f"token_file {path} does not hold a REDCap API token (32 hex digits)")
    return text


class RoutingConfig(_Frozen):
    """Routing of stable studies to projects (besides project AE titles)."""

    rules_file: Path | None = None
    """The routing rules (``rules/routing.yaml``); read at start-up and on SIGHUP."""
    coupling_expire_days: Annotated[int, Field(ge=1, le=36500)] = 90
    """Coupling-list entries older than this no longer assign studies."""
    unassigned_retention_days: Annotated[int, Field(ge=1, le=36500)] | None = None
    """Delete studies no request ever named this many days after their last instance (after
    the warning period). ``null`` (the default): keep them until someone decides."""
    retention_warning_days: Annotated[int, Field(ge=1, le=3650)] = 7
    """Announce each deletion (audit row, log line) at least this long before it happens."""

    @model_validator(mode="after")
    def _warning_inside_retention(self) -> RoutingConfig:
        days = self.unassigned_retention_days
        if days is not None and self.retention_warning_days >= days:
            raise ValueError("retention_warning_days must be shorter than the retention")
        return self


class WebConfig(_Frozen):
    """The web interface and HTTP API that ``fiona serve`` serves (``fiona/web/``)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    """Loopback by default: put a TLS reverse proxy in front to serve other machines."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    secure_cookies: bool = False
    """Send the session cookie only over HTTPS (set it behind a TLS proxy)."""
    session_hours: Annotated[float, Field(gt=0, le=24 * 30)] = 8.0
    """A login lasts this long."""
    login_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    """Failed logins per user name and per address within ``login_window_seconds`` before
    further attempts are refused (HTTP 429) until the window has passed."""
    login_window_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0
    max_upload_mb: Annotated[int, Field(ge=1, le=1024 * 1024)] = 4096
    """Largest web upload of DICOM data (files or a zip, uncompressed) accepted at once."""


class FionaConfig(_Frozen):
    """The whole configuration, frozen. Pass it explicitly; there is no global."""

    source: Path = Path("<defaults>")
    node: NodeConfig = NodeConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    logging: LoggingConfig = LoggingConfig()
    stable_after_seconds: Annotated[float, Field(gt=0, le=86400)] = 15.0
    projects: dict[str, ProjectConfig] = {}
    destinations: dict[str, DestinationConfig] = {}
    forwarding: ForwardingConfig = ForwardingConfig()
    requests: RequestsConfig = RequestsConfig()
    routing: RoutingConfig = RoutingConfig()
    web: WebConfig | None = None
    """Without a ``web:`` section (or with ``enabled: false``) no web interface is served."""

    @field_validator("destinations")
    @classmethod
    def _destination_names(
        cls, value: dict[str, DicomDestination | FolderDestination | DicomWebDestination]
    ) -> dict[str, DicomDestination | FolderDestination | DicomWebDestination]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
                raise ValueError(f"destination name {name!r}: letters, digits, _ . - (≤ 64)")
        return value

    @model_validator(mode="after")
    def _known_destinations(self) -> FionaConfig:
        for name, project in self.projects.items():
            for destination in project.destinations:
                if destination not in self.destinations:
                    known = ", ".join(sorted(self.destinations)) or "none"
                    raise ValueError(
                        f"project {name}: unknown destination {destination!r} (defined: {known})"
                    )
        return self

    @field_validator("projects")
    @classmethod
    def _project_names(cls, value: dict[str, ProjectConfig]) -> dict[str, ProjectConfig]:
        for name in value:
            if not re.fullmatch(r"[A-Z][A-Z0-9]{2,}", name):
                raise ValueError(f"project id {name!r} must be capitals/digits, 3+ characters")
        return value

    @model_validator(mode="after")
    def _unique_ae_titles(self) -> FionaConfig:
        seen: dict[str, str] = {self.node.ae_title: "node.ae_title"}
        for name, project in self.projects.items():
            for aet in project.ae_titles:
                if aet in seen:
                    raise ValueError(
                        f"AE title {aet!r} of project {name} is already used by {seen[aet]}"
                    )
                seen[aet] = f"project {name}"
        return self

    @model_validator(mode="after")
    def _unique_numbers(self) -> FionaConfig:
        seen: dict[str, str] = {}
        for name, project in self.projects.items():
            if project.number is None:
                continue
            if project.number in seen:
                raise ValueError(
                    f"project number {project.number} of {name} is also {seen[project.number]}'s"
                )
            if project.number in self.projects:
                raise ValueError(f"project number {project.number} is also a project id")
            seen[project.number] = name
        return self

    def project_id(self, name_or_number: str) -> str | None:
        """The id of the project called *name_or_number* (its id or its number), or None."""
        if name_or_number in self.projects:
            return name_or_number
        for name, project in self.projects.items():
            if project.number is not None and project.number == name_or_number:
                return name
        return None

    @property
    def accepted_called_ae_titles(self) -> frozenset[str]:
        """Called AE titles the SCP answers to (unless ``accept_any_called_ae``)."""
        titles = {self.node.ae_title}
        for project in self.projects.values():
            titles.update(project.ae_titles)
        return frozenset(titles)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, the database password masked."""
        data = self.model_dump(mode="json")
        url = make_url(self.database.url)
        if url.password:
            data["database"]["url"] = url.render_as_string(hide_password=True)
        return data


def read_secret(path: Path) -> bytes:
    """A project secret: the file's bytes (surrounding whitespace dropped if it is text)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read secret_file {path}: {exc.strerror or exc}") from None
    if data.isascii():
        data = data.strip()
    if len(data) < 16:
        raise ValueError(f"secret_file {path} holds {len(data)} bytes; at least 16 are needed")
    return data


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """Return the configuration path from ``--config`` or ``$FIONA_CONFIG``."""
    if path is None:
        path = os.environ.get(ENV_VAR)
    if not path:
        raise ConfigError(
            "<command line>", [("", f"no configuration: pass --config or set {ENV_VAR}")]
        )
    return Path(path)


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    storage = raw.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("path"), str):
        path = Path(storage["path"]).expanduser()
        storage["path"] = str(path if path.is_absolute() else (base / path).resolve())
    database = raw.get("database")
    if isinstance(database, dict) and isinstance(database.get("url"), str):
        url = database["url"]
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rest = url[len("sqlite:///") :]
            if rest and not rest.startswith(":memory:"):
                database["url"] = "sqlite:///" + str((base / rest).resolve())

    def resolve(section: object, keys: tuple[str, ...]) -> None:
        if not isinstance(section, dict):
            return
        for key in keys:
            if isinstance(section.get(key), str):
                path = Path(section[key]).expanduser()
                section[key] = str(path if path.is_absolute() else (base / path).resolve())

    tls_keys = ("cert_file", "key_file", "ca_file")
    node = raw.get("node")
    if isinstance(node, dict):
        resolve(node.get("tls"), tls_keys)
    destinations = raw.get("destinations")
    if isinstance(destinations, dict):
        for destination in destinations.values():
            resolve(destination, ("path", "password_file", "ca_file"))
            if isinstance(destination, dict):
                resolve(destination.get("tls"), tls_keys)
    resolve(raw.get("routing"), ("rules_file",))
    requests = raw.get("requests")
    if isinstance(requests, dict):
        resolve(requests.get("redcap"), ("token_file", "ca_file"))
    projects = raw.get("projects")
    if isinstance(projects, dict):
        for project in projects.values():
            if not isinstance(project, dict):
                continue
            if isinstance(project.get("secret_file"), str):
                path = Path(project["secret_file"]).expanduser()
                project["secret_file"] = str(path if path.is_absolute() else base / path)
            profile = project.get("profile")
            if isinstance(profile, str) and profile.endswith((".yaml", ".yml")):
                path = Path(profile).expanduser()
                project["profile"] = str(path if path.is_absolute() else base / path)


def load_config(path: str | os.PathLike[str]) -> FionaConfig:
    """Load and validate a configuration file.

    Raises
    ------
    ConfigError
        Naming the file and every offending key path.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(source), [("", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(source), [("", f"not valid YAML: {exc}")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(source), [("", "the top level must be a mapping of keys")])
    if "source" in raw:
        raise ConfigError(str(source), [("source", "reserved key")])
    base = source.resolve().parent
    # Defaults of relative paths resolve against the config folder too.
    for section, key, default in (
        ("storage", "path", "var"),
        ("database", "url", "sqlite:///var/fiona.db"),
    ):
        if raw.get(section) is None:
            raw[section] = {}
        if isinstance(raw[section], dict):
            raw[section].setdefault(key, default)
    _resolve_paths(raw, base)
    try:
        return FionaConfig.model_validate({**raw, "source": source.resolve()})
    except ValidationError as exc:
        problems = [(_loc(err["loc"]), err["msg"]) for err in exc.errors()]
        raise ConfigError(str(source), problems) from None

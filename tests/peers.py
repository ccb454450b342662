"""Real DICOM peers for forwarder tests: Orthanc, dcmtk storescp, and a scripted pynetdicom SCP.

Every peer is a context manager (``with Orthanc(tmp_path / "pacs") as pacs: ...``) and can also
be driven by hand with ``start()``/``stop()``; ``start()`` after ``stop()`` reuses the same
storage and the same ports (for destination-down-then-up tests).

Network: the tests talk to the peers on 127.0.0.1 only, but neither Orthanc 1.10.1 (no bind
address option for DICOM or HTTP; ``RemoteAccessAllowed: false`` only refuses non-local HTTP
clients) nor dcmtk's storescp (no bind option) can be told to *listen* on loopback only. Run the
test process inside a private network namespace (``unshare -n``) to confine them; see
``/work/shared/design/TESTING.md``.

Nagle: dcmtk and Orthanc leave Nagle's algorithm on unless the environment has
``TCP_NODELAY=1``; every subprocess here gets it. The scripted SCP sets ``TCP_NODELAY`` on every
accepted socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import requests
from fionatest import DCMTK, free_port
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    StoragePresentationContexts,
    evt,
)

from fiona.scp.server import abort_association

ORTHANC = Path("/usr/sbin/Orthanc")
NODELAY_ENV = {"TCP_NODELAY": "1"}

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
VERIFICATION = "1.2.840.10008.1.1"

# Orthanc's user-friendly groups of transfer syntaxes (applied after AcceptedTransferSyntaxes).
ORTHANC_SYNTAX_GROUPS = (
    "DeflatedTransferSyntaxAccepted",
    "JpegTransferSyntaxAccepted",
    "Jpeg2000TransferSyntaxAccepted",
    "JpegLosslessTransferSyntaxAccepted",
    "JpipTransferSyntaxAccepted",
    "Mpeg2TransferSyntaxAccepted",
    "RleTransferSyntaxAccepted",
    "Mpeg4TransferSyntaxAccepted",
    "H265TransferSyntaxAccepted",
)


# -- small helpers ------------------------------------------------------------------------------


def is_listening(port: int) -> bool:
    """Whether some socket of this network namespace listens on TCP ``port``.

    Reads /proc/net/tcp{,6} instead of connecting: a probe connection would occupy an
    association slot of the peer (and show up in its logs) until its ACSE timeout.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 3
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                return True
    return False


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    return proc.returncode


class _Process:
    """A peer run as a subprocess, logging to a numbered file per start."""

    name = "peer"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path = folder / f"{self.name}.log"
        self.starts = 0

    def _spawn(self, argv: list[str]) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        self.log_path = self.folder / f"{self.name}.{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.folder,
                env={**os.environ, **NODELAY_ENV},
            )

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.proc.returncode}:\n{self.log()}"
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop cleanly: SIGTERM, then SIGKILL after ``timeout`` s. Returns the exit status."""
        return _stop_process(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL (a crash), for tests of a peer dying mid-association."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def log(self) -> str:
        """The log of the current (or last) run."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- Orthanc ------------------------------------------------------------------------------------


class Orthanc(_Process):
    """The Debian ``/usr/sbin/Orthanc`` (1.10.1) with a per-test config, storage and index.

    Restrictions (attributes; the config file is rewritten on every ``start()``, so a test may
    change them between a ``stop()`` and the next ``start()``):

    - ``uncompressed_only=True``: ``AcceptedTransferSyntaxes`` = the three uncompressed
      syntaxes (implicit/explicit little endian, explicit big endian) and every
      ``*TransferSyntaxAccepted`` group option false. A compressed file then fails to store
      (storescu: "unable to convert dataset from 'JPEG 2000' ...").
    - ``accepted_transfer_syntaxes``: an explicit ``AcceptedTransferSyntaxes`` list (UIDs,
      ``*``/``?`` wildcards); ``syntax_groups`` sets group options, e.g.
      ``{"Jpeg2000TransferSyntaxAccepted": False}``. Both override ``uncompressed_only``.
    - ``check_called_aet`` (``DicomCheckCalledAet``), ``always_allow_store``
      (``DicomAlwaysAllowStore``; false + no ``modalities`` refuses every C-STORE),
      ``unknown_sop_class_accepted`` (``UnknownSopClassAccepted``), ``modalities``
      (``DicomModalities``), and ``extra_config`` for any other option (e.g.
      ``{"OverwriteInstances": True}``).
    """

    name = "orthanc"

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        check_called_aet: bool = False,
        always_allow_store: bool = True,
        unknown_sop_class_accepted: bool = False,
        uncompressed_only: bool = False,
        accepted_transfer_syntaxes: Sequence[str] | None = None,
        syntax_groups: Mapping[str, bool] | None = None,
        modalities: Mapping[str, Any] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        verbose: bool = False,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder)
        if not ORTHANC.exists():
            raise RuntimeError(f"{ORTHANC} missing: apt-get install -y orthanc")
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.check_called_aet = check_called_aet
        self.always_allow_store = always_allow_store
        self.unknown_sop_class_accepted = unknown_sop_class_accepted
        self.uncompressed_only = uncompressed_only
        self.accepted_transfer_syntaxes = accepted_transfer_syntaxes
        self.syntax_groups = dict(syntax_groups or {})
        self.modalities = dict(modalities or {})
        self.extra_config = dict(extra_config or {})
        self.verbose = verbose
        self.storage = folder / "storage"
        self.config_path = folder / "orthanc.json"
        self.url = f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The configuration written on ``start()``."""
        config: dict[str, Any] = {
            "Name": f"fiona-test-{self.ae_title}",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowStore": self.always_allow_store,
            "UnknownSopClassAccepted": self.unknown_sop_class_accepted,
            "DicomModalities": self.modalities,
            "OrthancPeers": {},
            "SaveJobs": False,
            "WebDavEnabled": False,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 4,
        }
        if self.uncompressed_only:
            config["AcceptedTransferSyntaxes"] = list(UNCOMPRESSED)
            config.update(dict.fromkeys(ORTHANC_SYNTAX_GROUPS, False))
        if self.accepted_transfer_syntaxes is not None:
            config["AcceptedTransferSyntaxes"] = list(self.accepted_transfer_syntaxes)
        config.update(self.syntax_groups)
        config.update(self.extra_config)
        return config

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until the REST API answers and the DICOM port listens."""
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        if is_listening(self.dicom_port) or is_listening(self.http_port):
            raise RuntimeError(f"port {self.dicom_port} or {self.http_port} is already taken")
        argv = [str(ORTHANC), *(["--verbose"] if self.verbose else []), str(self.config_path)]
        self._spawn(argv)

        def ready() -> bool:
            self._check_alive()
            try:
                answered = requests.get(f"{self.url}/system", timeout=2).ok
            except requests.RequestException:
                return False
            return answered and is_listening(self.dicom_port)

        try:
            poll(ready, timeout, f"Orthanc on ports {self.dicom_port}/{self.http_port}")
        except TimeoutError as error:
            self.stop()
            raise TimeoutError(f"{error}\n{self.log()}") from None

    # -- REST ----------------------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        response = requests.get(f"{self.url}{path}", params=params or None, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        response = requests.post(f"{self.url}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def studies(self) -> list[dict[str, Any]]:
        """Every study, expanded: ``ID``, ``MainDicomTags``, ``PatientMainDicomTags``, ..."""
        return list(self.get("/studies", expand=""))

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """The instances of a study (by StudyInstanceUID), expanded: ``ID``,
        ``MainDicomTags`` (``SOPInstanceUID``, ``InstanceNumber``...), ``ParentSeries``..."""
        body = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        return list(self.post("/tools/find", body))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (``/simplified-tags``)."""
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored Part 10 file of an instance."""
        response = requests.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30)
        response.raise_for_status()
        return response.content

    def instance_ids(self) -> list[str]:
        return list(self.get("/instances"))

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def wait_for_instances(self, n: int, timeout: float = 30.0) -> int:
        """Wait until Orthanc holds at least ``n`` instances; returns the count."""
        counts = [0]

        def enough() -> bool:
            counts[0] = self.count_instances()
            return counts[0] >= n

        try:
            poll(enough, timeout, f"{n} instances in Orthanc", interval=0.1)
        except TimeoutError as error:
            raise TimeoutError(f"{error}; it has {counts[0]}") from None
        return counts[0]


# -- dcmtk storescp -----------------------------------------------------------------------------


class StoreSCP(_Process):
    """dcmtk ``/usr/bin/storescp -od DIR -aet AET PORT`` writing received files to ``output``.

    What it accepts:

    - default: every storage SOP class dcmtk knows, uncompressed transfer syntaxes only
      (storescp's default ``+x=``); ``accept_all=True`` adds ``+xa`` (every syntax it supports).
    - ``sop_classes`` and/or ``transfer_syntaxes`` (UIDs): writes an association-negotiation
      config file and runs ``-xf FILE FIONATEST``; its one profile has a presentation context
      for Verification plus every listed SOP class (default: the 120 SOP classes of
      pynetdicom's ``StoragePresentationContexts``; dcmtk 3.6.7 refuses a profile of more than
      128 contexts) times the listed transfer syntaxes (default: uncompressed, or every syntax
      pynetdicom knows with ``accept_all``). ``reject_sop_classes`` removes SOP classes from
      that list: the sender then gets no accepted presentation context for them (storescu:
      "No presentation context for: (CT) ...", "0006:0208 DIMSE No valid Presentation
      Context ID").
    - ``bit_preserving`` (default true): ``+B``, files hold the dataset exactly as received
      (otherwise storescp re-encodes it, e.g. recomputes group lengths).
    - ``extra_args``: any other storescp option, e.g. ``("--refuse",)``, ``("--abort-after",)``,
      ``("--sleep-during", "5")``.
    """

    name = "storescp"
    PROFILE = "FIONATEST"

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "STORESCP",
        port: int | None = None,
        accept_all: bool = False,
        sop_classes: Sequence[str] | None = None,
        reject_sop_classes: Sequence[str] = (),
        transfer_syntaxes: Sequence[str] | None = None,
        bit_preserving: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.bit_preserving = bit_preserving
        self.accept_all = accept_all
        self.sop_classes = sop_classes
        self.reject_sop_classes = tuple(reject_sop_classes)
        self.transfer_syntaxes = transfer_syntaxes
        self.extra_args = tuple(extra_args)
        self.output = folder / "received"
        self.config_path = folder / "storescp.cfg"

    def association_config(self) -> str:
        """The ``-xf`` config file's text: one profile, ``FIONATEST``."""
        if self.sop_classes is not None:
            sop_classes = list(self.sop_classes)
        else:
            sop_classes = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
        sop_classes = [uid for uid in sop_classes if uid not in self.reject_sop_classes]
        if len(sop_classes) > 127:
            raise ValueError("storescp takes at most 128 presentation contexts per profile")
        if self.transfer_syntaxes is not None:
            syntaxes = list(self.transfer_syntaxes)
        elif self.accept_all:
            syntaxes = list(ALL_TRANSFER_SYNTAXES)
        else:
            syntaxes = list(UNCOMPRESSED)
        lines = ["[[TransferSyntaxes]]", "[Uncompressed]"]
        lines += [f"TransferSyntax{i} = {uid}" for i, uid in enumerate(UNCOMPRESSED, 1)]
        lines += ["[Accepted]"]
        lines += [f"TransferSyntax{i} = {uid}" for i, uid in enumerate(syntaxes, 1)]
        lines += ["[[PresentationContexts]]", "[Contexts]"]
        contexts = [f"{VERIFICATION}\\Uncompressed"]
        contexts += [f"{uid}\\Accepted" for uid in sop_classes]
        lines += [f"PresentationContext{i} = {cx}" for i, cx in enumerate(contexts, 1)]
        lines += ["[[Profiles]]", f"[{self.PROFILE}]", "PresentationContexts = Contexts"]
        return "\n".join(lines) + "\n"

    def argv(self) -> list[str]:
        argv = [str(DCMTK / "storescp"), "-v", "-od", str(self.output), "-aet", self.ae_title]
        if self.bit_preserving:
            argv.append("+B")
        restricted = (
            self.sop_classes is not None
            or self.transfer_syntaxes is not None
            or bool(self.reject_sop_classes)
        )
        if restricted:
            self.config_path.write_text(self.association_config())
            argv += ["-xf", str(self.config_path), self.PROFILE]
        elif self.accept_all:
            argv.append("+xa")
        return [*argv, *self.extra_args, str(self.port)]

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until the port listens."""
        self.output.mkdir(parents=True, exist_ok=True)
        if is_listening(self.port):
            raise RuntimeError(f"port {self.port} is already taken")
        self._spawn(self.argv())

        def ready() -> bool:
            self._check_alive()
            return is_listening(self.port)

        try:
            poll(ready, timeout, f"storescp on port {self.port}", interval=0.02)
        except TimeoutError as error:
            self.stop()
            raise TimeoutError(f"{error}\n{self.log()}") from None

    def files(self) -> list[Path]:
        """Every received file (sorted by path)."""
        if not self.output.exists():
            return []
        return sorted(path for path in self.output.rglob("*") if path.is_file())

    def wait_for_files(self, n: int, timeout: float = 30.0) -> list[Path]:
        """Wait until at least ``n`` files arrived; returns them.

        storescp writes a file completely before it answers the C-STORE, so once the sender
        has its response the file is whole; a file seen here while the sender still waits may
        still be growing.
        """

        def enough() -> list[Path]:
            files = self.files()
            return files if len(files) >= n else []

        try:
            return list(poll(enough, timeout, f"{n} files from storescp"))
        except TimeoutError as error:
            raise TimeoutError(f"{error}; it has {len(self.files())}\n{self.log()}") from None


# -- scripted pynetdicom SCP --------------------------------------------------------------------

ABORT = "abort"  # a C-STORE answer: send an A-ABORT instead of a response
HANG = "hang"  # a C-STORE answer: never answer (until stop()), so the sender's DIMSE timeout fires

# Association answers: (result, source, diagnostic) of the A-ASSOCIATE-RJ (PS3.8 9.3.4).
ACCEPT = "accept"
REJECT_TRANSIENT = "transient"  # rejected-transient, service user, no reason given
REJECT_PERMANENT = "permanent"  # rejected-permanent, service user, no reason given
REJECT_BUSY = "busy"  # rejected-transient, service provider (presentation), local limit exceeded
REJECTIONS: dict[str, tuple[int, int, int]] = {
    REJECT_TRANSIENT: (0x02, 0x01, 0x01),
    REJECT_PERMANENT: (0x01, 0x01, 0x01),
    REJECT_BUSY: (0x02, 0x03, 0x02),
}

StoreAnswer = int | str  # a status code, ABORT or HANG
AssociationAnswer = str | tuple[int, int, int]  # ACCEPT, a REJECT_* name, or (result, source, diag)


@dataclass(frozen=True)
class StoreCall:
    """One C-STORE request the scripted SCP received, and how it answered."""

    number: int  # 1-based, counted over all associations
    association: int  # 1-based number of the association it came on
    calling_ae_title: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes  # the encoded dataset as received (no file meta)
    answer: StoreAnswer

    @property
    def stored(self) -> bool:
        """Whether the answer was success or a warning (the sender counts it as delivered)."""
        return isinstance(self.answer, int) and (self.answer == 0 or self.answer >> 12 == 0xB)


@dataclass(frozen=True)
class AssociationRecord:
    number: int  # 1-based
    calling_ae_title: str
    called_ae_title: str
    answer: AssociationAnswer


class ScriptedSCP:
    """An in-process pynetdicom Storage SCP on 127.0.0.1 whose answers follow a script.

    - ``statuses``: the answers to the 1st, 2nd, ... C-STORE (counted over all associations):
      a status code (``0xA700`` out of resources, ``0xA900`` dataset/SOP class mismatch,
      ``0xC000`` cannot understand, ``0xB000`` warning...), ``ABORT`` (A-ABORT instead of a
      response) or ``HANG`` (no answer until ``hang_seconds`` pass or ``stop()``); once the
      script is used up, ``default_status``.
    - ``associations``: the answers to the 1st, 2nd, ... association request: ``ACCEPT``,
      ``REJECT_TRANSIENT``, ``REJECT_PERMANENT``, ``REJECT_BUSY`` or a raw
      ``(result, source, diagnostic)``; once used up, ``default_association``.
    - ``sop_classes``/``transfer_syntaxes``: what it accepts (default: every storage SOP class
      pynetdicom knows, every transfer syntax), plus Verification (C-ECHO answers success).

    - ``require_calling_aet``: if given, other calling AE titles are rejected permanently
      ("calling AE title not recognized", ``(1, 1, 3)``) without using up the script.
    - ``require_called_aet``: reject a called AE title other than ``ae_title`` (pynetdicom).

    Answer names (``"abort"``, ``"HANG"``, ``"transient"``...) are case-insensitive; unknown
    ones raise ValueError. ``script()`` replaces the remaining script mid-test. ``calls`` and
    ``associations_seen`` record everything, in order.
    """

    def __init__(
        self,
        *,
        ae_title: str = "SCRIPTED",
        port: int | None = None,
        statuses: Iterable[StoreAnswer] = (),
        default_status: int = 0x0000,
        associations: Iterable[AssociationAnswer] = (),
        default_association: AssociationAnswer = ACCEPT,
        sop_classes: Sequence[str] | None = None,
        transfer_syntaxes: Sequence[str] | None = None,
        require_called_aet: bool = False,
        require_calling_aet: Sequence[str] = (),
        hang_seconds: float = 120.0,
    ) -> None:
        self.ae_title = ae_title
        self.port = port or 0  # 0: bind any free port on the first start, then keep it
        self.default_status = default_status
        [self.default_association] = _association_answers([default_association])
        self.sop_classes = sop_classes
        self.transfer_syntaxes = transfer_syntaxes
        self.require_called_aet = require_called_aet
        self.require_calling_aet = tuple(require_calling_aet)
        self.hang_seconds = hang_seconds
        self.calls: list[StoreCall] = []
        self.associations_seen: list[AssociationRecord] = []
        self._statuses: list[StoreAnswer] = _store_answers(statuses)
        self._associations: list[AssociationAnswer] = _association_answers(associations)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ae: Any = None
        self._association_numbers: dict[int, int] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._ae is not None:
            raise RuntimeError("scripted SCP is already running")
        self._stopping.clear()
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = self.require_called_aet
        ae.maximum_associations = 16
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        syntaxes = list(self.transfer_syntaxes or ALL_TRANSFER_SYNTAXES)
        sop_classes = self.sop_classes or [
            str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
        ]
        ae.add_supported_context(VERIFICATION, list(UNCOMPRESSED))
        for uid in sop_classes:
            ae.add_supported_context(uid, syntaxes)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None
        self.port = int(server.server_address[1])
        self._ae = ae

    def stop(self) -> None:
        """Stop listening and abort open associations (releases HANG answers)."""
        self._stopping.set()
        if self._ae is not None:
            # Not AE.shutdown(): it aborts before it stops listening, and pynetdicom's abort
            # of a connection still waiting for its A-ASSOCIATE-RQ kills the reactor thread.
            for server in self._ae._servers[:]:
                server.shutdown()
            for assoc in self._ae.active_associations:
                abort_association(assoc)
            self._ae = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._ae is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- script and records ----------------------------------------------------------------------

    def script(
        self,
        statuses: Iterable[StoreAnswer] | None = None,
        associations: Iterable[AssociationAnswer] | None = None,
        default_status: int | None = None,
        default_association: AssociationAnswer | None = None,
    ) -> None:
        """Replace the rest of the script (only the arguments given)."""
        with self._lock:
            if statuses is not None:
                self._statuses = _store_answers(statuses)
            if associations is not None:
                self._associations = _association_answers(associations)
            if default_status is not None:
                self.default_status = default_status
            if default_association is not None:
                [self.default_association] = _association_answers([default_association])

    def stored(self) -> list[StoreCall]:
        """The calls answered with success or a warning."""
        with self._lock:
            return [call for call in self.calls if call.stored]

    def stored_uids(self) -> list[str]:
        return [call.sop_instance_uid for call in self.stored()]

    def wait_for_calls(self, n: int, timeout: float = 30.0) -> list[StoreCall]:
        """Wait until at least ``n`` C-STOREs arrived (whatever the answer); returns them all."""

        def enough() -> list[StoreCall]:
            with self._lock:
                return list(self.calls) if len(self.calls) >= n else []

        return list(poll(enough, timeout, f"{n} C-STOREs at the scripted SCP", interval=0.02))

    def wait_for_stored(self, n: int, timeout: float = 30.0) -> list[StoreCall]:
        """Wait until at least ``n`` C-STOREs were answered success/warning; returns them."""

        def enough() -> list[StoreCall]:
            stored = self.stored()
            return stored if len(stored) >= n else []

        return list(poll(enough, timeout, f"{n} stored instances at the scripted SCP", 0.02))

    # -- handlers (run in pynetdicom's association threads) --------------------------------------

    def _on_conn_open(self, event: Any) -> None:
        try:
            sock = event.assoc.dul.socket.socket
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = _text(primitive.calling_ae_title)
        with self._lock:
            number = len(self.associations_seen) + 1
            answer: AssociationAnswer
            if self.require_calling_aet and calling not in self.require_calling_aet:
                answer = (0x01, 0x01, 0x03)
            elif self._associations:
                answer = self._associations.pop(0)
            else:
                answer = self.default_association
            self.associations_seen.append(
                AssociationRecord(number, calling, _text(primitive.called_ae_title), answer)
            )
            self._association_numbers[id(assoc)] = number
        if answer == ACCEPT:
            return
        result, source, diagnostic = REJECTIONS[answer] if isinstance(answer, str) else answer
        assoc.acse.send_reject(result, source, diagnostic)
        assoc.kill()  # returns once the DUL has sent the A-ASSOCIATE-RJ

    def _on_c_store(self, event: Any) -> int:
        assoc = event.assoc
        request = event.request
        with self._lock:
            number = len(self.calls) + 1
            answer = self._statuses.pop(0) if self._statuses else self.default_status
            self.calls.append(
                StoreCall(
                    number=number,
                    association=self._association_numbers.get(id(assoc), 0),
                    calling_ae_title=_text(assoc.requestor.ae_title),
                    sop_class_uid=str(request.AffectedSOPClassUID),
                    sop_instance_uid=str(request.AffectedSOPInstanceUID),
                    transfer_syntax=str(event.context.transfer_syntax),
                    dataset=request.DataSet.getvalue() if request.DataSet is not None else b"",
                    answer=answer,
                )
            )
        if answer == ABORT:
            assoc.abort()
            return 0xA700  # never sent: the association is gone
        if answer == HANG:
            self._stopping.wait(self.hang_seconds)
            return 0xA700
        return int(answer)


def _store_answers(answers: Iterable[StoreAnswer]) -> list[StoreAnswer]:
    """Validate a C-STORE script; ``"ABORT"``/``"Hang"`` are taken as ABORT/HANG."""
    checked: list[StoreAnswer] = []
    for answer in answers:
        if isinstance(answer, str):
            if answer.lower() not in (ABORT, HANG):
                raise ValueError(f"unknown C-STORE answer {answer!r}: a status, ABORT or HANG")
            checked.append(answer.lower())
        elif isinstance(answer, int) and 0 <= answer <= 0xFFFF:
            checked.append(answer)
        else:
            raise ValueError(f"unknown C-STORE answer {answer!r}: a status, ABORT or HANG")
    return checked


def _association_answers(answers: Iterable[AssociationAnswer]) -> list[AssociationAnswer]:
    """Validate an association script; names are case-insensitive."""
    checked: list[AssociationAnswer] = []
    for answer in answers:
        if isinstance(answer, str):
            if answer.lower() not in (ACCEPT, *REJECTIONS):
                raise ValueError(f"unknown association answer {answer!r}")
            checked.append(answer.lower())
        elif isinstance(answer, tuple) and len(answer) == 3:
            checked.append(answer)
        else:
            raise ValueError(f"unknown association answer {answer!r}")
    return checked


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()

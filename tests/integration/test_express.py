"""The express receive path (``fiona.scp.express``) against pynetdicom's own path.

FIONA's SCP runs in this process (so that the tests can see which path served a store);
a pynetdicom SCU sends. The same instances go to a node on the express path and to one
where a bound ``EVT_PDU_RECV`` handler sends everything through pynetdicom's path: what
the sender reads back and what lands in the spool must be the same, byte for byte.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fionatest import dataset_bytes, make_ct, sample_file, write_config, write_study
from peers import poll
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from fiona.config import load_config
from fiona.db.models import AuditEvent, AuditEventType, Instance
from fiona.scp.cstore import encode_c_store_rq
from fiona.scp.express import ExpressReceiver
from fiona.scp.filemeta import ReceivedFile
from fiona.scp.handlers import ScpHandlers
from fiona.scp.server import NodeServices, configure_pynetdicom, event_handlers, open_node_services


@dataclass
class Scp:
    """FIONA's SCP on a free loopback port, and the express receivers of its associations."""

    port: int
    services: NodeServices
    receivers: list[ExpressReceiver]

    @property
    def served(self) -> int:
        return sum(receiver.served for receiver in self.receivers)

    def stored(self) -> dict[str, bytes]:
        incoming = self.services.spool.incoming
        return {p.relative_to(incoming).as_posix(): p.read_bytes() for p in incoming.rglob("*.dcm")}

    def temporary_files(self) -> list[str]:
        return sorted(p.name for p in self.services.spool.tmp.iterdir())

    def temporary_bytes(self) -> int:
        """What the temporary files hold (the next store's file, made ahead, is empty)."""
        return sum(p.stat().st_size for p in self.services.spool.tmp.iterdir())


@pytest.fixture
def start_scp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Factory: ``start_scp(services, observe=False, max_pdu=None)``."""
    for name in (
        "STORE_RECV_CHUNKED_DATASET",
        "STORE_SEND_CHUNKED_DATASET",
        "UNRESTRICTED_STORAGE_SERVICE",
        "LOG_HANDLER_LEVEL",
    ):
        monkeypatch.setattr(_config, name, getattr(_config, name))  # restored afterwards
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    settings = pydicom_config.settings
    monkeypatch.setattr(settings, "reading_validation_mode", settings.reading_validation_mode)
    servers = []

    def start(services: NodeServices, *, observe: bool = False, max_pdu: int | None = None) -> Scp:
        configure_pynetdicom(services.spool)
        receivers: list[ExpressReceiver] = []
        handlers = ScpHandlers(services.config, services.ingestor, services.clock)

        def conn_open(event: Any) -> None:
            handlers.handle_conn_open(event)
            receivers.append(event.assoc.dul._fiona_express)

        ae = AE(ae_title=services.config.node.ae_title)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = max_pdu or services.config.node.maximum_pdu_size
        ae.require_called_aet = False
        bindings = [
            (event, conn_open if event == evt.EVT_CONN_OPEN else handler)
            for event, handler in event_handlers(handlers)
        ]
        if observe:  # an observer of received PDUs: pynetdicom's path for everything
            bindings.append((evt.EVT_PDU_RECV, lambda event: None))
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=bindings)
        servers.append(server)
        return Scp(server.server_address[1], services, receivers)

    yield start
    for server in servers:
        server.shutdown()


def _other_services(tmp_path: Path, name: str) -> NodeServices:
    folder = tmp_path / name
    return open_node_services(load_config(write_config(folder, f"sqlite:///{folder}/fiona.db")))


def _sender() -> AE:
    ae = AE(ae_title="SENDER")
    for sop_class in (
        "1.2.840.10008.5.1.4.1.1.2",  # CT
        "1.2.840.10008.5.1.4.1.1.4",  # MR
        "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
    ):
        for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.91"):
            ae.add_requested_context(sop_class, syntax)  # one context each: all accepted
    ae.add_requested_context(Verification)
    return ae


def _send(
    port: int, files: list[Path], *, echo_between: bool = False
) -> tuple[list[tuple[int, str | None]], list[bytes]]:
    """C-STORE `files` on one association: (status, Error Comment) each, and the raw
    P-DATA-TF PDUs the SCP answered with."""
    received: list[bytes] = []
    assoc = _sender().associate(
        "127.0.0.1",
        port,
        ae_title="FIONA",
        evt_handlers=[(evt.EVT_DATA_RECV, lambda event: received.append(bytes(event.data)))],
    )
    assert assoc.is_established
    answers = []
    try:
        for path in files:
            status = assoc.send_c_store(path)
            answers.append((int(status.Status), status.get("ErrorComment")))
            if echo_between:
                assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    return answers, [pdu for pdu in received if pdu[:1] == b"\x04"]


def _corpus(folder: Path) -> list[Path]:
    """Instances of several kinds, the last one without a Study Instance UID (quarantined)."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    files = []
    for i, size in enumerate((16, 256, 512)):
        ds = make_ct(study, series, size=size, instance_number=i + 1, seed=i)
        ds.save_as(folder / f"ct{i}.dcm", enforce_file_format=True)
        files.append(folder / f"ct{i}.dcm")
    files += [sample_file("MR_small.dcm"), sample_file("JPEG2000.dcm")]
    broken = make_ct(study, series, seed=9)
    del broken.StudyInstanceUID
    broken.save_as(folder / "broken.dcm", enforce_file_format=True)
    return [*files, folder / "broken.dcm"]


@pytest.mark.parametrize("max_pdu", [16384, 1_048_576])
def test_express_answers_and_stores_exactly_as_pynetdicoms_path(  # type: ignore[no-untyped-def]
    start_scp, services: NodeServices, tmp_path: Path, max_pdu: int
) -> None:
    files = _corpus(tmp_path / "corpus")
    express = start_scp(services, max_pdu=max_pdu)
    other = _other_services(tmp_path, "observed")
    try:
        reference = start_scp(other, observe=True, max_pdu=max_pdu)
        answers, responses = _send(express.port, files)
        expected_answers, expected_responses = _send(reference.port, files)

        assert [status for status, _ in answers] == [0] * 5 + [0xC210]
        assert answers == expected_answers
        assert responses == expected_responses  # the C-STORE-RSP PDUs, byte for byte
        assert express.served == len(files) and reference.served == 0
        stored = express.stored()
        assert len(stored) == 5 and stored == reference.stored()
        received = sorted(dataset_bytes(express.services.spool.incoming / p) for p in stored)
        assert received == sorted(dataset_bytes(path) for path in files[:5])  # as sent
        with services.session_factory() as session, other.session_factory() as second:
            digests = sorted(session.scalars(select(Instance.digest)))
            assert digests == sorted(second.scalars(select(Instance.digest)))
        poll(lambda: not express.temporary_files(), 10, "temporary files removed")
    finally:
        other.close()


def test_other_messages_on_the_same_association_take_pynetdicoms_path(  # type: ignore[no-untyped-def]
    start_scp, services: NodeServices, tmp_path: Path
) -> None:
    files = _corpus(tmp_path / "corpus")[:3]
    scp = start_scp(services)
    answers, _ = _send(scp.port, files, echo_between=True)  # C-ECHO after every C-STORE
    assert answers == [(0, None)] * 3
    assert scp.served == 3 and len(scp.stored()) == 3


def test_a_command_in_fragments_takes_pynetdicoms_path(  # type: ignore[no-untyped-def]
    start_scp, services: NodeServices, tmp_path: Path
) -> None:
    """A 128-byte PDU limit splits the C-STORE-RQ command over two PDUs."""
    path = tmp_path / "small.dcm"
    make_ct(generate_uid(), generate_uid(), size=8).save_as(path, enforce_file_format=True)
    scp = start_scp(services, max_pdu=128)
    answers, _ = _send(scp.port, [path])
    assert answers == [(0, None)]
    assert scp.served == 0 and len(scp.stored()) == 1


def _pdv_pdu(context_id: int, control: int, value: bytes) -> bytes:
    return (
        struct.pack(">BBL", 4, 0, len(value) + 6)
        + struct.pack(">LBB", len(value) + 2, context_id, control)
        + value
    )


def _started_store(assoc: Any, path: Path) -> int:
    """Send a C-STORE-RQ command and the first half of its data set, by hand; the
    presentation context ID."""
    ds = dcmread(path)
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID)
    raw = path.read_bytes()
    data = raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength) :]
    command = encode_c_store_rq(7, 2, ds.SOPClassUID, ds.SOPInstanceUID)
    send = assoc.dul.socket.send
    send(_pdv_pdu(context.context_id, 0x03, command))
    send(_pdv_pdu(context.context_id, 0x00, data[: len(data) // 2]))
    return int(context.context_id)


def _associated(
    start_scp: Any, services: NodeServices, tmp_path: Path
) -> tuple[list[Path], Scp, Any]:
    """The corpus, a started SCP and an association to it."""
    files = _corpus(tmp_path / "corpus")
    scp = start_scp(services)
    return files, scp, _sender().associate("127.0.0.1", scp.port, ae_title="FIONA")


def test_a_transfer_cut_off_leaves_no_temporary_file(  # type: ignore[no-untyped-def]
    start_scp, services: NodeServices, tmp_path: Path
) -> None:
    files, scp, assoc = _associated(start_scp, services, tmp_path)
    assert assoc.send_c_store(files[1]).Status == 0x0000
    assert len(scp.temporary_files()) == 1 and scp.temporary_bytes() == 0  # made ahead
    _started_store(assoc, files[2])
    poll(
        lambda: len(scp.temporary_files()) == 1 and scp.temporary_bytes() > 0,
        10,
        "the cut-off store writing into the file made ahead",
    )
    assoc.abort()
    poll(lambda: not scp.temporary_files(), 10, "temporary files removed")
    assert scp.served == 1 and len(scp.stored()) == 1


def test_a_command_inside_a_data_set_ends_the_association(  # type: ignore[no-untyped-def]
    start_scp, services: NodeServices, tmp_path: Path
) -> None:
    files, scp, assoc = _associated(start_scp, services, tmp_path)
    context_id = _started_store(assoc, files[1])
    assoc.dul.socket.send(_pdv_pdu(context_id, 0x03, b"\x00" * 16))  # a command, mid-data
    poll(lambda: assoc.is_aborted, 10, "the SCP aborts the association")
    poll(lambda: not scp.temporary_files(), 10, "temporary files removed")
    assert scp.stored() == {}
    answers, _ = _send(scp.port, files[:1])  # the node goes on serving
    assert answers == [(0, None)]


def test_a_file_that_cannot_be_written_is_answered_out_of_resources(  # type: ignore[no-untyped-def]
    start_scp, services: NodeServices, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = {"disk": True}
    write = ReceivedFile.write

    def write_or_fail(self: ReceivedFile, data: Any) -> int:
        if full["disk"] and isinstance(data, memoryview):  # the data set's fragments
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(ReceivedFile, "write", write_or_fail)
    files, scp, assoc = _associated(start_scp, services, tmp_path)
    try:
        refused = assoc.send_c_store(files[1])
        assert refused.Status == 0xA700
        assert refused.ErrorComment == "cannot write received data: No space left on device"
        assert scp.temporary_bytes() == 0  # nothing of it kept
        full["disk"] = False
        assert assoc.send_c_store(files[1]).Status == 0x0000  # the association goes on
    finally:
        assoc.release()
    assert len(scp.stored()) == 1
    poll(lambda: not scp.temporary_files(), 10, "temporary files removed")
    with services.session_factory() as session:
        types = list(session.scalars(select(AuditEvent.event_type)))
    assert AuditEventType.STORE_REFUSED in types


def test_a_file_that_cannot_be_synced_is_answered_out_of_resources(  # type: ignore[no-untyped-def]
    start_scp, services: NodeServices, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The express path's answer waits for the received file's own fsync: a disk that
    cannot make the bytes durable gets no success, and the sender's retry is stored."""
    failing = {"on": True}
    fsync = os.fsync
    synced: list[str] = []

    def fsync_or_fail(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if Path(target).parent == services.spool.tmp:  # a received file
            if failing["on"]:
                raise OSError(errno.EIO, "Input/output error")
            synced.append(Path(target).name)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_or_fail)
    files, scp, assoc = _associated(start_scp, services, tmp_path)
    try:
        refused = assoc.send_c_store(files[1])
        assert refused.Status == 0xA700
        assert "Input/output error" in refused.ErrorComment
        assert not scp.stored()
        failing["on"] = False
        assert assoc.send_c_store(files[1]).Status == 0x0000
    finally:
        assoc.release()
    assert scp.served == 2 and len(scp.stored()) == 1 and len(synced) == 1
    with services.session_factory() as session:
        (row,) = session.scalars(select(Instance))
        assert not row.file_missing
        types = list(session.scalars(select(AuditEvent.event_type)))
    assert AuditEventType.STORE_REFUSED in types
    poll(lambda: not scp.temporary_bytes(), 10, "the refused file removed")


def test_a_command_and_its_data_set_in_one_pdu(  # type: ignore[no-untyped-def]
    start_scp, services: NodeServices, tmp_path: Path
) -> None:
    """Two PDVs in one P-DATA-TF (the command and the whole data set) are one express store."""
    files, scp, assoc = _associated(start_scp, services, tmp_path)
    path = files[0]
    ds = dcmread(path)
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID)
    raw = path.read_bytes()
    data = raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength) :]
    command = encode_c_store_rq(9, 2, ds.SOPClassUID, ds.SOPInstanceUID)
    items = b"".join(
        struct.pack(">LBB", len(value) + 2, context.context_id, control) + value
        for control, value in ((0x03, command), (0x02, data))
    )
    try:
        assoc.dul.socket.send(struct.pack(">BBL", 4, 0, len(items)) + items)
        poll(lambda: scp.served == 1, 10, "the store answered by the express path")
    finally:
        assoc.release()
    assert [dataset_bytes(scp.services.spool.incoming / p) for p in scp.stored()] == [
        dataset_bytes(path)
    ]


def test_the_put_off_folder_fsync_runs_when_the_association_ends(  # type: ignore[no-untyped-def]
    start_scp, services: NodeServices, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New instances in a known series answer before their folder is fsynced; the folder is
    fsynced once the association ends (the rename is durable then, not only at restart)."""
    import fiona.scp.spool as spool_module

    synced: list[Path] = []
    fsync_dir = spool_module.fsync_dir
    monkeypatch.setattr(
        spool_module, "fsync_dir", lambda path: (synced.append(Path(path)), fsync_dir(path))
    )
    files = write_study(tmp_path / "study", 1, 4, size=16)
    scp = start_scp(services)
    answers, _ = _send(scp.port, files)
    assert answers == [(0, None)] * 4
    series = {p.parent for p in services.spool.incoming.rglob("*.dcm")}
    assert len(series) == 1
    poll(lambda: synced.count(next(iter(series))) >= 2, 10, "the series folder fsynced again")
    # once when it was made (its first instance), once when the association ended


def _cached(path: Path) -> bool:
    """Whether the file's first page is in the page cache (a read that must not wait)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("forwarding", [False, True], ids=["no-destinations", "destinations"])
def test_stored_files_leave_the_page_cache_unless_forwarded(  # type: ignore[no-untyped-def]
    start_scp, db_url: str, tmp_path: Path, forwarding: bool
) -> None:
    """A node that forwards nothing drops what it stored from the page cache (it writes every
    study once; growing the cache costs more than reusing its pages). A node with
    destinations keeps it there: its forwarder reads each file back within seconds."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"\0" * 65536)
    with probe.open("rb+") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _cached(probe):  # tmpfs and the like keep every page: nothing to release there
        pytest.skip(f"{tmp_path} does not release pages from the page cache")
    sections: dict[str, Any] = {}
    if forwarding:
        sections["destinations"] = {"out": {"kind": "folder", "path": str(tmp_path / "out")}}
    config = load_config(write_config(tmp_path / "node", db_url, **sections))
    services = open_node_services(config)
    try:
        files = write_study(tmp_path / "study", 1, 3, size=256)
        assert all(_cached(path) for path in files)  # just written: cached
        scp = start_scp(services)
        answers, _ = _send(scp.port, files)
        assert answers == [(0, None)] * 3 and scp.served == 3
        stored = list(services.spool.incoming.rglob("*.dcm"))
        assert len(stored) == 3
        assert [_cached(path) for path in stored] == [forwarding] * 3
    finally:
        services.close()

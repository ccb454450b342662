"""``fiona serve`` as a subprocess against real senders: dcmtk storescu and pynetdicom."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fionatest import (
    DCMTK,
    dataset_bytes,
    make_ct,
    sample_file,
    store_failures,
    storescu,
    write_study,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import create_engine, text

from fiona.scu import set_nodelay

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# (pydicom test file, storescu option proposing its transfer syntax)
COMPRESSED = [
    ("JPEG2000.dcm", "-xw"),
    ("MR_small_jp2klossless.dcm", "-xv"),
    ("SC_rgb_rle_2frame.dcm", "-xr"),
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),
    ("JPEG-lossy.dcm", "-xx"),
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),
    ("image_dfl.dcm", "-xd"),
]


def index_eventually(server, sql: str, rows: int, timeout: float = 15.0) -> list[tuple]:  # type: ignore[no-untyped-def]
    """`index` once it returns `rows` rows: the audit rows of rejections are written
    by the index writer after the association answer (the answer never waits for them)."""
    deadline = time.monotonic() + timeout
    found = index(server, sql)
    while len(found) < rows and time.monotonic() < deadline:
        time.sleep(0.05)
        found = index(server, sql)
    return found


def index(server, sql: str) -> list[tuple]:  # type: ignore[no-untyped-def]
    import yaml

    url = yaml.safe_load(server.config_path.read_text())["database"]["url"]
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(r) for r in connection.execute(text(sql))]
    finally:
        engine.dispose()


def status(server) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(server.cli("status", "--json").stdout)


@pytest.fixture
def server(make_server, db_url: str):  # type: ignore[no-untyped-def]
    """A running node, once on SQLite and once on PostgreSQL."""
    srv = make_server(db_url, projects={"BICAM": {"ae_titles": ["BICAM"]}})
    srv.start()
    yield srv
    assert srv.stop() == 0, srv.log()


def test_storescu_studies_are_stored_byte_exact(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # dcmtk re-encodes what it sends (it drops CT_small.dcm's trailing padding, say), so
    # the byte-exact check uses files it passes through unchanged; pynetdicom's chunked
    # send of arbitrary files is checked in test_bad_datasets_...
    files = write_study(tmp_path / "a", 2, 5) + write_study(tmp_path / "b", 1, 5)
    result = storescu(server.port, files, calling="CT01")
    assert not store_failures(result), result.stdout + result.stderr
    # And to a project's AE title (mode B): accepted, recorded with that called AE.
    result = storescu(server.port, [sample_file("MR_small.dcm")], called="BICAM", calling="MR01")
    assert not store_failures(result)

    report = status(server)
    assert report["instances"] == 16
    rows = index(
        server,
        "SELECT sop_instance_uid, path, calling_ae_title, called_ae_title, "
        "peer_address, transfer_syntax_uid FROM instances",
    )
    by_uid = {r[0]: r for r in rows}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        row = by_uid[ds.SOPInstanceUID]
        assert row[2:5] == ("CT01", "FIONA", "127.0.0.1")
        stored = server.storage / row[1]
        assert stored == (
            server.storage
            / "incoming"
            / ds.StudyInstanceUID
            / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm"
        )
        assert dataset_bytes(stored) == dataset_bytes(path)  # never transcoded
        dcmread(stored)  # round-trips through a strict read
    mr = dcmread(sample_file("MR_small.dcm"), stop_before_pixels=True)
    assert by_uid[mr.SOPInstanceUID][2:4] == ("MR01", "BICAM")


def test_compressed_transfer_syntaxes_are_stored_as_received(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # JPEG lossless (process 14, SV1), compressed here by dcmtk from a synthetic CT.
    source = write_study(tmp_path / "plain", 1, 1)[0]
    jpeg_lossless = tmp_path / "jpeg_lossless.dcm"
    subprocess.run([str(DCMTK / "dcmcjpeg"), str(source), str(jpeg_lossless)], check=True)
    # Several of pydicom's files share a SOP Instance UID: check each right after its send.
    for name, option in [*COMPRESSED, (str(jpeg_lossless), "-xs")]:
        path = sample_file(name) if "/" not in name else Path(name)
        result = storescu(server.port, [path], extra=(option,))
        assert not store_failures(result), f"{name}: {result.stdout}{result.stderr}"
        ds = dcmread(path, stop_before_pixels=True)
        rows = index(
            server,
            "SELECT transfer_syntax_uid, path FROM instances "
            f"WHERE sop_instance_uid = '{ds.SOPInstanceUID}'",
        )
        assert rows[0][0] == ds.file_meta.TransferSyntaxUID, name
        stored = server.storage / rows[0][1]
        assert dcmread(stored).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


def send_pynetdicom(port: int, files: list[Path], called: str = "FIONA") -> list[int]:
    """Send with pynetdicom; return the final status of each file.

    pynetdicom 3.0.4's SCU sometimes mistakes a response under CPU contention ("Received
    unexpected C-STORE service message") and aborts at the DIMSE timeout (TESTING.md).
    Like any careful sender, this one resends what was not acknowledged on a new
    association; FIONA must take the resend as a duplicate or a first copy.
    """
    statuses: dict[Path, int] = {}
    for _attempt in range(3):
        pending = [path for path in files if statuses.get(path) != 0]
        if not pending:
            break
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(CTImageStorage)
        ae.dimse_timeout = 10
        assoc = ae.associate(
            "127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
        )
        assert assoc.is_established
        try:
            for path in pending:
                if not assoc.is_established:
                    break
                response = assoc.send_c_store(dcmread(path))
                if "Status" in response:
                    statuses[path] = int(response.Status)
        finally:
            if assoc.is_established:
                assoc.release()
    return [statuses.get(path, -1) for path in files]


def test_many_parallel_associations(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    batches = [write_study(tmp_path / f"s{i}", 1, 12) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda b: send_pynetdicom(server.port, b), batches))
    assert all(code == 0 for codes in statuses for code in codes)
    report = status(server)
    assert report["instances"] == 96
    assert report["studies"]["RECEIVING"] + report["studies"]["STABLE"] == 8
    associations = index(
        server, "SELECT instances_stored FROM associations WHERE ended_at IS NOT NULL"
    )
    counts = sorted(r[0] for r in associations)
    if len(counts) == 8:  # no sender had to resend: one row of 12 per association
        assert counts == [12] * 8
    else:  # a sender resent on a new association (see send_pynetdicom): both rows count
        assert len(counts) > 8 and sum(counts) >= 96


def fiona_echo(port: int, called: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fiona", "echo", "127.0.0.1", str(port), "--called-ae", called]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)


def test_echo_and_rejections(server) -> None:  # type: ignore[no-untyped-def]
    ok = fiona_echo(server.port, "FIONA")
    assert ok.returncode == 0 and "success" in ok.stdout
    bad = fiona_echo(server.port, "UNKNOWN")
    assert bad.returncode == 1 and "rejected" in bad.stderr
    result = storescu(server.port, [sample_file("CT_small.dcm")], called="NOBODY")
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    # The server keeps serving and recorded the rejections.
    assert storescu(server.port, [sample_file("CT_small.dcm")]).returncode == 0
    reasons = index(
        server, "SELECT details FROM audit_events WHERE event_type = 'ASSOCIATION_REJECTED'"
    )
    assert len(reasons) == 2
    assert all("called AE title not recognised" in str(r[0]) for r in reasons)


def test_bad_datasets_get_failure_status_and_are_quarantined(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = sample_file("CT_small.dcm")
    raw = good.read_bytes()
    meta_len = len(raw) - len(dataset_bytes(good))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[:meta_len] + b"\x08\x00\x05\x00CS\xff\x7f" + b"junk" * 100)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[:-3000])

    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are
    try:
        ae = AE(ae_title="BADSENDER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="FIONA")
        assert assoc.is_established
        answers = [assoc.send_c_store(path) for path in (garbage, truncated, good)]
        assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False
    assert [int(a.Status) for a in answers] == [0xC210, 0xC210, 0x0000]
    # The sender is told why (Error Comment); a success carries no comment.
    assert str(answers[0].ErrorComment).startswith("quarantined: ")
    assert "Pixel Data is shorter" in str(answers[1].ErrorComment)
    assert "ErrorComment" not in answers[2]
    stored = next(server.storage.glob("incoming/*/*/*.dcm"))
    assert dataset_bytes(stored) == dataset_bytes(good)
    report = status(server)
    assert report["quarantined"] == 2 and report["instances"] == 1
    kept = sorted(p.read_bytes() for p in server.storage.glob("quarantine/*/*.dcm"))
    assert len(kept) == 2
    assert any(k.endswith(raw[meta_len:-3000]) for k in kept)  # the bytes, not dropped


def test_disallowed_calling_ae_is_rejected(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(node={"allowed_calling_ae_titles": ["CT01"]})
    srv.start()
    denied = storescu(srv.port, [sample_file("CT_small.dcm")], calling="INTRUDER")
    assert "Calling AE Title Not Recognized" in denied.stdout + denied.stderr
    allowed = storescu(srv.port, [sample_file("CT_small.dcm")], calling="CT01")
    assert not store_failures(allowed)
    assert status(srv)["instances"] == 1
    assert srv.stop() == 0


def test_accept_any_called_ae(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(node={"accept_any_called_ae": True})
    srv.start()
    result = storescu(srv.port, [sample_file("CT_small.dcm")], called="WHATEVER")
    assert not store_failures(result)
    assert srv.stop() == 0


def test_low_disk_rejects_associations_transiently(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(storage={"min_free_mb": 1 << 30})  # a petabyte floor: always "full"
    srv.start()
    result = storescu(srv.port, [sample_file("CT_small.dcm")])
    assert "Rejected Transient" in result.stdout + result.stderr
    assert not list(srv.storage.glob("incoming/*/*/*.dcm"))
    assert srv.stop() == 0


def test_small_filesystem_fills_up_a700_then_keeps_serving(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        srv = make_server(
            storage={"path": str(mount), "min_free_mb": 2},
            database={"url": f"sqlite:///{tmp_path}/small.db"},
        )
        srv.start()
        files = write_study(tmp_path / "big", 1, 12, size=512)  # 12 x 0.5 MB
        result = storescu(srv.port, files)
        output = result.stdout + result.stderr
        assert "Refused: OutOfResources" in output
        stored = status(srv)["instances"]
        assert 1 <= stored < 12
        # Every stored instance is complete; the server still answers.
        for path in srv.storage.glob("incoming/*/*/*.dcm"):
            dcmread(path)
        assert (
            subprocess.run(
                [str(DCMTK / "echoscu"), "-aec", "FIONA", "127.0.0.1", str(srv.port)], check=False
            ).returncode
            == 0
        )
        assert srv.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_kill_9_loses_no_acknowledged_instance(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(stable_after_seconds=30)
    srv.start()
    files = write_study(tmp_path / "study", 2, 150, size=256)
    acknowledged: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        ae = AE(ae_title="KILLTEST")
        ae.add_requested_context(CTImageStorage)
        ae.dimse_timeout = 10
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="FIONA")
        for path in files:
            if stop.is_set():
                break
            if not assoc.is_established:  # pynetdicom's SCU race (TESTING.md): reconnect
                assoc = ae.associate("127.0.0.1", srv.port, ae_title="FIONA")
                if not assoc.is_established:
                    break
            ds = dcmread(path)
            try:
                rsp = assoc.send_c_store(ds)
            except RuntimeError:  # the association died between the check and the send
                break
            if getattr(rsp, "Status", None) == 0x0000:
                acknowledged.append(ds.SOPInstanceUID)
        if assoc.is_established:
            assoc.abort()

    thread = threading.Thread(target=sender)
    thread.start()
    while len(acknowledged) < 40 and thread.is_alive():
        threading.Event().wait(0.01)
    srv.kill9()
    stop.set()
    thread.join(60)
    assert 40 <= len(acknowledged) < len(files)

    srv.start()  # restart: reconciliation runs before listening
    rows = dict(index(srv, "SELECT sop_instance_uid, path FROM instances"))
    for uid in acknowledged:
        assert uid in rows, "an acknowledged instance was lost"
    for path in srv.storage.glob("incoming/*/*/*.dcm"):
        dcmread(path)  # nothing half-written
        assert srv.storage.joinpath(rows[path.stem]).exists()
    # Nothing of the killed process is left in tmp/: only the new one's (empty) folder.
    assert srv.proc is not None
    assert [p.name for p in (srv.storage / "tmp").iterdir()] == [str(srv.proc.pid)]
    assert not [p for p in (srv.storage / "tmp").rglob("*") if p.is_file()]
    assert srv.stop() == 0
    assert not list((srv.storage / "tmp").iterdir())  # a stopping process removes its own


def test_sigterm_finishes_in_flight_association(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = make_server()
    srv.start()
    files = write_study(tmp_path / "study", 1, 120, size=256)
    sender = subprocess.Popen(
        [
            str(DCMTK / "storescu"),
            "-v",
            "-aec",
            "FIONA",
            "127.0.0.1",
            str(srv.port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert sender.stdout is not None
    output: list[str] = []
    for line in sender.stdout:  # wait until the transfer is under way
        output.append(line)
        if sum("Store Response (Success)" in x for x in output) >= 5:
            break
    srv.proc.send_signal(signal.SIGTERM)
    output.extend(sender.stdout)
    assert sender.wait(120) == 0
    assert srv.proc.wait(60) == 0
    assert sum("Store Response (Success)" in x for x in output) == len(files), "".join(output)
    srv.start()
    assert status(srv)["instances"] == len(files)
    assert srv.stop() == 0


def test_sigterm_with_a_silent_connection_stops_cleanly(make_server) -> None:  # type: ignore[no-untyped-def]
    # A connection that never sent its A-ASSOCIATE-RQ (a port probe) must not hold up or
    # break the stop: pynetdicom cannot abort it, FIONA closes it at the transport.
    srv = make_server()
    srv.start()
    with socket.create_connection(("127.0.0.1", srv.port)) as silent:
        time.sleep(0.3)  # the node accepted it and waits for the A-ASSOCIATE-RQ
        started = time.monotonic()
        assert srv.stop() == 0
        assert time.monotonic() - started < 20  # not the 30 s ACSE timeout
        silent.settimeout(5)
        assert silent.recv(1) == b""
    assert "Invalid event" not in srv.log()
    assert "Traceback" not in srv.log()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_object_memory_stays_flat(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = make_server()
    srv.start()
    # Warm up (imports, first association), then note the peak so far.
    assert not store_failures(storescu(srv.port, [sample_file("CT_small.dcm")]))
    before = _peak_rss_mb(srv.proc.pid)
    big = make_ct(generate_uid(), generate_uid(), size=512)
    frames = 600  # 600 x 512 x 512 x 2 bytes = 300 MB of pixel data
    big.NumberOfFrames = frames
    big.PixelData = bytes(512 * 512 * 2 * frames)
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    del big
    result = storescu(srv.port, [path])
    assert not store_failures(result), result.stdout + result.stderr
    growth = _peak_rss_mb(srv.proc.pid) - before
    assert growth < 100, f"server peak memory grew by {growth:.0f} MB for a 300 MB object"
    assert status(srv)["instance_bytes"] > 300 * 2**20
    assert srv.stop() == 0


def test_max_associations_rejects_the_next_one(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(node={"max_associations": 1})
    srv.start()
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", srv.port, ae_title="FIONA")
    assert first.is_established
    second = ae.associate("127.0.0.1", srv.port, ae_title="FIONA")
    assert second.is_rejected
    first.release()
    rows = index_eventually(
        srv, "SELECT details FROM audit_events WHERE event_type = 'ASSOCIATION_REJECTED'", 1
    )
    assert len(rows) == 1 and "max_associations" in str(rows[0][0])
    assert srv.stop() == 0


def test_worker_processes_share_the_port(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(node={"workers": 2})
    srv.start()
    listening = srv.wait_for("listening", 2)
    pids = {entry["pid"] for entry in listening}
    assert len(pids) == 2 and sum(entry["worker"] for entry in listening) == 1
    batches = [write_study(tmp_path / f"s{i}", 1, 10) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda b: send_pynetdicom(srv.port, b), batches))
    assert all(code == 0 for codes in statuses for code in codes)
    assert status(srv)["instances"] == 80
    assert srv.stop() == 0
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


def test_concurrent_associations_spread_over_the_workers(make_server) -> None:  # type: ignore[no-untyped-def]
    """A process serving an association leaves the next one to an idle process."""
    srv = make_server(node={"workers": 2})
    srv.start()
    assert len(srv.wait_for("listening", 2)) == 2
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    for round_ in range(1, 4):  # three times two associations open at once
        held = [ae.associate("127.0.0.1", srv.port, ae_title="FIONA") for _ in range(2)]
        assert all(assoc.is_established for assoc in held)
        for assoc in held:
            assoc.release()
        ended = srv.wait_for("association ended", 2 * round_, timeout=10)
        assert len(ended) == 2 * round_
        assert ended[-1]["pid"] != ended[-2]["pid"]
    assert srv.stop() == 0


def test_no_patient_identifiers_in_logs_or_audit(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(stable_after_seconds=1)
    srv.start()
    markers = {"name": "Leakmarker^Xyzzy", "id": "LEAKID-778899", "birth": "19010203"}
    study = write_study(
        tmp_path / "phi", 1, 3, patient_name=markers["name"], patient_id=markers["id"]
    )
    for path in study:  # birth date too
        ds = dcmread(path)
        ds.PatientBirthDate = markers["birth"]
        ds.save_as(path, enforce_file_format=True)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(study[0].read_bytes()[:-5000])  # truncated: quarantined
    assert not store_failures(storescu(srv.port, study, calling="CT01"))
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # dcmtk will not send a cut file
    try:
        ae = AE(ae_title="CT01")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="FIONA")
        assert int(assoc.send_c_store(bad).Status) == 0xC210
        assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False
    time.sleep(3)  # let the study become stable (metadata, audit)
    assert srv.stop() == 0
    texts = [srv.log()]
    texts += [str(row) for row in index(srv, "SELECT * FROM audit_events")]
    texts += [str(row) for row in index(srv, "SELECT * FROM quarantined_files")]
    texts += [str(row) for row in index(srv, "SELECT * FROM instances")]
    texts += [p.read_text() for p in srv.storage.rglob("*.json")]
    assert any("study stable" in t for t in texts)
    for written in texts:
        for value in (*markers.values(), "Leakmarker", "LEAKID"):
            assert value not in written


def test_a_worker_killed_is_replaced_and_its_temporary_folder_recovered(make_server) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of a receiving worker mid-transfer: the primary clears its folder at once (no
    restart of the node), starts a new worker, and the node goes on receiving."""
    srv = make_server(node={"workers": 2})
    srv.start()
    (worker,) = [entry["pid"] for entry in srv.wait_for("listening", 2) if entry["worker"]]
    folder = srv.storage / "tmp" / str(worker)
    assert folder.is_dir()
    (folder / "rx-cut.dcm").write_bytes(b"\0" * 4096)  # a transfer it was receiving
    os.kill(worker, signal.SIGKILL)
    listening = srv.wait_for("listening", 3)
    assert len(listening) == 3 and listening[-1]["pid"] != worker
    (recovered,) = srv.wait_for("a receiving process died: its temporary files recovered", 1)
    assert recovered["pid"] == worker and recovered["temporary_removed"] == 1
    assert not folder.exists()
    assert (srv.storage / "tmp" / str(listening[-1]["pid"])).is_dir()
    assert not store_failures(storescu(srv.port, [sample_file("CT_small.dcm")]))
    assert srv.stop() == 0


def test_workers_stop_when_the_primary_is_killed(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(node={"workers": 2})
    srv.start()
    workers = [entry["pid"] for entry in srv.wait_for("listening", 2) if entry["worker"]]
    assert len(workers) == 1
    srv.kill9()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{workers[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{workers[0]}").exists(), "orphaned worker still running"
    # A new primary starts cleanly on the same port.
    srv.start()
    assert not store_failures(storescu(srv.port, [sample_file("CT_small.dcm")]))
    assert srv.stop() == 0

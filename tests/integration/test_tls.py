"""DICOM TLS: FIONA's TLS listener with dcmtk storescu, and forwarding to a TLS storescp."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fionatest import DCMTK, FionaServer, free_port, write_config, write_study
from peers import StoreSCP
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fiona.audit import utcnow
from fiona.config import load_config
from fiona.db import RequestStatus, TransferRequest, make_engine, make_sessionmaker
from fiona.keys import load_node_key
from fiona.requests import create_request

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=FIONA test CA", cwd=folder)  # fmt: skip
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 f"{name}.ext", cwd=folder)  # fmt: skip
    return folder


def _storescu_tls(port: int, files: list[Path], pki: Path, tls: bool = True) -> str:
    args = [str(DCMTK / "storescu"), "-aec", "FIONA"]
    if tls:
        args += ["+tls", str(pki / "client.key"), str(pki / "client.pem"),
                 "+cf", str(pki / "ca.pem")]  # fmt: skip
    result = subprocess.run(
        [*args, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
        check=False,
    )
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}"


def _tls_node(tmp_path: Path, pki: Path, **node: Any) -> tuple[FionaServer, int]:
    """A FIONA node (not started) with a TLS listener that requires a client certificate
    signed by the test CA; the server and its TLS port."""
    tls_port = free_port()
    config = write_config(
        tmp_path / "node",
        "sqlite:///fiona.db",
        node={
            **node,
            "tls": {
                "port": tls_port,
                "cert_file": str(pki / "server.pem"),
                "key_file": str(pki / "server.key"),
                "ca_file": str(pki / "ca.pem"),
            },
        },
    )
    raw = yaml.safe_load(config.read_text())
    return FionaServer(config, raw["node"]["port"], tmp_path / "node" / "spool"), tls_port


def test_fiona_receives_over_tls_and_requires_a_client_certificate(
    tmp_path: Path, pki: Path
) -> None:
    server, tls_port = _tls_node(tmp_path, pki)
    server.start()
    try:
        files = write_study(tmp_path / "study", 1, 2)
        assert _storescu_tls(tls_port, files, pki).startswith("rc=0"), server.log()
        stored = list((tmp_path / "node" / "spool" / "incoming").rglob("*.dcm"))
        assert len(stored) == 2
        # Plain DICOM on the TLS port gets nowhere and stores nothing.
        other = write_study(tmp_path / "other", 1, 1)
        assert not _storescu_tls(tls_port, other, pki, tls=False).startswith("rc=0")
        assert len(list((tmp_path / "node" / "spool" / "incoming").rglob("*.dcm"))) == 2
    finally:
        server.stop()


def test_forwarding_to_a_tls_destination(tmp_path: Path, pki: Path) -> None:
    tls_args = ("+tls", str(pki / "server.key"), str(pki / "server.pem"),
                "+cf", str(pki / "ca.pem"))  # fmt: skip
    with StoreSCP(tmp_path / "scp", extra_args=tls_args) as scp:
        config = write_config(
            tmp_path / "node",
            "sqlite:///fiona.db",
            destinations={
                "secure": {
                    "kind": "dicom",
                    "host": "127.0.0.1",
                    "port": scp.port,
                    "ae_title": scp.ae_title,
                    "tls": {
                        "ca_file": str(pki / "ca.pem"),
                        "cert_file": str(pki / "client.pem"),
                        "key_file": str(pki / "client.key"),
                    },
                }
            },
            projects={"BICAM": {"destinations": ["secure"], "uid_scheme": "hmac"}},
            forwarding={"poll_seconds": 0.2},
        )
        raw = yaml.safe_load(config.read_text())
        server = FionaServer(config, raw["node"]["port"], tmp_path / "node" / "spool")
        server.start()
        try:
            files = write_study(tmp_path / "study", 1, 3)
            assert _storescu_tls(server.port, files, pki, tls=False).startswith("rc=0")
            loaded = load_config(config)
            engine = make_engine(loaded.database.url)
            sessions = make_sessionmaker(engine)
            with sessions() as session, session.begin():
                request_id = create_request(
                    session,
                    study_instance_uid=dcmread(files[0]).StudyInstanceUID,
                    project="BICAM",
                    pseudonym="BICAM001",
                    requested_by="test",
                    now=utcnow(),
                    node_key=load_node_key(loaded.storage.path),
                ).id
            deadline = time.monotonic() + 60
            while True:
                with sessions() as session:
                    request = session.get(TransferRequest, request_id)
                    assert request is not None
                    if request.status not in (RequestStatus.NEW, RequestStatus.WAITING_FOR_DATA,
                                              RequestStatus.PROCESSING):  # fmt: skip
                        break
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.1)
            engine.dispose()
            assert request.status == RequestStatus.SENT, server.log()
            received = scp.wait_for_files(3)
            assert {dcmread(p).PatientID for p in received} == {"BICAM001"}
        finally:
            server.stop()


def test_every_receiving_process_serves_tls(tmp_path: Path, pki: Path) -> None:
    """With node.workers: 2, the worker inherits the TLS listener too: while one process
    holds a TLS association, the other serves the next."""
    server, tls_port = _tls_node(tmp_path, pki, workers=2)
    server.start()
    try:
        assert len(server.wait_for("listening", 2)) == 2
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        held = ae.associate(
            "127.0.0.1", tls_port, ae_title="FIONA", tls_args=(context, "localhost")
        )
        assert held.is_established
        try:
            files = write_study(tmp_path / "study", 1, 2)
            assert _storescu_tls(tls_port, files, pki).startswith("rc=0"), server.log()
        finally:
            held.release()
        ended = server.wait_for("association ended", 2, timeout=10)
        assert len({entry["pid"] for entry in ended}) == 2
        assert len(list((tmp_path / "node" / "spool" / "incoming").rglob("*.dcm"))) == 2
    finally:
        server.stop()

"""Logs: JSON lines, patient identifiers never in clear."""

from __future__ import annotations

import io
import json

import structlog

from fiona.logs import configure_logging, get_logger


def test_json_lines_with_phi_keys_redacted() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    structlog.reset_defaults()
    configure_logging("INFO", stream=stream)
    log = get_logger("test")
    log.info(
        "received",
        patient_name="Doe^Jane",
        PatientID="123456",
        patient_birth_date="19700101",
        OtherPatientIDs="X",
        calling_ae_title="CT01",
    )
    line = stream.getvalue().strip().splitlines()[-1]
    record = json.loads(line)
    assert record["event"] == "received"
    assert record["calling_ae_title"] == "CT01"
    for secret in ("Doe^Jane", "123456", "19700101"):
        assert secret not in line
    assert record["patient_name"] == "[redacted]"
    assert record["PatientID"] == "[redacted]"


def test_exception_messages_are_not_logged() -> None:
    """An exception may quote a value (a patient name): log its type and stack only."""
    import logging

    stream = io.StringIO()
    structlog.reset_defaults()
    configure_logging("INFO", stream=stream)
    log = get_logger("test")
    name = "^".join(["Doe", "Jane"])  # data, not source text (stack lines show source)
    try:
        raise ValueError(f"Invalid value for VR PN: '{name}'")
    except ValueError:
        log.exception("store failed")
    try:
        raise KeyError(name)
    except KeyError:
        logging.getLogger("pynetdicom").exception("from a library")
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        record = json.loads(line)
        assert "Doe^Jane" not in line
        assert "test_logs.py" in record["exception"]  # the stack is kept
    assert json.loads(lines[0])["exception"].endswith("builtins.ValueError")

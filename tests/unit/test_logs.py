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

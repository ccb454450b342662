"""Who may associate: called AE titles, calling AE allow-list, peer networks, disk."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fiona.audit import utcnow
from fiona.config import FionaConfig, NodeConfig, ProjectConfig
from fiona.scp.handlers import ScpHandlers
from fiona.scp.spool import Spool


def policy(tmp_path: Path, min_free_mb: int = 0, **node: object) -> ScpHandlers:
    config = FionaConfig(
        node=NodeConfig(**node),  # type: ignore[arg-type]
        projects={"BICAM": ProjectConfig(ae_titles=("BICAM",))},
    )
    ingestor = SimpleNamespace(spool=Spool(tmp_path, min_free_mb))
    return ScpHandlers(config, ingestor, utcnow)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("node", "calling", "called", "peer", "expected"),
    [
        ({}, "CT01", "FIONA", "127.0.0.1", None),
        ({}, "CT01", "BICAM", "127.0.0.1", None),  # a project's AE title (mode B)
        ({}, "CT01", "OTHER", "127.0.0.1", (0x01, 0x01, 0x07)),
        ({"accept_any_called_ae": True}, "CT01", "OTHER", "127.0.0.1", None),
        ({"allowed_calling_ae_titles": ["CT01"]}, "CT01", "FIONA", "127.0.0.1", None),
        ({"allowed_calling_ae_titles": ["CT01"]}, "MR01", "FIONA", "127.0.0.1", (0x01, 0x01, 0x03)),
        ({"allowed_peers": ["10.1.0.0/16"]}, "CT01", "FIONA", "10.1.2.3", None),
        ({"allowed_peers": ["10.1.0.0/16"]}, "CT01", "FIONA", "10.2.0.1", (0x01, 0x01, 0x01)),
        ({"allowed_peers": ["::1"]}, "CT01", "FIONA", "::1", None),
        ({"allowed_peers": ["::1"]}, "CT01", "FIONA", "not-an-ip", (0x01, 0x01, 0x01)),
    ],
)
def test_association_policy(
    tmp_path: Path,
    node: dict[str, object],
    calling: str,
    called: str,
    peer: str,
    expected: tuple[int, int, int] | None,
) -> None:
    rejection = policy(tmp_path, **node).check_association(calling, called, peer)
    if expected is None:
        assert rejection is None
    else:
        assert rejection is not None
        assert (rejection.result, rejection.source, rejection.diagnostic) == expected
        assert rejection.reason


def test_low_disk_is_a_transient_rejection(tmp_path: Path) -> None:
    rejection = policy(tmp_path, min_free_mb=1 << 30).check_association(
        "CT01", "FIONA", "127.0.0.1"
    )
    assert rejection is not None
    assert (rejection.result, rejection.source, rejection.diagnostic) == (0x02, 0x03, 0x01)
    assert "min_free_mb" in rejection.reason

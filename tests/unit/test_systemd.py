"""The shipped systemd unit: hardened as documented, and accepted by ``systemd-analyze verify``.

``systemd-analyze verify`` insists that ExecStart's binary exists, so the verify tests run on
a copy whose ExecStart points at the ``fiona`` installed for this interpreter; the shipped unit
keeps ``/usr/local/bin/fiona``. A drop-in is verified the way systemd loads it: from
``<unit>.d/`` next to the unit.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "fiona.service"
DROP_IN = SYSTEMD_DIR / "fiona-port104.conf"
SHIPPED_EXEC_START = "/usr/local/bin/fiona serve --config /etc/fiona/fiona.yaml"
FIONA_DEFAULT_GRACE_SECONDS = 30.0  # `fiona serve --grace` default

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not found on PATH: cannot verify the unit on this machine",
)

Directive = tuple[str, str, str]  # (section, key, value)


def parse_unit(text: str) -> list[Directive]:
    """All assignments in file order; keys may repeat (systemd merges or resets them)."""
    directives: list[Directive] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):  # continuation
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        directives.append((section, key.strip(), value.strip()))
    return directives


def values(directives: list[Directive], section: str, key: str) -> list[str]:
    return [v for s, k, v in directives if s == section and k == key]


def effective(directives: list[Directive], section: str, key: str) -> str | None:
    """The last assignment wins for single-valued settings."""
    found = values(directives, section, key)
    return found[-1] if found else None


def seconds(span: str) -> float:
    """A systemd time span such as ``90``, ``90s``, ``1min 30s``, ``2m``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def unit() -> list[Directive]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def drop_in() -> list[Directive]:
    return parse_unit(DROP_IN.read_text(encoding="utf-8"))


# --- the shipped unit, as a user relies on it ------------------------------------------------


def test_runs_fiona_serve_as_dedicated_user(unit: list[Directive]) -> None:
    assert effective(unit, "Service", "ExecStart") == SHIPPED_EXEC_START
    assert effective(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"  # rules
    assert effective(unit, "Service", "Type") in {"simple", "exec"}
    assert effective(unit, "Service", "User") == "fiona"
    assert effective(unit, "Service", "Group") == "fiona"
    assert effective(unit, "Install", "WantedBy") == "multi-user.target"


def test_restarts_on_failure_and_stops_gracefully(unit: list[Directive]) -> None:
    assert effective(unit, "Service", "Restart") == "on-failure"
    assert seconds(effective(unit, "Service", "RestartSec") or "0") > 0
    assert effective(unit, "Service", "KillSignal") == "SIGTERM"
    stop_timeout = seconds(effective(unit, "Service", "TimeoutStopSec") or "0")
    assert stop_timeout > FIONA_DEFAULT_GRACE_SECONDS + 10, "no time left after the grace period"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0027"),
    ],
)
def test_hardening_directive(unit: list[Directive], key: str, expected: str) -> None:
    assert effective(unit, "Service", key) == expected


def test_only_the_storage_folder_is_writable(unit: list[Directive]) -> None:
    writable = [
        path.lstrip("-+")
        for entry in values(unit, "Service", "ReadWritePaths")
        for path in entry.split()
    ]
    state = [
        f"/var/lib/{name}"
        for entry in values(unit, "Service", "StateDirectory")
        for name in entry.split()
    ]
    assert set(writable + state) == {"/var/lib/fiona"}


def test_network_and_system_calls_restricted(unit: list[Directive]) -> None:
    families = set((effective(unit, "Service", "RestrictAddressFamilies") or "").split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    filters = values(unit, "Service", "SystemCallFilter")
    assert filters and filters[0] == "@system-service"
    assert all(f == "@system-service" or f.startswith("~") for f in filters[1:])


def test_main_unit_grants_no_capabilities(unit: list[Directive]) -> None:
    assert values(unit, "Service", "CapabilityBoundingSet") == [""]
    assert values(unit, "Service", "AmbientCapabilities") == [""]
    assert not any("CAP_NET_BIND_SERVICE" in value for _, _, value in unit)


def test_drop_in_adds_only_net_bind_service(drop_in: list[Directive]) -> None:
    assert {(section, key) for section, key, _ in drop_in} == {
        ("Service", "CapabilityBoundingSet"),
        ("Service", "AmbientCapabilities"),
    }
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        granted = {cap for value in values(drop_in, "Service", key) for cap in value.split()}
        assert granted == {"CAP_NET_BIND_SERVICE"}, key


# --- systemd-analyze verify ------------------------------------------------------------------


def fiona_exec_prefix() -> str:
    """ExecStart's command for the fiona installed with this interpreter."""
    candidates = [Path(sys.executable).with_name("fiona"), shutil.which("fiona")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return quote(str(Path(candidate).absolute()))
    return f"{quote(sys.executable)} -m fiona"


def quote(word: str) -> str:
    word = word.replace("%", "%%")  # systemd specifiers
    return f'"{word}"' if re.search(r"\s", word) else word


def install_copy(directory: Path, drop_ins: dict[str, str] | None = None) -> Path:
    """Write the unit (ExecStart pointing at a real fiona) and its drop-ins to `directory`."""
    text = UNIT.read_text(encoding="utf-8")
    shipped = f"ExecStart={SHIPPED_EXEC_START}\n"
    assert text.count(shipped) == 1
    installed = "ExecStart=" + SHIPPED_EXEC_START.replace(
        "/usr/local/bin/fiona", fiona_exec_prefix(), 1
    )
    copy = directory / UNIT.name
    copy.write_text(text.replace(shipped, installed + "\n"), encoding="utf-8")
    if drop_ins:
        conf_dir = directory / f"{UNIT.name}.d"
        conf_dir.mkdir()
        for name, content in drop_ins.items():
            (conf_dir / name).write_text(content, encoding="utf-8")
    return copy


def verify(unit_path: Path) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify`; return its status and the lines about our files."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = (result.stderr + result.stdout).splitlines()
    ours = [line for line in output if str(unit_path.parent) in line or UNIT.name in line]
    return result.returncode, ours


def complaints(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r"unknown|ignoring", line, re.IGNORECASE)]


@needs_systemd_analyze
def test_verify_unit(tmp_path: Path) -> None:
    status, lines = verify(install_copy(tmp_path))
    assert status == 0, "\n".join(lines)
    assert complaints(lines) == []


@needs_systemd_analyze
def test_verify_unit_with_port104_drop_in(tmp_path: Path) -> None:
    drop_in = DROP_IN.read_text(encoding="utf-8")
    status, lines = verify(install_copy(tmp_path, {"port104.conf": drop_in}))
    assert status == 0, "\n".join(lines)
    assert complaints(lines) == []


@needs_systemd_analyze
def test_verify_reads_drop_ins_and_reports_unknown_keys(tmp_path: Path) -> None:
    """Guard for the two tests above: the drop-in directory is read, and a bad key is caught."""
    _, lines = verify(install_copy(tmp_path, {"bogus.conf": "[Service]\nNoSuchSetting=yes\n"}))
    assert any("NoSuchSetting" in line for line in complaints(lines)), "\n".join(lines)


def offline_security_supported() -> bool:
    if SYSTEMD_ANALYZE is None:
        return False
    help_text = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--help"], capture_output=True, text=True, check=False
    ).stdout
    return "--offline" in help_text and "--threshold" in help_text


@pytest.mark.skipif(
    not offline_security_supported(),
    reason="systemd-analyze not found, or without security --offline/--threshold (systemd < 250)",
)
def test_security_exposure_stays_low(tmp_path: Path) -> None:
    """`systemd-analyze security` scores 1.2 today ("OK"); fail above 2.0 (threshold in tenths)."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "security",
            "--offline=yes",
            "--threshold=20",
            "--no-pager",
            str(install_copy(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr

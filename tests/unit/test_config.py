"""Configuration: typed, frozen, errors naming file and key, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from fiona.config import load_config
from fiona.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "fiona.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_example_is_valid_and_embedded() -> None:
    config = load_config(REPO / "config" / "fiona.yaml")
    assert config.node.ae_title == "FIONA"
    assert config.database.url.startswith("sqlite:///")
    assert config.storage.path == (REPO / "config" / "var").resolve()


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, "storage: {path: spool}\ndatabase: {url: 'sqlite:///db/f.db'}\n")
    config = load_config(path)
    assert config.storage.path == (tmp_path / "conf" / "spool").resolve()
    assert config.database.url == f"sqlite:///{(tmp_path / 'conf' / 'db' / 'f.db').resolve()}"


def test_defaults_fill_a_minimal_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "node: {port: 4242}\n"))
    assert config.node.port == 4242
    assert config.stable_after_seconds == 15
    assert config.storage.min_free_mb == 512
    assert config.storage.path == (tmp_path / "conf" / "var").resolve()


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "{}\n"))
    with pytest.raises(ValidationError):
        config.node.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("node: {port: 70000}\n", "node.port", "less than or equal"),
        ("node: {ae_title: 'WAY_TOO_LONG_AE_TITLE'}\n", "node.ae_title", "not a valid AE title"),
        ("node: {prot: 1}\n", "node.prot", "Extra inputs"),
        ("storage: {min_free_mb: -1}\n", "storage.min_free_mb", "greater than or equal"),
        ("database: {url: 'mysql://x/y'}\n", "database.url", "only sqlite"),
        ("database: {url: 'postgresql+psycopg2://u@h/d'}\n", "database.url", "psycopg"),
        ("stable_after_seconds: 0\n", "stable_after_seconds", "greater than"),
        ("node: {allowed_peers: ['10.0.0.0/33']}\n", "node.allowed_peers", "not an IP"),
        ("projects: {bicam: {}}\n", "projects", "capitals"),
        ("projects: {BICAM: {ae_titles: [FIONA]}}\n", "<top>", "already used"),
        ("projects: {BICAM: {profile: nope}}\n", "projects.BICAM", "no built-in profile"),
        (
            "destinations: {w: {kind: dicomweb, url: 'ftp://x'}}\n",
            "destinations.w.dicomweb.url",
            "http",
        ),
        (
            "destinations: {w: {kind: dicomweb, url: 'http://x', username: u}}\n",
            "destinations.w.dicomweb",
            "go together",
        ),
        ("destinations: {w: {kind: smtp}}\n", "destinations.w", "does not match"),
        (
            "destinations: {w: {kind: dicomweb, url: 'http://x', username: u, password_file: p}}\n",
            "destinations.w.dicomweb.password_file",
            "not a readable file",
        ),
        ("projects: {BICAM: {destinations: [nope]}}\n", "<top>", "unknown destination"),
        ("projects: {BICAM: {profile: p.yaml}}\n", "projects.BICAM", "cannot read the profile"),
        ("projects: {BICAM: {uid_scheme: sha1}}\n", "projects.BICAM.uid_scheme", "mmiv-hex"),
        ("projects: {BICAM: {secret_file: none.key}}\n", "projects.BICAM", "cannot read"),
        (
            "projects: {BICAM: {date_offset_days: 99999}}\n",
            "projects.BICAM.date_offset_days",
            "less than or equal",
        ),
        (
            "projects: {BICAM: {pseudonym_pattern: '(['}}\n",
            "projects.BICAM.pseudonym_pattern",
            "not a regular expression",
        ),
        (
            "projects: {BICAM: {approval: {start: 2021-01-01, end: 2020-01-01}}}\n",
            "projects.BICAM.approval",
            "end is before start",
        ),
        ("requests: {source: redcap}\n", "requests", "needs a redcap"),
        ("requests: {source: rest}\n", "requests.source", "'redcap'"),
        (
            "routing: {unassigned_retention_days: 5, retention_warning_days: 7}\n",
            "routing",
            "shorter than the retention",
        ),
        ("projects: {BICAM: {number: '2020-1'}}\n", "projects.BICAM.number", "P20_01"),
        (
            "projects: {BICAM: {number: P20_01}, OTHER: {number: P20_01}}\n",
            "<top>",
            "is also BICAM's",
        ),
        (
            "requests: {redcap: {url: 'https://r/api/', token_file: t}}\n",
            "requests",
            "only read with source: redcap",
        ),
        (
            "requests: {source: redcap, redcap: {url: 'http://redcap.example/api/',"
            " token_file: t}}\n",
            "requests.redcap.url",
            "use https",
        ),
        (
            "requests: {source: redcap, redcap: {url: 'https://r/api/', token_file: none}}\n",
            "requests.redcap.token_file",
            "cannot read token_file",
        ),
        ("- a\n- b\n", "<top>", "mapping"),
        ("node: [\n", "<top>", "not valid YAML"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    matching = [line for line in message.splitlines() if f": {key}: " in line]
    assert matching, message
    assert words in " ".join(matching)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fiona", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def test_check_exits_2_on_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, "node: {port: 0}\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert f"{path}: node.port:" in result.stderr


def test_check_prints_effective_config_and_masks_password(tmp_path: Path) -> None:
    path = write(tmp_path, "database: {url: 'postgresql+psycopg://fiona:s3cret@db/fiona'}\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout
    assert "postgresql+psycopg://fiona:***@db/fiona" in result.stdout
    assert "min_free_mb: 512" in result.stdout


def test_fiona_config_environment_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "node: {ae_title: ENVNODE}\n")
    result = run_cli("check", env={"FIONA_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert "ae_title: ENVNODE" in result.stdout


def test_no_config_at_all_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FIONA_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "fiona", "check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "FIONA_CONFIG" in result.stderr


def test_project_secret_file_and_profile_path_resolve_against_the_config_folder(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "projects: {BICAM: {profile: mine.yaml, secret_file: keys/b.key, uid_scheme: hmac}}\n",
    )
    (path.parent / "keys").mkdir()
    (path.parent / "keys" / "b.key").write_text("short\n")
    (path.parent / "mine.yaml").write_text((REPO / "rules/profiles/basic.yaml").read_text())
    with pytest.raises(ConfigError) as info:  # 5 bytes is not a secret
        load_config(path)
    assert "at least 16 are needed" in str(info.value)
    (path.parent / "keys" / "b.key").write_text("0123456789abcdef0123456789abcdef\n")
    project = load_config(path).projects["BICAM"]
    assert project.secret_file == path.parent / "keys" / "b.key"
    assert project.profile == str(path.parent / "mine.yaml")


@pytest.mark.parametrize(
    ("content", "mode", "words"),
    [
        ("0123456789abcdef0123456789ABCDEF\n", 0o644, "readable by other users"),
        ("not-a-token\n", 0o600, "does not hold a REDCap API token"),
    ],
)
def test_a_redcap_token_file_must_be_private_and_hold_a_token(
    tmp_path: Path, content: str, mode: int, words: str
) -> None:
    token = tmp_path / "conf" / "redcap.token"
    token.parent.mkdir()
    token.write_text(content)
    token.chmod(mode)
    path = write(
        tmp_path,
        "requests: {source: redcap, redcap: {url: 'https://r/api/', token_file: redcap.token}}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert words in str(info.value) and "0123456789" not in str(info.value)


def test_a_redcap_source_polls_every_minute_unless_told(tmp_path: Path) -> None:
    token = tmp_path / "conf" / "redcap.token"
    token.parent.mkdir()
    token.write_text("0123456789abcdef0123456789ABCDEF\n")
    token.chmod(0o600)
    redcap = "redcap: {url: 'http://127.0.0.1:8080/api/', token_file: redcap.token}"
    config = load_config(write(tmp_path, f"requests: {{source: redcap, {redcap}}}\n"))
    assert config.requests.poll_seconds == 60
    assert config.requests.redcap is not None
    assert config.requests.redcap.token_file == token.resolve()
    config = load_config(
        write(tmp_path, f"requests: {{source: redcap, poll_seconds: 5, {redcap}}}\n")
    )
    assert config.requests.poll_seconds == 5
    assert load_config(write(tmp_path, "requests: {}\n")).requests.poll_seconds == 10


def test_check_also_validates_the_routing_rules(tmp_path: Path) -> None:
    rules = tmp_path / "conf" / "routing.yaml"
    path = write(tmp_path, "routing: {rules_file: routing.yaml}\nprojects: {BICAM: {}}\n")
    rules.write_text("rules: [{id: r, project: NOPE, match: {Modality: MR}}]\n")
    bad = run_cli("check", "--config", str(path))
    assert bad.returncode == 2 and "rules.0(r).project: unknown project 'NOPE'" in bad.stderr
    rules.write_text("rules: [{id: r, project: BICAM, match: {Modality: MR}}]\n")
    good = run_cli("check", "--config", str(path))
    assert good.returncode == 0 and f"# {rules}: OK, 1 rules" in good.stdout

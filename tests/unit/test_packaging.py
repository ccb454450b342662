"""The installed package carries what ``fiona serve`` needs at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_migrations_and_console_script(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("fiona-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    migrations = [n for n in names if n.startswith("fiona/db/migrations/")]
    assert "fiona/db/migrations/env.py" in migrations
    assert "fiona/db/migrations/script.py.mako" in migrations
    shipped = {Path(n).name for n in migrations if "/versions/" in n}
    in_repo = {p.name for p in (REPO / "fiona/db/migrations/versions").glob("*.py")}
    assert shipped == in_repo
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fiona = fiona.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    profiles = {Path(n).name for n in names if n.startswith("fiona/profiles/")}
    in_repo_profiles = {p.name for p in (REPO / "rules/profiles").glob("*.yaml")}
    assert in_repo_profiles and in_repo_profiles <= profiles
    # Packages are listed by hand in pyproject.toml (for the rules/profiles mapping): a new
    # sub-package that is not listed would be missing from the wheel.
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "fiona").rglob("__init__.py")}
    shipped_packages = {str(Path(n).parent) for n in names if n.endswith("/__init__.py")}
    assert packages <= shipped_packages

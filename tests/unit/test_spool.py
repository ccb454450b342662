"""The spool: safe paths, durable commit, free-space floor."""

from __future__ import annotations

from pathlib import Path

import pytest

from fiona.errors import OutOfSpaceError
from fiona.scp.spool import Spool, is_valid_uid


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("1.2.03.4", True),  # leading zero: invalid per PS3.5 but seen in the field; safe
        ("1", True),
        ("1." + "2" * 62, True),
        ("1." + "2" * 63, False),  # 65 characters
        ("", False),
        ("../../etc/passwd", False),
        ("1.2/3", False),
        ("1.2.", False),
        (".1.2", False),
        ("1..2", False),
        ("1.2.3 ", False),
        (None, False),
    ],
)
def test_uid_validation_guards_the_file_system(uid: object, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_commit_file_moves_bytes_into_place(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0)
    spool.prepare()
    tmp = spool.tmp / "x.dcm"
    tmp.write_bytes(b"abc")
    final = spool.instance_path("1.2", "1.2.3", "1.2.3.4")
    spool.commit_file(tmp, final)
    assert final.read_bytes() == b"abc"
    assert not tmp.exists()
    # A second version replaces the first atomically.
    tmp.write_bytes(b"def")
    spool.commit_file(tmp, final)
    assert final.read_bytes() == b"def"


def test_free_space_floor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0)
    spool.check_space()
    too_much = Spool(tmp_path, spool.free_bytes() // (1024 * 1024) + 10)
    with pytest.raises(OutOfSpaceError, match=r"below storage\.min_free_mb"):
        too_much.check_space()

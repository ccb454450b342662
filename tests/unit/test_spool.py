"""The spool: safe paths, durable commit, free-space floor."""

from __future__ import annotations

import os
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
    tmp = spool.claim_tmp() / "x.dcm"
    tmp.write_bytes(b"abc")
    final = spool.instance_path("1.2", "1.2.3", "1.2.3.4")
    spool.commit_file(tmp, final)
    assert final.read_bytes() == b"abc"
    assert not tmp.exists()
    # A second version replaces the first atomically.
    tmp.write_bytes(b"def")
    spool.commit_file(tmp, final)
    assert final.read_bytes() == b"def"
    spool.release_tmp()


def test_a_process_temporary_folder_lives_as_long_as_its_last_receiver(tmp_path: Path) -> None:
    """tmp/<pid> exists while a service of this process receives (serve, import; two nodes
    of one process share it); the last one to stop removes it unless a file was left there
    for restart recovery. Reading the spool (``fiona status``) makes none."""
    first, second = Spool(tmp_path, 0), Spool(tmp_path, 0)
    first.prepare()
    assert first.tmp_root.is_dir() and not first.tmp.exists()
    assert first.claim_tmp() == second.claim_tmp() == tmp_path / "tmp" / str(os.getpid())
    first.release_tmp()
    assert second.tmp.is_dir()  # the other service still receives into it
    second.release_tmp()
    assert not second.tmp.exists()
    (first.claim_tmp() / "left.dcm").write_bytes(b"x")
    first.release_tmp()
    assert (first.tmp / "left.dcm").read_bytes() == b"x"


def test_free_space_floor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0)
    spool.check_space()
    too_much = Spool(tmp_path, spool.free_bytes() // (1024 * 1024) + 10)
    with pytest.raises(OutOfSpaceError, match=r"below storage\.min_free_mb"):
        too_much.check_space()


def test_a_new_file_in_a_known_folder_has_its_folder_synced_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder fsync after a rename is put off only for a new file in an existing folder;
    a new folder or a replaced file is synced at once, and sync_folders() does the rest."""
    import fiona.scp.spool as spool_module

    synced: list[Path] = []
    monkeypatch.setattr(spool_module, "fsync_dir", synced.append)
    spool = Spool(tmp_path / "store", 0)
    spool.prepare()
    spool.claim_tmp()
    series = spool.instance_path("1.2", "1.2.3", "1.2.3.4").parent

    def received(data: bytes) -> Path:
        path = spool.tmp / f"rx-{len(data)}.dcm"
        path.write_bytes(data)
        return path

    spool.commit_file(received(b"a"), series / "1.dcm", synced=True, defer_folder_sync=True)
    assert sorted(synced) == sorted([series, series.parent, spool.incoming])  # new: at once
    synced.clear()
    spool.commit_file(received(b"bb"), series / "2.dcm", synced=True, defer_folder_sync=True)
    assert synced == []  # put off
    spool.commit_file(received(b"ccc"), series / "2.dcm", synced=True, defer_folder_sync=True)
    assert synced == [series]  # a replacement: at once
    synced.clear()
    spool.commit_file(received(b"dddd"), series / "3.dcm", synced=True)
    assert synced == [series]  # not asked to put it off
    synced.clear()
    spool.sync_folders()
    assert synced == [series]
    spool.sync_folders()
    assert synced == [series]  # nothing left
    assert (series / "2.dcm").read_bytes() == b"ccc"
    spool.release_tmp()

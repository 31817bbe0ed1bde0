"""Resume files: written atomically with their own mode, trusted only for the very same payload and slot."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from update_engine import progress
from update_engine.progress import MANIFEST_FILE, PROGRESS_FILE, Checkpointer, Progress, clear_progress, resumable


def test_round_trip_and_torn_files(tmp_path: Path) -> None:
    p = Progress("id", "/dev/x", 4, 123)
    p.save(tmp_path)
    assert Progress.load(tmp_path) == p
    assert stat.S_IMODE((tmp_path / PROGRESS_FILE).stat().st_mode) == 0o600
    for torn in (b'{"ident', b"[]", b'{"identity": 1}', b'{"identity": "a", "disk": "d", "index": "x", '
                                                         b'"data_done": 1}', b"\xff\xfe"):
        (tmp_path / PROGRESS_FILE).write_bytes(torn)
        assert Progress.load(tmp_path) is None


def test_resumable_only_for_the_same_payload_disk_and_slot(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"")
    link = tmp_path / "link.raw"
    link.symlink_to(disk)
    progress.start(tmp_path, b"MANIFEST", Progress("id", str(disk), 4, 0))
    Progress("id", str(disk), 4, 5000).save(tmp_path)
    assert resumable(tmp_path, "id", link, 4, b"MANIFEST") == 5000  # the same disk by another name
    for args in (("other", disk, 4, b"MANIFEST"), ("id", disk, 3, b"MANIFEST"), ("id", disk, 4, b"OTHER"),
                 ("id", tmp_path / "elsewhere", 4, b"MANIFEST")):
        progress.start(tmp_path, b"MANIFEST", Progress("id", str(disk), 4, 5000))
        assert resumable(tmp_path, *args) == 0
        assert not (tmp_path / PROGRESS_FILE).exists() and not (tmp_path / MANIFEST_FILE).exists()
    clear_progress(None)  # no state dir: nothing to do


def test_checkpointer_syncs_before_it_claims_and_surfaces_failures(tmp_path: Path) -> None:
    f = tmp_path / "slot"
    f.write_bytes(b"\0" * 10)
    fd = os.open(f, os.O_RDWR)
    try:
        c = Checkpointer(fd, tmp_path, "id", "d", 4)
        c.request(7)
        c.wait()
        assert Progress.load(tmp_path).data_done == 7
        bad = Checkpointer(fd, tmp_path / "missing-parent" / PROGRESS_FILE, "id", "d", 4)  # a file as the dir
        (tmp_path / "missing-parent").write_text("not a folder")
        bad.request(9)
        with pytest.raises(OSError):
            bad.wait()
        bad.close()  # close never raises
    finally:
        os.close(fd)

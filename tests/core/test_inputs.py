"""obelisk/inputs.py: what a command refuses before it opens a user-named file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from obelisk.inputs import InputFileError, check_input


def test_a_regular_file_passes(tmp_path: Path) -> None:
    f = tmp_path / "x.conf"
    f.write_text("")
    assert check_input(f, "config") == f
    link = tmp_path / "link"
    link.symlink_to(f)
    assert check_input(link) == link


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputFileError, match=r"fifo: is a FIFO, not a payload: give a regular file$"):
        check_input(fifo, "payload")
    with pytest.raises(InputFileError, match="give a regular file or a block device"):
        check_input(fifo, "disk", block_device=True)


def test_other_kinds_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="is a directory"):
        check_input(tmp_path, "definition")
    with pytest.raises(InputFileError, match="no such key: check the path"):
        check_input(tmp_path / "missing", "key")
    with pytest.raises(InputFileError, match="is a character device"):
        check_input("/dev/null", "disk", block_device=True)
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(sock_path))
        with pytest.raises(InputFileError, match="is a socket"):
            check_input(sock_path)

"""Checks on a path a user hands us before we open it for reading.

A FIFO, socket or character device given as a disk, config, payload, key or definition would
block ``open()``/``read()`` forever; a directory gives a confusing ``IsADirectoryError``. Every
command that reads a user-named file calls :func:`check_input` first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from obelisk.errors import ObeliskError


class InputFileError(ObeliskError):
    """A path given on the command line (or in a config) is not something we can read."""


def check_input(path: str | os.PathLike[str], what: str = "file", *, block_device: bool = False) -> Path:
    """``path`` as a Path when it is a regular file (or, with ``block_device``, a block device).

    Raises InputFileError naming the path and what to give instead. Symlinks are followed (stat).
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputFileError(f"{p}: no such {what}: check the path") from None
    except PermissionError:
        raise InputFileError(f"{p}: permission denied: run as a user that can read it") from None
    except OSError as exc:
        raise InputFileError(f"{p}: cannot read the {what}: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode) or (block_device and stat.S_ISBLK(st.st_mode)):
        return p
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
            else "a block device" if stat.S_ISBLK(st.st_mode) else "not a regular file")
    wanted = "a regular file or a block device" if block_device else "a regular file"
    raise InputFileError(f"{p}: is {kind}, not a {what}: give {wanted}")

"""Write a small file so that a crash leaves either the old or the new content, never a mix."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

# mkstemp's names: the prefix below, then 8 characters from [a-z0-9_].
_TEMPORARY = re.compile(r"^\..+\.tmp[a-z0-9_]{8}$")


def is_temporary(name: str) -> bool:
    """True for the name of a write_atomic temporary: one still present was left by a killed writer,
    unless a writer is running right now (callers that sweep must exclude writers, e.g. by a lock)."""
    return bool(_TEMPORARY.match(name))


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Temporary file beside ``path``, fsync, rename over ``path``, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name: threads of one process (a server's writers) must not share a temporary file.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    tmp = Path(name)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

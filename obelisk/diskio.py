"""The one I/O seam for writes that must survive a power cut: positioned writes and flushes.

The GPT code, the in-place grubenv rewrite and the slot writer write through :func:`pwrite_all`
and flush through :func:`fsync`. Nothing else happens here in production. A crash-consistency
harness installs a :class:`Recorder` (``recording(...)``) to get the exact sequence of writes and
flushes an operation issues against one disk, and builds the states a power cut could leave from
it (every prefix, torn writes, writes reordered or dropped between two flushes).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Write:
    offset: int
    data: bytes


@dataclass(frozen=True)
class Flush:
    pass


@dataclass
class Recorder:
    """Collects the writes and flushes issued against one file or block device (by device and inode)."""

    dev: int
    ino: int
    ops: list[Write | Flush] = field(default_factory=list)

    def matches(self, fd: int) -> bool:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (self.dev, self.ino) or (
            stat.S_ISBLK(st.st_mode) and st.st_rdev == self.ino and self.dev == -1)


_recorders: list[Recorder] = []


@contextlib.contextmanager
def recording(path: str | os.PathLike[str]) -> Iterator[Recorder]:
    """Record every write and flush this process issues through the seam against ``path``."""
    st = os.stat(path)
    rec = Recorder(-1, st.st_rdev) if stat.S_ISBLK(st.st_mode) else Recorder(st.st_dev, st.st_ino)
    _recorders.append(rec)
    try:
        yield rec
    finally:
        _recorders.remove(rec)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (os.pwrite may write less than asked)."""
    if _recorders:
        for rec in _recorders:
            if rec.matches(fd):
                rec.ops.append(Write(offset, bytes(data)))
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def fsync(fd: int) -> None:
    if _recorders:
        for rec in _recorders:
            if rec.matches(fd):
                rec.ops.append(Flush())
    os.fsync(fd)

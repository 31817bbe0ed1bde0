"""One apply per disk at a time: an exclusive ``flock`` held for the whole apply.

Two applies on one disk would both pick the same passive slot and interleave their writes (both said
"staged into slot B"). The lock is not taken on the disk itself: ``bootloader.slots`` flocks the disk
for each of its own read-modify-writes, and a second flock on the disk by the same process would wait
for ever. It is a lock file named by the disk's identity (device number for a block device, device
and inode for an image file, so every path to the same disk meets the same lock) in a runtime folder:
``/run/obelisk/locks`` for root, a private folder in the temp dir for other users. The holder writes
its pid into the file, so the refusal can name it. The kernel drops the lock when the holder dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from update_engine import omaha
from update_engine.errors import ApplyError
from update_engine.state import ensure_dir

ROOT_LOCK_DIR = Path("/run/obelisk/locks")


class DiskBusy(ApplyError):
    """Another apply holds the disk."""


def default_lock_dir() -> Path:
    if os.geteuid() == 0:
        return ROOT_LOCK_DIR
    return Path(tempfile.gettempdir()) / f"obelisk-{os.geteuid()}-locks"


def _own_dir(path: Path, mode: int) -> None:
    """``path`` as a folder of this user's (made with an explicit mode if missing; the umask does not decide)."""
    ensure_dir(path, mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ApplyError(f"lock folder {path} is not a folder owned by this user: remove it", omaha.ERR_POSTINSTALL)


def lock_name(disk: Path) -> str:
    st = os.stat(disk)
    if stat.S_ISBLK(st.st_mode):
        return f"apply-blk-{os.major(st.st_rdev)}-{os.minor(st.st_rdev)}.lock"
    return f"apply-file-{st.st_dev}-{st.st_ino}.lock"


@contextlib.contextmanager
def exclusive(disk: Path, lock_dir: Path | None = None) -> Iterator[None]:
    """Hold the apply lock of ``disk``; a second holder is refused at once (``DiskBusy`` naming the pid)."""
    where = lock_dir or default_lock_dir()
    try:
        _own_dir(where, 0o755 if where == ROOT_LOCK_DIR else 0o700)
        path = where / lock_name(disk)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ApplyError(f"cannot take the apply lock for {disk} in {where}: {exc.strerror}",
                         omaha.ERR_POSTINSTALL) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ApplyError(f"cannot take the apply lock {path}: {exc.strerror}", omaha.ERR_POSTINSTALL) from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            pid = holder if holder.isdigit() else "unknown"
            raise DiskBusy(f"another update apply is running on {disk} (pid {pid}): wait for it to finish",
                           omaha.ERR_POSTINSTALL) from None
        os.fchmod(fd, 0o644)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)

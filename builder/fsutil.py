"""File helpers the stages share: sparse copies, digests, deterministic cpio, crash-safe directories."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from builder.errors import BuildError

BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(BLOCK):
            h.update(chunk)
    return h.hexdigest()


def digest_tree(root: Path, *, exclude: Iterable[str] = ()) -> str:
    """SHA-256 over names, modes, link targets and contents of every file below ``root``."""
    skip = set(exclude)
    h = hashlib.sha256()
    if not root.exists():
        return h.hexdigest()
    if root.is_file():
        h.update(sha256_file(root).encode())
        return h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and d != "__pycache__")
        for name in sorted([*dirnames, *filenames]):
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            h.update(f"{rel}\0{stat.S_IMODE(st.st_mode):o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode) and name not in skip and not name.endswith(".pyc"):
                h.update(sha256_file(p).encode())
            h.update(b"\n")
    return h.hexdigest()


_ZERO = bytes(BLOCK)


def _sparse_digest(path: str, size: int) -> str:
    """SHA-256 of a file's bytes read where it holds data: each non-zero BLOCK-aligned block counts with
    its offset, all-zero blocks and holes only through the size. The same bytes give the same digest
    however the file is laid out, and a 2 GiB disk image with 100 MiB of data reads 100 MiB."""
    h = hashlib.sha256(f"{size}\0".encode())
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # A small file is one block: read it whole (no SEEK_DATA round trips for the many small files of a tree).
        ranges = [(0, size)] if size <= BLOCK else _data_ranges(fd, size)
        done = 0
        for start, length in ranges:
            pos = max(start - start % BLOCK, done)
            while pos < start + length:
                chunk = os.pread(fd, BLOCK, pos)
                if not chunk:
                    break
                if chunk != _ZERO[: len(chunk)]:
                    h.update(pos.to_bytes(8, "little"))
                    h.update(chunk)
                pos += len(chunk)
            done = max(done, pos)
    finally:
        os.close(fd)
    return h.hexdigest()


def entry_digest(root: Path, *, skip: str) -> str:
    """Digest of everything below ``root`` except its top-level file ``skip``: names, types, modes,
    link targets and contents (nothing is left out, unlike digest_tree's view of source folders)."""
    h = hashlib.sha256()
    top = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, top)
        for name in sorted([*dirnames, *filenames]):
            p = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel == skip:
                continue
            st = os.lstat(p)
            h.update(f"{rel}\0{st.st_mode:o}\0".encode(errors="surrogateescape"))
            if stat.S_ISLNK(st.st_mode):
                h.update(os.fsencode(os.readlink(p)))
            elif stat.S_ISREG(st.st_mode):
                h.update(_sparse_digest(p, st.st_size).encode())
            h.update(b"\n")
    return h.hexdigest()


def _data_ranges(fd: int, size: int) -> Iterable[tuple[int, int]]:
    """(offset, length) of the data regions of a file, skipping holes when the filesystem tells us."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            yield pos, size - pos  # no SEEK_DATA support: treat as all data
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        pos = end


def copy_sparse(src: Path, dst: Path, *, dst_offset: int = 0, truncate_to: int | None = None) -> None:
    """Copy ``src`` into ``dst`` at ``dst_offset`` without writing holes or all-zero blocks.

    ``dst`` keeps its other bytes (it is created if missing). Zero blocks are skipped because
    the destination is a fresh sparse file: leaving them as holes keeps disk images small.
    """
    size = src.stat().st_size
    flags = os.O_WRONLY | os.O_CREAT
    with src.open("rb") as fin:
        fdout = os.open(dst, flags, 0o644)
        try:
            if truncate_to is not None:
                os.ftruncate(fdout, truncate_to)
            for start, length in _data_ranges(fin.fileno(), size):
                fin.seek(start)
                done = 0
                while done < length:
                    chunk = fin.read(min(BLOCK, length - done))
                    if not chunk:
                        break
                    if chunk.count(0) != len(chunk):
                        os.pwrite(fdout, chunk, dst_offset + start + done)
                    done += len(chunk)
            if truncate_to is None:
                cur = os.fstat(fdout).st_size
                if cur < dst_offset + size:
                    os.ftruncate(fdout, dst_offset + size)
        finally:
            os.close(fdout)


def copy_file(src: Path, dst: Path) -> None:
    """A sparse copy of a whole file to a new path (mode kept)."""
    if dst.exists():
        dst.unlink()
    copy_sparse(src, dst, truncate_to=src.stat().st_size)
    shutil.copymode(src, dst)


def make_sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _refuse(root: Path, p: Path) -> None:
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        what = "a symlink" if p.is_symlink() else "not a directory"
        raise BuildError(f"the OS tree's /{p.relative_to(root)} is {what}: the build changes files below it; "
                         "make it a directory in the source")


def dirs_inside(root: Path, rel: str | Path) -> Path:
    """``root/rel`` as a real directory (made when missing), refusing a symlink or a file on the way.

    An OS tree comes from a source that may hold any symlink (``etc/ssh -> /root/.ssh``); following
    one while adding files would write on the build host instead of into the tree.
    """
    p = root
    for comp in Path(rel).parts:
        p = p / comp
        _refuse(root, p)
        if not p.exists():
            p.mkdir()
    return p


def path_inside(root: Path, rel: str | Path) -> Path:
    """``root/rel`` after checking that no folder on the way is a symlink (the last part may be anything)."""
    p = root
    parts = Path(rel).parts
    for comp in parts[:-1]:
        p = p / comp
        _refuse(root, p)
        if not p.exists():
            break
    return root.joinpath(*parts)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(parent: Path, prefix: str = ".tmp-") -> None:
    """Remove ``<prefix>...-<pid>`` directories left by builds that were killed."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            remove_tree(p)


def write_newc(f: BinaryIO, entries: list[tuple[str, int, Path | None]], *, mtime: int) -> None:
    """Write a deterministic, uncompressed newc archive to ``f``; entries are (name, mode, file or
    None for a directory). Written here rather than with cpio(1) so that inodes, owners and times
    are fixed; file data is streamed, so big files (a whole usr.img) do not sit in memory."""
    pos = 0

    def put(data: bytes) -> None:
        nonlocal pos
        f.write(data)
        pos += len(data)

    def pad() -> None:
        put(b"\0" * ((4 - pos % 4) % 4))

    def header(ino: int, mode: int, size: int, name: str) -> None:
        fields = [ino, mode, 0, 0, 1, mtime, size, 0, 0, 0, 0, len(name) + 1, 0]
        put(b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + name.encode() + b"\0")
        pad()

    for ino, (name, mode, src) in enumerate(entries, start=1):
        if src is None:
            header(ino, stat.S_IFDIR | mode, 0, name)
            continue
        header(ino, stat.S_IFREG | mode, src.stat().st_size, name)
        with src.open("rb") as fin:
            while chunk := fin.read(BLOCK):
                put(chunk)
        pad()
    header(0, 0, 0, "TRAILER!!!")


def clamp_mtimes(root: Path, epoch: int) -> None:
    """Set every mtime below ``root`` (symlinks too) to ``epoch`` for reproducible filesystems."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*filenames, *dirnames]:
            os.utime(Path(dirpath, name), (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

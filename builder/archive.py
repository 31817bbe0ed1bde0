"""Unpacking an OS tree from a tarball or from OCI layers, without ever writing outside the tree.

A source archive is trusted for *what* it holds (it is an operating system: owners, setuid and
setgid bits, absolute symlinks are all kept) but never for *where* it writes. The rules are those
of tarfile's ``data`` filter, minus its mode stripping and its ban on absolute symlinks:

- an entry's name is relative and has no ``..`` component; an absolute name or ``..`` is refused;
- nothing is written through a symlink: every parent of an entry must be a real directory of the
  tree (walked from the tree's root one component at a time with ``O_NOFOLLOW`` directory fds), so
  an entry below a symlink the archive (or an earlier layer) made is refused; an entry that
  replaces a symlink replaces the link itself;
- a hard link may only point at a file already in the tree (found with the same walk; a link to a
  symlink links the symlink itself, never what it points at); ``..`` or absolute targets are refused;
- symlinks may point anywhere: they are never followed here, and they mean something only inside
  the running image;
- modes are kept whole (setuid, setgid, sticky), and owners (numeric ids) when the build runs as
  root; directory modes are set last, so a read-only directory does not stop later entries; times
  are not (the tree stage sets every time to SOURCE_DATE_EPOCH);
- **device nodes and FIFOs are skipped with a warning** (never created): a host's /dev is a
  devtmpfs, and a device node left in the build cache would hand whoever can read the cache the
  build host's disk or memory. Sockets and unknown entry types are skipped the same way;
- OCI whiteouts (``.wh.NAME`` removes NAME, ``.wh..wh..opq`` empties its directory) apply to the
  layers below only (entries of the same layer stay), resolve inside the tree with the same walk,
  and remove the entry itself, never what a symlink points at. A whiteout below a symlink is
  refused; one for something absent does nothing.

Extended attributes (file capabilities) are not restored, as before.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from builder.errors import BuildError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ArchiveError(BuildError):
    """A source archive cannot be unpacked safely (or at all); one line naming archive and entry."""


def split_name(name: str, where: str) -> list[str]:
    """The components of an entry name; refuses absolute names, ``..`` and NUL bytes."""
    if "\0" in name:
        raise ArchiveError(f"{where}: entry {name!r} has a NUL byte in its name: refusing the archive")
    if name.startswith("/"):
        raise ArchiveError(f"{where}: entry {name!r} has an absolute path: refusing the archive "
                           "(an OS tree archive holds relative names like ./etc/hostname)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{where}: entry {name!r} has a '..' component: refusing the archive")
    return parts


class Tree:
    """Directory-fd operations below one root that never follow a symlink."""

    def __init__(self, root: Path, where: str) -> None:
        self.root = root
        self.where = where
        self.fd = os.open(root, _DIR_FLAGS)

    def close(self) -> None:
        os.close(self.fd)

    @contextmanager
    def directory(self, parts: list[str], *, create: bool, entry: str) -> Iterator[int | None]:
        """A fd of the directory ``parts`` (None when absent and not ``create``)."""
        fd: int | None = self.walk(parts, create=create, entry=entry)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def walk(self, parts: list[str], *, create: bool, entry: str) -> int | None:
        fd = os.dup(self.fd)
        for i, comp in enumerate(parts):
            try:
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        return None
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    what = "a symlink" if self.is_link(fd, comp) else "not a directory"
                    raise ArchiveError(f"{self.where}: entry {entry!r}: {'/'.join(parts[:i + 1])} is {what}: "
                                       "refusing to write through it") from None
            finally:
                os.close(fd)
            fd = nfd
        return fd

    @staticmethod
    def is_link(dir_fd: int, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    @staticmethod
    def lstat(dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @staticmethod
    def remove(dir_fd: int, name: str) -> None:
        """Remove ``name`` (a directory with all it holds); a symlink is removed, not followed."""
        st = Tree.lstat(dir_fd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: never follows a symlink below
        else:
            os.unlink(name, dir_fd=dir_fd)


class Unpacker:
    """Applies archives (a tarball, or OCI layers one after the other) to one tree."""

    def __init__(self, root: Path, warn: Callable[[str], None]) -> None:
        self.root = root
        self.warn = warn
        self.as_root = os.geteuid() == 0
        self.dirs: dict[tuple[str, ...], tarfile.TarInfo] = {}  # attributes applied at the end
        self.skipped: list[str] = []

    def apply(self, path: Path, *, oci: bool) -> None:
        where = path.name if oci else str(path)
        tree = Tree(self.root, where)
        try:
            with tarfile.open(path, "r:*") as tf:
                members = tf.getmembers()
                for m in members:  # every name is checked before anything is written
                    split_name(m.name, where)
                    if m.islnk():
                        split_name(m.linkname, where)
                if oci:  # whiteouts hide what the layers below had, not this layer's own entries
                    for m in members:
                        self._guarded(self._whiteout, tree, m)
                for m in members:
                    if not (oci and _is_whiteout(m.name)):
                        self._guarded(self._entry, tree, m, tf)
        except (tarfile.TarError, EOFError) as exc:
            raise ArchiveError(f"{where}: cannot unpack: {exc}") from None
        except OSError as exc:
            raise ArchiveError(f"{where}: cannot read the archive: {exc.strerror or exc}") from None
        finally:
            tree.close()

    @staticmethod
    def _guarded(step: Callable[..., None], tree: Tree, m: tarfile.TarInfo, *args: object) -> None:
        """One entry; what the file system refuses (or a value it cannot take) names the entry."""
        try:
            step(tree, m, *args)
        except OSError as exc:
            raise ArchiveError(f"{tree.where}: entry {m.name!r}: {exc.strerror or exc}") from None
        except (OverflowError, ValueError) as exc:  # owner ids or modes out of range
            raise ArchiveError(f"{tree.where}: entry {m.name!r}: {exc}") from None

    def finish(self) -> None:
        """Directory modes and owners, deepest first (a 0555 directory must not stop its children)."""
        tree = Tree(self.root, str(self.root))
        try:
            for parts, m in sorted(self.dirs.items(), key=lambda kv: -len(kv[0])):
                try:
                    with tree.directory(list(parts), create=False, entry=m.name) as fd:
                        if fd is not None:
                            self._attrs_fd(fd, m)
                except ArchiveError:
                    continue  # a later layer put a symlink on the way: nothing of ours to set there
        finally:
            tree.close()
        if self.skipped:
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            self.warn(f"skipped {len(self.skipped)} device node(s), FIFO(s) or socket(s) of the source: "
                      f"{', '.join(self.skipped[:5])}{more} (a host's /dev is a devtmpfs)")

    # --- entries -------------------------------------------------------------------------------

    def _whiteout(self, tree: Tree, m: tarfile.TarInfo) -> None:
        if not _is_whiteout(m.name):
            return
        parts = split_name(m.name, tree.where)
        base = parts[-1]
        if base == OPAQUE:
            with tree.directory(parts[:-1], create=False, entry=m.name) as fd:
                if fd is not None:
                    for child in os.listdir(fd):
                        Tree.remove(fd, child)
            return
        if base.startswith(WHITEOUT + WHITEOUT):
            return  # other .wh..wh.* names are aufs bookkeeping, not whiteouts
        name = base[len(WHITEOUT):]
        if name in ("", ".", ".."):
            raise ArchiveError(f"{tree.where}: whiteout {m.name!r} names no file: refusing the layer")
        with tree.directory(parts[:-1], create=False, entry=m.name) as fd:
            if fd is not None:
                Tree.remove(fd, name)

    def _entry(self, tree: Tree, m: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        parts = split_name(m.name, tree.where)
        if not parts:
            return  # the archive's "./": the tree's root is ours
        if m.ischr() or m.isblk() or m.isfifo() or not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            self.skipped.append("/".join(parts))
            return
        if m.islnk():
            target = split_name(m.linkname, tree.where)
            if not target:
                raise ArchiveError(f"{tree.where}: hard link {m.name!r} points at the tree's root: refusing it")
        with tree.directory(parts[:-1], create=True, entry=m.name) as pfd:
            assert pfd is not None
            leaf = parts[-1]
            if m.isdir():
                st = Tree.lstat(pfd, leaf)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    Tree.remove(pfd, leaf)
                    st = None
                if st is None:
                    os.mkdir(leaf, 0o755, dir_fd=pfd)
                self.dirs[tuple(parts)] = m
            elif m.issym():
                Tree.remove(pfd, leaf)
                os.symlink(m.linkname, leaf, dir_fd=pfd)
                if self.as_root:
                    os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            elif m.islnk():
                self._hardlink(tree, m, pfd, leaf, target)
            else:
                self._file(tf, m, pfd, leaf)

    def _file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, leaf: str) -> None:
        Tree.remove(pfd, leaf)
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        with os.fdopen(fd, "wb") as out:
            src = tf.extractfile(m)
            assert src is not None  # a regular member always has data
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            self._attrs_fd(out.fileno(), m)

    def _hardlink(self, tree: Tree, m: tarfile.TarInfo, pfd: int, leaf: str, target: list[str]) -> None:
        with tree.directory(target[:-1], create=False, entry=m.name) as sfd:
            st = Tree.lstat(sfd, target[-1]) if sfd is not None else None
            if st is None or stat.S_ISDIR(st.st_mode):
                raise ArchiveError(f"{tree.where}: hard link {m.name!r} -> {m.linkname!r}: the target is not a file "
                                   "in the tree: refusing the archive")
            dst = Tree.lstat(pfd, leaf)
            if dst is not None and (dst.st_dev, dst.st_ino) == (st.st_dev, st.st_ino):
                return  # already that file
            Tree.remove(pfd, leaf)
            # follow_symlinks=False: a link to a symlink links the symlink itself, not what it points at.
            os.link(target[-1], leaf, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)

    def _attrs_fd(self, fd: int, m: tarfile.TarInfo) -> None:
        if self.as_root:
            os.fchown(fd, m.uid, m.gid)  # before the mode: chown clears setuid and setgid
        os.fchmod(fd, stat.S_IMODE(m.mode))  # all of it: setuid/setgid/sticky are part of an OS tree


def _is_whiteout(name: str) -> bool:
    return name.rstrip("/").rsplit("/", 1)[-1].startswith(WHITEOUT)


def unpack(archives: list[Path], root: Path, *, oci: bool, warn: Callable[[str], None]) -> None:
    """Apply ``archives`` in order to ``root`` (an existing, empty directory)."""
    u = Unpacker(root, warn)
    for path in archives:
        u.apply(path, oci=oci)
    u.finish()

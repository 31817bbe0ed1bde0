"""A plan of file changes against a target root, committed only after everything is planned.

Apply first works out every file it would write (reading through the plan, so a user created in
passwd is visible to a later chown) and only then touches the disk. A config that fails at any
point before commit therefore changes nothing; a config that matches the root plans nothing,
which is how the second apply knows it is a no-op.

Every path is an absolute path *inside* the target root. Reads and writes resolve it the way the
kernel would inside a chroot of that root: an absolute link target starts again at the root, so
an image's `/etc/x -> /usr/lib/x` means the image's file, never this machine's. `..` in a path is
refused, a link that climbs above the root or loops is an error naming the link, and the last
component of a write is replaced (a link there is replaced, never followed).
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cloudconfig.schema import MAX_ID
from obelisk.errors import ObeliskError

MAX_LINKS = 40  # as the kernel's ELOOP limit
MAX_READ = 64 * 1024 * 1024  # a file apply reads from the root (passwd, units, update.conf)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block the read


class ConfigApplyError(ObeliskError, ValueError):
    """The config cannot be applied to this root; nothing was changed. One line, for the user."""


def norm(path: str) -> str:
    """'/etc//x/./y' -> '/etc/x/y'; refuses relative paths, '..' and NUL (they could leave the root)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigApplyError(f"{path!r} is not an absolute path inside the target root")
    if "\0" in path:
        raise ConfigApplyError(f"{path!r}: NUL is not allowed in a path")
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise ConfigApplyError(f"{path}: '..' is not allowed in a path (it could leave the target root)")
    return "/" + "/".join(parts)


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a link" if stat.S_ISLNK(mode)
            else "not a regular file")


@dataclass
class Change:
    op: str  # "write" | "symlink" | "hardlink" | "remove" | "mkdir" | "chmod"
    path: str  # absolute path inside the target root
    data: bytes | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    target: str | None = None  # symlink target; for a hard link the in-root path it links to
    why: str = ""

    def describe(self, planned: bool = False) -> str:
        """'wrote /etc/x ...' after a commit, 'would write /etc/x ...' for a dry run."""
        verb = {"write": ("wrote", "would write"), "symlink": ("linked", "would link"),
                "hardlink": ("hard-linked", "would hard-link"), "remove": ("removed", "would remove"),
                "mkdir": ("created directory", "would create directory"),
                "chmod": ("set mode/owner of", "would set mode/owner of")}[self.op][planned]
        if self.op == "write":
            return f"{verb} {self.path} (mode {self.mode:04o}, {len(self.data or b'')} bytes){self._why()}"
        if self.op == "symlink":
            return f"{verb} {self.path} -> {self.target}{self._why()}"
        if self.op == "hardlink":
            return f"{verb} {self.path} to {self.target}{self._why()}"
        if self.op in ("mkdir", "chmod"):
            return f"{verb} {self.path} (mode {self.mode:04o}, owner {self.uid}:{self.gid}){self._why()}"
        return f"{verb} {self.path}{self._why()}"

    def _why(self) -> str:
        return f" [{self.why}]" if self.why else ""

    def check(self) -> None:
        """Every value chown/chmod/symlink will be given, checked before the first write of the plan."""
        for what, n in (("uid", self.uid), ("gid", self.gid)):
            if n is not None and not (isinstance(n, int) and 0 <= n <= MAX_ID):
                raise ConfigApplyError(f"{self.path}: {what} {n} is out of range (0 to {MAX_ID})")
        if self.mode is not None and not (isinstance(self.mode, int) and 0 <= self.mode <= 0o7777):
            raise ConfigApplyError(f"{self.path}: mode {self.mode!r} is not a file mode (0000 to 7777)")
        if self.op in ("symlink", "hardlink") and (not self.target or "\0" in self.target):
            raise ConfigApplyError(f"{self.path}: bad link target {self.target!r}")


@dataclass
class Plan:
    root: Path
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things done or skipped that are not file changes
    commands: list[list[str]] = field(default_factory=list)  # run after commit, live system only
    _pending: dict[str, Change] = field(default_factory=dict)

    # --- where an in-root path lives ------------------------------------------------------------
    def _resolve(self, path: str, *, follow_last: bool) -> Path:
        """Host path of ``path`` with links resolved inside the root (see the module docstring)."""
        todo = norm(path).split("/")[1:][::-1]  # a stack: the next component is last
        done: list[str] = []
        hops, link, link_to = 0, "", ""
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":  # only from a link target: norm() refused it in the path itself
                if not done:
                    raise ConfigApplyError(f"{link} in {self.root} is a link out of the target root ({link_to})")
                done.pop()
                continue
            if not todo and not follow_last:
                done.append(part)
                break
            here = self.root.joinpath(*done, part)
            try:
                st = os.lstat(here)
            except (FileNotFoundError, NotADirectoryError):
                done.append(part)
                continue
            except OSError as exc:
                raise ConfigApplyError(f"cannot use {path} in {self.root}: {exc.strerror}") from None
            if not stat.S_ISLNK(st.st_mode):
                done.append(part)
                continue
            hops += 1
            link = "/" + "/".join([*done, part])
            if hops > MAX_LINKS:
                raise ConfigApplyError(f"cannot use {path}: {link} in {self.root} is a link loop "
                                       f"(more than {MAX_LINKS} links)")
            link_to = os.readlink(here)
            if link_to.startswith("/"):
                done = []  # absolute: from the target root, as inside a chroot
            todo.extend(reversed(link_to.split("/")))
        return self.root.joinpath(*done)

    def host(self, path: str) -> Path:
        """Where an absolute in-root path lives on this machine (its last component not followed)."""
        return self._resolve(path, follow_last=False)

    def link_target(self, path: str) -> str | None:
        """What the link at ``path`` points to, None when it is not a link."""
        try:
            return os.readlink(self.host(path))
        except OSError:  # not a link, or absent
            return None

    # reads see planned writes first
    def read(self, path: str) -> bytes | None:
        """Content of a regular file in the root; None when absent or a directory."""
        path = norm(path)
        ch = self._pending.get(path)
        if ch is not None:
            return ch.data if ch.op == "write" else None
        if self.link_target(path) == "/dev/null":
            return b""  # a masked unit: systemd reads it as empty, and so do we
        data = _read_host(self._resolve(path, follow_last=True), path, self.root, MAX_READ)
        if data is None:
            self._refuse_dangling(path)
        return data

    def _refuse_dangling(self, path: str) -> None:
        """A link on the way to ``path`` that leads nowhere inside the root: on this machine it may well lead
        somewhere (``/etc/shadow -> /etc/shadow`` of the host), so it is an error naming it, not "no file"."""
        cur = ""
        for part in path.split("/")[1:]:
            cur = f"{cur}/{part}"
            target = self.link_target(cur)
            if target is not None and not os.path.exists(self._resolve(cur, follow_last=True)):
                raise ConfigApplyError(f"cannot read {path}: {cur} in {self.root} is a link to {target}, which does "
                                       "not exist inside the target root (links are resolved inside the root, never "
                                       "out of it); fix or remove the link")

    def read_text(self, path: str) -> str | None:
        data = self.read(path)
        return None if data is None else data.decode("utf-8", "replace")

    def exists(self, path: str) -> bool:
        path = norm(path)
        ch = self._pending.get(path)
        if ch is not None:
            return ch.op != "remove"
        return os.path.lexists(self.host(path))

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(self._resolve(path, follow_last=True))

    def listdir(self, path: str) -> list[str]:
        """Names in a directory of the root (sorted); [] when it is not one."""
        try:
            return sorted(os.listdir(self._resolve(path, follow_last=True)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise ConfigApplyError(f"cannot list {path} in {self.root}: {exc.strerror}") from None

    def _check_parents(self, path: str) -> None:
        """Every existing ancestor must be a directory of the root (a link must lead to one inside it)."""
        parts = path.split("/")[1:]
        cur = ""
        for part in parts[:-1]:
            cur = f"{cur}/{part}"
            pend = self._pending.get(cur)
            if pend is not None and pend.op not in ("mkdir", "chmod"):
                raise ConfigApplyError(f"cannot write {path}: {cur} is planned as a file, not a directory")
            try:
                st = os.lstat(self._resolve(cur, follow_last=True))
            except FileNotFoundError:
                target = self.link_target(cur)
                if target is not None:  # a dangling link: writing through it would create its target
                    raise ConfigApplyError(f"cannot write {path}: {cur} is a link to {target}, which is not a "
                                           f"directory inside the target root {self.root}") from None
                return
            except OSError as exc:
                raise ConfigApplyError(f"cannot write {path}: {cur}: {exc.strerror}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise ConfigApplyError(f"cannot write {path}: {cur} exists in {self.root} and is not a directory")

    def lstat(self, path: str) -> os.stat_result | None:
        """The root's own entry at ``path`` (the last component not followed); None when absent."""
        try:
            return os.lstat(self.host(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise ConfigApplyError(f"cannot use {path}: {exc.strerror}") from None

    def planned(self, path: str) -> Change | None:
        """The change planned for ``path`` so far, if any."""
        return self._pending.get(norm(path))

    def kind(self, path: str) -> str | None:
        """"file" | "dir" | "link" | "hardlink" | "other" | None (absent), planned changes first."""
        ch = self.planned(path)
        if ch is not None:
            return {"write": "file", "symlink": "link", "mkdir": "dir", "chmod": "dir", "hardlink": "hardlink",
                    "remove": None}[ch.op]
        st = self.lstat(path)
        if st is None:
            return None
        return ("file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
                else "link" if stat.S_ISLNK(st.st_mode) else "other")

    def owner_mode(self, path: str) -> tuple[int, int, int] | None:
        """(uid, gid, mode) as planned, else as on disk; None when absent or planned as a link."""
        ch = self.planned(path)
        if ch is not None and ch.op in ("write", "mkdir", "chmod"):
            return ch.uid or 0, ch.gid or 0, ch.mode or 0
        st = self.lstat(path)
        return None if st is None else (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))

    # --- planning -------------------------------------------------------------------------------
    def write(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, why: str = "") -> bool:
        """Plan writing a file; nothing is planned when content, mode and owner already match."""
        path = norm(path)
        self._check_parents(path)
        pend = self._pending.get(path)
        if pend is not None and pend.op == "write" and (pend.data, pend.mode, pend.uid, pend.gid) == (data, mode, uid,
                                                                                                     gid):
            return False
        st = self.lstat(path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise ConfigApplyError(f"{path} is a directory in {self.root}; cannot write a file there")
        if (st is not None and stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
                and st.st_uid == uid and st.st_gid == gid and st.st_size == len(data)
                and _read_host(self.host(path), path, self.root, len(data)) == data):
            if pend is not None:  # an earlier entry for this path is overridden by one the disk already matches
                self.changes.remove(pend)
                del self._pending[path]
            return False
        self._add(Change("write", path, data=data, mode=mode, uid=uid, gid=gid, why=why))
        return True

    def symlink(self, path: str, target: str, why: str = "", uid: int | None = None, gid: int | None = None) -> bool:
        """Plan a symbolic link (owned by uid:gid when given, else by whoever commits); nothing is planned
        when the link is there already."""
        path = norm(path)
        self._check_parents(path)
        pend = self._pending.get(path)
        if pend is not None and pend.op == "symlink" and pend.target == target:
            return False
        if self.link_target(path) == target:
            if pend is not None:  # as in write(): an earlier plan overridden by one the disk already matches
                self.changes.remove(pend)
                del self._pending[path]
            return False
        st = self.lstat(path)
        if pend is None and st is not None and stat.S_ISDIR(st.st_mode):
            raise ConfigApplyError(f"{path} is a directory in {self.root}; cannot replace it with a link")
        self._add(Change("symlink", path, target=target, uid=uid, gid=gid, why=why))
        return True

    def hardlink(self, path: str, target: str, why: str = "") -> bool:
        """Plan a hard link at ``path`` to the in-root file ``target`` (it must exist when committed: plan the
        target's write first)."""
        path = norm(path)
        self._check_parents(path)
        self._add(Change("hardlink", path, target=norm(target), why=why))
        return True

    def remove(self, path: str, why: str = "") -> bool:
        path = norm(path)
        if not self.exists(path):
            return False
        st = self.lstat(path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise ConfigApplyError(f"{path} is a directory in {self.root}; refusing to remove it")
        self._add(Change("remove", path, why=why))
        return True

    def mkdir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0, why: str = "") -> bool:
        path = norm(path)
        self._check_parents(path)
        if path in self._pending:
            return False
        st = self.lstat(path)
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                raise ConfigApplyError(f"{path} exists in {self.root} and is not a directory")
            if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid):
                return False
            self._add(Change("chmod", path, mode=mode, uid=uid, gid=gid, why=why))
            return True
        self._add(Change("mkdir", path, mode=mode, uid=uid, gid=gid, why=why))
        return True

    def _add(self, ch: Change) -> None:
        ch.check()  # a bad uid or mode found while planning, not as an OverflowError half-way through commit
        # a later plan for the same path replaces the earlier one (the last write_files entry wins)
        old = self._pending.get(ch.path)
        if old is not None:
            # keep the first position (passwd before the homes chowned to its users), merge the reasons
            if old.why and ch.why and ch.why not in old.why.split(", "):
                ch.why = f"{old.why}, {ch.why}"
            self.changes[self.changes.index(old)] = ch
        else:
            self.changes.append(ch)
        self._pending[ch.path] = ch

    # --- commit ---------------------------------------------------------------------------------
    def commit(self) -> None:
        """Make every planned change. Values were checked when planned; an OS failure here (disk full,
        read-only root) names the path, and the changes before it stay made (each one is atomic)."""
        for ch in self.changes:
            ch.check()
        if os.geteuid() != 0:
            # chown would fail half-way through; refuse before the first write instead
            foreign = [c for c in self.changes if (c.op in ("write", "mkdir", "chmod") or
                                                   (c.op == "symlink" and (c.uid or c.gid)))
                       and ((c.uid or 0) != os.geteuid() or (c.gid or 0) not in os.getgroups() + [os.getegid()])]
            if foreign:
                raise ConfigApplyError(f"{foreign[0].path} must be owned by {foreign[0].uid}:{foreign[0].gid}, "
                                       "which needs root: run apply as root (nothing was changed)")
        for i, ch in enumerate(self.changes):
            try:
                self._commit_one(ch)
            except OSError as exc:
                done = f"the {i} change(s) listed before it were made; " if i else "nothing was changed; "
                raise ConfigApplyError(f"cannot {_VERBS[ch.op]} {ch.path} in {self.root}: {exc.strerror or exc}; "
                                       f"{done}fix it and run apply again") from None

    def _commit_one(self, ch: Change) -> None:
        host = self.host(ch.path)
        if ch.op in ("write", "symlink", "hardlink", "mkdir"):
            _make_parents(host.parent, self.root)
        if ch.op == "write":
            _atomic_write(host, ch.data or b"", ch.mode or 0, ch.uid or 0, ch.gid or 0)
        elif ch.op == "symlink":
            tmp = host.with_name(f".{host.name}.obelisk-tmp")
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(ch.target or "", tmp)
            if ch.uid is not None or ch.gid is not None:
                os.lchown(tmp, -1 if ch.uid is None else ch.uid, -1 if ch.gid is None else ch.gid)
            os.replace(tmp, host)
        elif ch.op == "hardlink":
            tmp = host.with_name(f".{host.name}.obelisk-tmp")
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.link(self.host(ch.target or ""), tmp, follow_symlinks=False)
            os.replace(tmp, host)
        elif ch.op == "remove":
            os.unlink(host)
        elif ch.op == "mkdir":
            os.mkdir(host, 0o700)  # opened up by _own_dir once the owner is right
            _own_dir(host, ch.mode or 0, ch.uid or 0, ch.gid or 0)
        elif ch.op == "chmod":
            _own_dir(host, ch.mode or 0, ch.uid or 0, ch.gid or 0)


_VERBS = {"write": "write", "symlink": "link", "hardlink": "hard-link", "remove": "remove", "mkdir": "create directory",
          "chmod": "set mode/owner of"}


def _read_host(host: Path, path: str, root: Path, limit: int) -> bytes | None:
    """A regular file's bytes without blocking (FIFO) or following a link; None when absent or a directory."""
    try:
        fd = os.open(host, _READ_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        try:  # a socket cannot even be opened (ENXIO): say what it is
            _refuse_special(os.lstat(host).st_mode, path, root)
        except FileNotFoundError:
            return None
        raise ConfigApplyError(f"cannot read {path} in {root}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            return None
        _refuse_special(mode, path, root)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigApplyError(f"{path} in {root} is larger than {limit} bytes; refusing to read it")
    return data


def _refuse_special(mode: int, path: str, root: Path) -> None:
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ConfigApplyError(f"{path} in {root} is {_kind(mode)}, not a regular file: remove it or "
                               "replace it with a file")


def _own_dir(host: Path, mode: int, uid: int, gid: int) -> None:
    """chown and chmod a directory through a descriptor opened without following a link."""
    fd = os.open(host, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)  # after chown (it clears setgid); explicit, so the umask has no say
    finally:
        os.close(fd)


def _make_parents(d: Path, root: Path) -> None:
    """Missing parents are created 0755 root:root (coreos-cloudinit's rule), whatever the umask."""
    missing = []
    while not os.path.lexists(d) and d != root and d != d.parent:
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        os.mkdir(m, 0o700)
        _own_dir(m, 0o755, os.geteuid(), os.getegid())


def _atomic_write(dest: Path, data: bytes, mode: int, uid: int, gid: int) -> None:
    """Temporary file in the same directory, fsync, owner and mode, then rename over the target."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchown(f.fileno(), uid, gid)
            os.fchmod(f.fileno(), mode)  # after chown: chown clears setuid bits
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

"""A plan of file changes against a target root, committed only after everything is planned.

Apply first works out every file it would write (reading through the plan, so a user created in
passwd is visible to a later chown) and only then touches the disk. A config that fails at any
point before commit therefore changes nothing; a config that matches the root plans nothing,
which is how the second apply knows it is a no-op.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from obelisk.errors import ObeliskError


class ConfigApplyError(ObeliskError, ValueError):
    """The config cannot be applied to this root; nothing was changed. One line, for the user."""


@dataclass
class Change:
    op: str  # "write" | "symlink" | "remove" | "mkdir" | "chmod"
    path: str  # absolute path inside the target root
    data: bytes | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    target: str | None = None  # symlink target
    why: str = ""

    def describe(self, planned: bool = False) -> str:
        """'wrote /etc/x ...' after a commit, 'would write /etc/x ...' for a dry run."""
        verb = {"write": ("wrote", "would write"), "symlink": ("linked", "would link"),
                "remove": ("removed", "would remove"), "mkdir": ("created directory", "would create directory"),
                "chmod": ("set mode/owner of", "would set mode/owner of")}[self.op][planned]
        if self.op == "write":
            return f"{verb} {self.path} (mode {self.mode:04o}, {len(self.data or b'')} bytes){self._why()}"
        if self.op == "symlink":
            return f"{verb} {self.path} -> {self.target}{self._why()}"
        if self.op in ("mkdir", "chmod"):
            return f"{verb} {self.path} (mode {self.mode:04o}, owner {self.uid}:{self.gid}){self._why()}"
        return f"{verb} {self.path}{self._why()}"

    def _why(self) -> str:
        return f" [{self.why}]" if self.why else ""


@dataclass
class Plan:
    root: Path
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things done or skipped that are not file changes
    commands: list[list[str]] = field(default_factory=list)  # run after commit, live system only
    _pending: dict[str, Change] = field(default_factory=dict)

    def host(self, path: str) -> Path:
        """Where an absolute in-root path lives on this machine."""
        rel = path.lstrip("/")
        return self.root / rel if rel else self.root

    # reads see planned writes first
    def read(self, path: str) -> bytes | None:
        ch = self._pending.get(path)
        if ch is not None:
            return ch.data if ch.op == "write" else None
        try:
            return self.host(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_text(self, path: str) -> str | None:
        data = self.read(path)
        return None if data is None else data.decode("utf-8", "replace")

    def exists(self, path: str) -> bool:
        ch = self._pending.get(path)
        if ch is not None:
            return ch.op != "remove"
        return os.path.lexists(self.host(path))

    def _check_parents(self, path: str) -> None:
        """Every existing ancestor must be a directory inside the root (a link out of it would escape)."""
        parts = [p for p in path.split("/") if p]
        cur = ""
        for part in parts[:-1]:
            cur = f"{cur}/{part}"
            pend = self._pending.get(cur)
            if pend is not None and pend.op not in ("mkdir", "chmod"):
                raise ConfigApplyError(f"cannot write {path}: {cur} is planned as a file, not a directory")
            host = self.host(cur)
            try:
                st = os.stat(host)
            except FileNotFoundError:
                return
            except OSError as exc:
                raise ConfigApplyError(f"cannot write {path}: {cur}: {exc.strerror}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise ConfigApplyError(f"cannot write {path}: {cur} exists in {self.root} and is not a directory")
            if os.path.islink(host):
                real = Path(os.path.realpath(host))
                if real != self.root.resolve() and self.root.resolve() not in real.parents and \
                        self.root.resolve() != Path("/"):
                    raise ConfigApplyError(f"cannot write {path}: {cur} is a link out of the target root ({real})")

    def _lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.host(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise ConfigApplyError(f"cannot use {path}: {exc.strerror}") from None

    def write(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, why: str = "") -> bool:
        """Plan writing a file; nothing is planned when content, mode and owner already match."""
        self._check_parents(path)
        host = self.host(path)
        pend = self._pending.get(path)
        if pend is not None and pend.op == "write" and (pend.data, pend.mode, pend.uid, pend.gid) == (data, mode, uid,
                                                                                                     gid):
            return False
        st = self._lstat(path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise ConfigApplyError(f"{path} is a directory in {self.root}; cannot write a file there")
        if (st is not None and stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
                and st.st_uid == uid and st.st_gid == gid and host.read_bytes() == data):
            if pend is not None:  # an earlier entry for this path is overridden by one the disk already matches
                self.changes.remove(pend)
                del self._pending[path]
            return False
        self._add(Change("write", path, data=data, mode=mode, uid=uid, gid=gid, why=why))
        return True

    def symlink(self, path: str, target: str, why: str = "") -> bool:
        self._check_parents(path)
        host = self.host(path)
        pend = self._pending.get(path)
        if pend is not None and pend.op == "symlink" and pend.target == target:
            return False
        if os.path.islink(host) and os.readlink(host) == target:
            if pend is not None:  # as in write(): an earlier plan overridden by one the disk already matches
                self.changes.remove(pend)
                del self._pending[path]
            return False
        if pend is None and os.path.isdir(host) and not os.path.islink(host):
            raise ConfigApplyError(f"{path} is a directory in {self.root}; cannot replace it with a link")
        self._add(Change("symlink", path, target=target, why=why))
        return True

    def remove(self, path: str, why: str = "") -> bool:
        if not self.exists(path):
            return False
        if os.path.isdir(self.host(path)) and not os.path.islink(self.host(path)):
            raise ConfigApplyError(f"{path} is a directory in {self.root}; refusing to remove it")
        self._add(Change("remove", path, why=why))
        return True

    def mkdir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0, why: str = "") -> bool:
        self._check_parents(path)
        if path in self._pending:
            return False
        st = self._lstat(path)
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
        if os.geteuid() != 0:
            # chown would fail half-way through; refuse before the first write instead
            foreign = [c for c in self.changes if c.op in ("write", "mkdir", "chmod")
                       and ((c.uid or 0) != os.geteuid() or (c.gid or 0) not in os.getgroups() + [os.getegid()])]
            if foreign:
                raise ConfigApplyError(f"{foreign[0].path} must be owned by {foreign[0].uid}:{foreign[0].gid}, "
                                       "which needs "
                                 "root: run apply as root (nothing was changed)")
        for ch in self.changes:
            host = self.host(ch.path)
            if ch.op in ("write", "symlink"):
                _make_parents(host.parent, self.root)
            if ch.op == "write":
                _atomic_write(host, ch.data or b"", ch.mode or 0o644, ch.uid or 0, ch.gid or 0)
            elif ch.op == "symlink":
                tmp = host.with_name(f".{host.name}.obelisk-tmp")
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                os.symlink(ch.target or "", tmp)
                os.replace(tmp, host)
            elif ch.op == "remove":
                os.unlink(host)
            elif ch.op == "mkdir":
                _make_parents(host.parent, self.root)
                os.mkdir(host, ch.mode or 0o755)
                os.chown(host, ch.uid or 0, ch.gid or 0)
                os.chmod(host, ch.mode or 0o755)  # mkdir's mode is filtered by the umask
            elif ch.op == "chmod":
                os.chown(host, ch.uid or 0, ch.gid or 0)
                os.chmod(host, ch.mode or 0o755)


def _make_parents(d: Path, root: Path) -> None:
    """Missing parents are created 0755 root:root (coreos-cloudinit's rule)."""
    missing = []
    while not d.exists() and d != root and d != d.parent:
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        os.mkdir(m, 0o755)
        os.chmod(m, 0o755)


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

"""The data folder: `profiles/<id>.json`, `groups/<id>.json`, `cloud/<name>`, `generic/<name>`.

Files are the only state, so several servers may share one folder. Reads are cached per file and
checked against the file's stat on every request; a file changed within the last two seconds is
always re-read (timestamps are coarse, so a same-size rewrite in the same tick could otherwise
look unchanged). Writes take an exclusive lock on `DIR/.lock`, check references, and replace the
file atomically (temporary file, fsync, rename), so readers see the old or the new file, never a mix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from obelisk.atomicfile import is_temporary, write_atomic
from obelisk.errors import ObeliskError
from obelisk.inputs import InputFileError, check_input
from provision.model import (
    TEMPLATE_KINDS,
    Group,
    ModelError,
    Profile,
    parse_group,
    parse_profile,
    valid_id,
)
from provision.select import Ordered, selection_order

T = TypeVar("T")
RACY_SECONDS = 2.0
RECHECK_SECONDS = 1.0
MAX_FILE = 1 << 20  # profiles, groups and templates are small; a huge one is a mistake or an attack


class StoreError(ObeliskError, ValueError):
    """A file in the data folder cannot be used; the message names it and what to do."""


class NotFound(StoreError):
    pass


class StoreConflict(StoreError):
    """A write that would leave a dangling reference (a group without its profile, ...)."""


class TooLarge(StoreError):
    """A write whose file would exceed MAX_FILE, which every later read would then refuse."""


@dataclass(frozen=True)
class _Key:
    ino: int
    mtime_ns: int
    ctime_ns: int
    size: int


def _key(st: os.stat_result) -> _Key:
    return _Key(st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


@dataclass(frozen=True)
class _GroupSet:
    folder: _Key | None  # the groups folder's own stamp
    files: tuple  # (name, stamp) of every group file
    ordered: Ordered
    checked: float  # time.monotonic() when the files were last compared


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[Path, tuple[_Key, Any]] = {}
        self._groups: _GroupSet | None = None
        self._mutex = threading.Lock()  # the flock is per open file; threads need their own guard

    # --- paths ------------------------------------------------------------------------------------

    def profile_path(self, ident: str) -> Path:
        return self.root / "profiles" / f"{_checked(ident, 'profile')}.json"

    def group_path(self, ident: str) -> Path:
        return self.root / "groups" / f"{_checked(ident, 'group')}.json"

    def template_path(self, kind: str, name: str) -> Path:
        if kind not in TEMPLATE_KINDS:
            raise NotFound(f"template kind {kind!r} is not one of {', '.join(TEMPLATE_KINDS)}")
        return self.root / kind / _checked(name, "template")

    # --- cached reads -----------------------------------------------------------------------------

    def _read(self, path: Path, parse: Callable[[bytes], T]) -> T:
        try:
            st = path.stat()
        except FileNotFoundError:
            self._cache.pop(path, None)
            raise
        if not stat.S_ISREG(st.st_mode):
            # Reading a FIFO would block the server (and `check`) for good; a folder gives a confusing error.
            try:
                check_input(path, "data file")
            except InputFileError as exc:
                raise StoreError(f"{self._rel(path)}: {str(exc).partition(': ')[2]}") from None
        key = _key(st)
        hit = self._cache.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        if st.st_size > MAX_FILE:
            raise StoreError(f"{self._rel(path)} is {st.st_size} bytes, more than the {MAX_FILE} allowed")
        raw = path.read_bytes()
        value = parse(raw)
        if time.time() - st.st_mtime > RACY_SECONDS:
            self._cache[path] = (key, value)
        else:
            self._cache.pop(path, None)
        return value

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def _json(self, path: Path, parse: Callable[..., T], what: str) -> T:
        """A profile or group file, parsed by ``parse(data, ident=...)``; NotFound names ``what``."""
        ident = path.name[:-len(".json")]

        def load(raw: bytes) -> T:
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise StoreError(f"{self._rel(path)} is not valid JSON ({exc}); fix or delete it") from None
            try:
                return parse(data, ident=ident)
            except ModelError as exc:
                raise StoreError(f"{self._rel(path)}: {exc}") from None
        try:
            return self._read(path, load)
        except FileNotFoundError:
            raise NotFound(f"{what} {ident!r} does not exist (no {self._rel(path)})") from None

    def profile(self, ident: str) -> Profile:
        return self._json(self.profile_path(ident), parse_profile, "profile")

    def group(self, ident: str) -> Group:
        return self._json(self.group_path(ident), parse_group, "group")

    def template(self, kind: str, name: str) -> str:
        path = self.template_path(kind, name)

        def text(raw: bytes) -> str:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise StoreError(f"{self._rel(path)} is not UTF-8 text") from None
        try:
            return self._read(path, text)
        except FileNotFoundError:
            raise NotFound(f"{kind} template {name!r} does not exist (no {self._rel(path)})") from None

    def _entries(self, folder: str, suffix: str = "") -> Iterator[os.DirEntry]:
        try:
            it = os.scandir(self.root / folder)
        except FileNotFoundError:
            return
        with it:
            for e in it:
                # Dot files are temporaries of writers in flight (and editors' swap files).
                if not e.name.startswith(".") and e.name.endswith(suffix) and e.is_file():
                    yield e

    def ids(self, kind: str) -> list[str]:
        """Sorted ids of `profiles`, `groups`, `cloud` or `generic`."""
        suffix = ".json" if kind in ("profiles", "groups") else ""
        names = (e.name[:len(e.name) - len(suffix)] for e in self._entries(kind, suffix))
        return sorted(n for n in names if valid_id(n))

    def groups(self) -> Ordered:
        """Every group, in selection order. A broken group file is an error, not a skip: skipping it
        could hand its hosts to a less specific group and boot them with the wrong profile.

        Listing and stat-ing every group file on each request was most of a request's cost, so the
        set is kept while the folder's own stamp stands: writers rename files in, and that changes
        it. The files themselves are re-checked once a second, for edits made in place."""
        folder = self.root / "groups"
        try:
            fst = folder.stat()
        except FileNotFoundError:
            fst = None
        fkey = _key(fst) if fst is not None else None
        now = time.monotonic()
        cached = self._groups
        if (cached is not None and fst is not None and cached.folder == fkey and now - cached.checked < RECHECK_SECONDS
                and time.time() - fst.st_mtime > RACY_SECONDS):
            return cached.ordered
        entries = sorted((e for e in self._entries("groups", ".json") if valid_id(e.name[:-5])),
                         key=lambda e: e.name)
        stamp = tuple((e.name, _key(e.stat())) for e in entries)
        if cached is not None and cached.files == stamp:
            self._groups = _GroupSet(fkey, stamp, cached.ordered, now)
            return cached.ordered
        groups = []
        for e in entries:
            try:
                groups.append(self.group(e.name[:-5]))
            except NotFound:
                continue  # deleted since the listing
        ordered = selection_order(groups)
        nothing_racy = all(self._cache.get(Path(e.path)) is not None for e in entries)
        self._groups = _GroupSet(fkey, stamp, ordered, now) if nothing_racy else None
        return ordered

    # --- writes -----------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._mutex:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def recover(self) -> None:
        """Remove what writers killed mid-write left behind (their temporaries); run at startup."""
        try:
            with self._locked():
                for folder in ("profiles", "groups", *TEMPLATE_KINDS):
                    self._sweep(self.root / folder)
        except OSError as exc:
            # A read-only data folder is served, never written here: nothing of ours to clean up.
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise

    def put_profile(self, profile: Profile) -> bool:
        """Create or replace; True when it was created. Templates it names must exist first."""
        with self._locked():
            for kind, name in profile.templates():
                if not self.template_path(kind, name).is_file():
                    raise StoreConflict(f"profile {profile.id!r} names {kind} template {name!r}, which does not exist; "
                                   f"upload the template first")
            return self._put(self.profile_path(profile.id), _dump(profile))

    def put_group(self, group: Group) -> bool:
        with self._locked():
            if not self.profile_path(group.profile).is_file():
                raise StoreConflict(f"group {group.id!r} names profile {group.profile!r}, which does not exist; "
                               f"create the profile first")
            return self._put(self.group_path(group.id), _dump(group))

    def put_template(self, kind: str, name: str, text: str) -> bool:
        with self._locked():
            return self._put(self.template_path(kind, name), text.encode())

    def delete_profile(self, ident: str) -> None:
        with self._locked():
            users = [g.id for g in self._all_groups_unchecked() if g.profile == ident]
            if users:
                raise StoreConflict(f"profile {ident!r} is used by group(s) {', '.join(users)}; "
                                    "delete or change them first")
            self._delete(self.profile_path(ident), f"profile {ident!r}")

    def delete_group(self, ident: str) -> None:
        with self._locked():
            self._delete(self.group_path(ident), f"group {ident!r}")

    def delete_template(self, kind: str, name: str) -> None:
        with self._locked():
            field = f"{kind}_id"
            users = [p for p in self.ids("profiles") if getattr(self._profile_or_none(p), field, None) == name]
            if users:
                raise StoreConflict(f"{kind} template {name!r} is used by profile(s) {', '.join(users)}; "
                               f"change them first")
            self._delete(self.template_path(kind, name), f"{kind} template {name!r}")

    def _profile_or_none(self, ident: str) -> Profile | None:
        try:
            return self.profile(ident)
        except StoreError:
            return None

    def _all_groups_unchecked(self) -> list[Group]:
        out = []
        for ident in self.ids("groups"):
            try:
                out.append(self.group(ident))
            except StoreError:
                continue
        return out

    def _put(self, path: Path, data: bytes) -> bool:
        # The stored form (indented JSON) can be much larger than the body that produced it; a file
        # over MAX_FILE would make every later read fail, e.g. a huge group would 500 every host.
        if len(data) > MAX_FILE:
            raise TooLarge(f"{self._rel(path)} would be {len(data)} bytes, more than the {MAX_FILE} allowed")
        self._sweep(path.parent)
        created = not path.exists()
        write_atomic(path, data)
        self._groups = None  # this server's own writes show at once, whatever the stamps say
        return created

    def _sweep(self, folder: Path) -> None:
        """Remove temporaries a killed writer left behind. Only under the lock: every writer holds
        it for its whole write, so no temporary in the folder can belong to a write in progress."""
        try:
            it = os.scandir(folder)
        except FileNotFoundError:
            return
        with it:
            stale = [e.path for e in it if is_temporary(e.name)]
        for name in stale:
            Path(name).unlink(missing_ok=True)

    def _delete(self, path: Path, what: str) -> None:
        self._sweep(path.parent)
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFound(f"{what} does not exist") from None
        self._cache.pop(path, None)
        self._groups = None
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _checked(ident: str, what: str) -> str:
    if not valid_id(ident):  # templates have no model to check their names: this is the check
        raise NotFound(f"{what} name {ident[:80]!r} is not valid: use letters, digits, '.', '_' or '-' "
                       f"(at most 64, not starting with '.')")
    return ident


def _dump(model: Profile | Group) -> bytes:
    return (json.dumps(model.model_dump(mode="json"), indent=2) + "\n").encode()

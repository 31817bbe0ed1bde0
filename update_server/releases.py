"""Releases on disk (`<name>/<version>/release.json` + `update.payload`) and which one a group gets."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from obelisk.errors import ObeliskError
from obelisk.inputs import InputFileError, check_input
from obelisk.versions import compare_versions

PAYLOAD_NAME = "update.payload"


class ReleaseError(ObeliskError, ValueError):
    """A release directory or groups file cannot be used; one line naming the file."""


@dataclass
class Release:
    name: str
    version: str
    app_id: str
    arch: str
    dir: Path
    size: int
    sha256: str
    _sha1_b64: str = field(default="", repr=False)

    @property
    def payload(self) -> Path:
        return self.dir / PAYLOAD_NAME

    def sha1_b64(self) -> str:
        """Omaha's package `hash` (base64 SHA-1); computed once, only Nebraska-era clients look at it."""
        if not self._sha1_b64:
            h = hashlib.sha1()  # noqa: S324 - protocol field, not a security check
            with open(self.payload, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            self._sha1_b64 = base64.b64encode(h.digest()).decode()
        return self._sha1_b64


def load_release(d: Path) -> Release:
    path = d / "release.json"
    try:
        check_input(path, "release.json")  # a FIFO would block the request (and every one after it)
        obj = json.loads(path.read_text())
    except InputFileError as exc:
        raise ReleaseError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"{path}: cannot read: {exc}") from None
    try:
        art = obj["artifacts"][PAYLOAD_NAME]
        rel = Release(name=str(obj.get("name") or d.parent.name), version=str(obj["version"]),
                      app_id=str(obj["app_id"]), arch=str(obj.get("arch") or ""), dir=d,
                      size=int(art["size"]), sha256=str(art["sha256"]).lower())
    except (KeyError, TypeError, ValueError) as exc:
        raise ReleaseError(f"{path}: missing or bad field {exc}: expected version, app_id and "
                           f"artifacts['{PAYLOAD_NAME}'] with size and sha256") from None
    if not re.fullmatch(r"[0-9a-f]{64}", rel.sha256) or rel.size <= 0:
        raise ReleaseError(f"{path}: artifacts['{PAYLOAD_NAME}'] needs a positive size and a hex sha256")
    if not rel.payload.is_file():
        raise ReleaseError(f"{d}: release.json names {PAYLOAD_NAME} but the file is missing")
    return rel


def load_groups(path: Path | None) -> dict[str, str]:
    """`[groups]` table: group name -> version (TOML). Without a file every group gets the newest."""
    if path is None:
        return {}
    try:
        check_input(path, "groups file")
        obj = tomllib.loads(path.read_text())
    except InputFileError as exc:
        raise ReleaseError(str(exc)) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ReleaseError(f"{path}: cannot read groups: {exc}") from None
    groups = obj.get("groups", {})
    if not isinstance(groups, dict) or not all(isinstance(v, str) for v in groups.values()):
        raise ReleaseError(f'{path}: expected a [groups] table of name = "version"')
    return dict(groups)


class Catalog:
    """All releases under a directory, re-read when a release appears or changes."""

    def __init__(self, root: Path, groups: dict[str, str] | None = None) -> None:
        if not root.is_dir():
            raise ReleaseError(f"{root} is not a directory: pass the --out folder of 'obelisk image build'")
        self.root = root
        self.groups = groups or {}
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[float, Release]] = {}
        self.problems: list[str] = []

    def releases(self) -> list[Release]:
        found: list[Release] = []
        problems = []
        with self._lock:
            # <name>/<version>/release.json, or the folder of a single release, or <version>/ directly.
            for rj in sorted({*self.root.glob("*/*/release.json"), *self.root.glob("*/release.json"),
                              *self.root.glob("release.json")}):
                d = rj.parent
                try:
                    mtime = rj.stat().st_mtime
                    cached = self._cache.get(d)
                    if cached is None or cached[0] != mtime:
                        cached = (mtime, load_release(d))
                        self._cache[d] = cached
                    found.append(cached[1])
                except (OSError, ReleaseError) as exc:
                    problems.append(str(exc))
            self.problems = problems
        return found

    def choose(self, app_id: str, track: str, arch: str) -> Release | None:
        """The release for this app id, arch and group: the group's pinned version, else the newest."""
        cands = [r for r in self.releases() if r.app_id.lower() == app_id.lower() and (not r.arch or not arch
                                                                                        or r.arch == arch)]
        if track in self.groups:
            pinned = [r for r in cands if compare_versions(r.version, self.groups[track]) == 0]
            return pinned[0] if pinned else None
        best: Release | None = None
        for r in cands:
            if best is None or compare_versions(r.version, best.version) > 0:
                best = r
        return best

    def known_app(self, app_id: str) -> bool:
        return any(r.app_id.lower() == app_id.lower() for r in self.releases())

    def find(self, name: str, version: str) -> Release | None:
        return next((r for r in self.releases() if r.name == name and r.version == version), None)

"""Profiles that name an obelisk release: kernel, initrd and root-hash arguments from its release.json."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from obelisk.errors import ObeliskError
from obelisk.inputs import InputFileError, check_input
from obelisk.versions import compare_versions

PXE_FILES = ("vmlinuz", "initrd")
_TTL = 2.0  # release folders are published atomically (rename); re-look a little later, not every request


class AssetError(ObeliskError, LookupError):
    """The release a profile names is missing or is not a PXE release; the message says what to build."""


@dataclass(frozen=True)
class PxeRelease:
    path: str  # "<name>/<version>", relative to the assets folder (and /assets/ in URLs)
    version: str
    root_hash: str
    hash_offset: int

    @property
    def kernel(self) -> str:
        return f"/assets/{self.path}/vmlinuz"

    @property
    def initrd(self) -> str:
        return f"/assets/{self.path}/initrd"

    def args(self) -> list[str]:
        # initrd=initrd names the image for EFI-stub kernels under older iPXE; harmless elsewhere (docs/pxe.md).
        return ["initrd=initrd", f"obelisk.usrhash={self.root_hash}", f"obelisk.usrhashoffset={self.hash_offset}"]


class Releases:
    def __init__(self, assets: Path | None) -> None:
        self.assets = assets
        self._cache: dict[str, tuple[float, PxeRelease]] = {}

    def resolve(self, ref: str) -> PxeRelease:
        hit = self._cache.get(ref)
        now = time.monotonic()
        if hit is not None and now - hit[0] < _TTL:
            return hit[1]
        rel = self._load(ref)
        self._cache[ref] = (now, rel)
        return rel

    def _load(self, ref: str) -> PxeRelease:
        if self.assets is None:
            raise AssetError(f"release {ref!r} needs an assets folder; start the server with --assets")
        name, _, version = ref.partition("/")
        base = self.assets / name
        if not version:
            # Dot folders are releases being written (the builder publishes by rename); /assets refuses them too.
            found = [d.name for d in base.iterdir() if not d.name.startswith(".") and (d / "release.json").is_file()] \
                if base.is_dir() else []
            if not found:
                raise AssetError(f"no release of {name!r} under the assets folder; build one with "
                                   f"'obelisk image build images/{name}.toml --format raw,pxe'")
            version = max(found, key=_VersionKey)
        d = base / version
        if not (d / "release.json").exists():
            raise AssetError(f"release {name}/{version} is not under the assets folder")
        try:
            check_input(d / "release.json", "release.json")  # a FIFO would hang every request behind it
            meta = json.loads((d / "release.json").read_text())
        except FileNotFoundError:
            raise AssetError(f"release {name}/{version} is not under the assets folder") from None
        except InputFileError as exc:
            raise AssetError(f"{name}/{version}/release.json cannot be read: {str(exc).partition(': ')[2]}") from None
        except (OSError, ValueError) as exc:
            raise AssetError(f"{name}/{version}/release.json cannot be read: {exc}") from None
        missing = [f for f in PXE_FILES if not (d / f).is_file()]
        if missing:
            raise AssetError(f"release {name}/{version} has no {' or '.join(missing)}: rebuild it with "
                               f"--format raw,pxe (or formats = [\"raw\", \"pxe\"] in its definition)")
        try:
            root_hash = str(meta["verity_root_hash"])
            offset = int(meta["hash_offset"])
        except (KeyError, TypeError, ValueError):
            raise AssetError(f"{name}/{version}/release.json lacks verity_root_hash or hash_offset") from None
        if len(root_hash) != 64 or any(c not in "0123456789abcdef" for c in root_hash):
            raise AssetError(f"{name}/{version}/release.json: verity_root_hash {root_hash[:80]!r} is not hex")
        return PxeRelease(f"{name}/{version}", str(meta.get("version", version)), root_hash, offset)


class _VersionKey:
    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: _VersionKey) -> bool:
        c = compare_versions(self.v, other.v)
        return c < 0 or (c == 0 and self.v < other.v)

"""Fetching Debian packages with apt-get download into the cache (shared by the rootfs stage)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from builder import fsutil
from obelisk import tools


@dataclass(frozen=True)
class Deb:
    package: str
    version: str
    sha256: str
    filename: str


def _fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line[0].isspace() and ":" in line:
            k, v = line.split(":", 1)
            out.setdefault(k.strip(), v.strip())
    return out


APT_LISTS = Path("/var/lib/apt/lists")
_memo: dict[str, Deb] = {}


def _lists_fingerprint() -> str:
    """Changes whenever apt's package lists do (apt-get update), so resolutions can be remembered."""
    h = hashlib.sha256()
    for p in sorted(APT_LISTS.glob("*Packages*")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def resolve(package: str, cache: Path | None = None) -> Deb:
    """The candidate version of ``package`` (a metapackage like linux-image-amd64 is followed to
    the real kernel package it depends on). Reads apt's lists only: no download. apt-cache takes
    seconds on a busy machine, so answers are remembered in ``cache/debs/resolved.json`` until the
    lists change."""
    if package in _memo:
        return _memo[package]
    store = cache / "debs" / "resolved.json" if cache else None
    fp = _lists_fingerprint()
    known: dict = {}
    if store and store.is_file():
        with contextlib.suppress(ValueError, OSError):
            known = json.loads(store.read_text())
    if known.get("lists") == fp and package in known.get("debs", {}):
        deb = Deb(**known["debs"][package])
    else:
        deb = _resolve(package)
        if store:
            debs = known.get("debs", {}) if known.get("lists") == fp else {}
            debs[package] = deb.__dict__
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f".resolved.{os.getpid()}")
            tmp.write_text(json.dumps({"lists": fp, "debs": debs}, indent=1))
            os.replace(tmp, store)
    _memo[package] = deb
    return deb


def _resolve(package: str) -> Deb:
    res = tools.run(["apt-cache", "show", "--no-all-versions", package], check=False)
    if res.returncode != 0 or not res.stdout.strip():
        raise tools.ToolError(f"Debian package {package!r} is not known to apt: check the name or run 'apt-get update'")
    f = _fields(res.stdout)
    if package.startswith("linux-image-") and "Depends" in f and int(f.get("Installed-Size", "0")) < 1000:
        deps = [d.strip().split(" ")[0] for d in f["Depends"].split(",")]
        real = [d for d in deps if d.startswith("linux-image-")]
        if real:
            return _resolve(real[0])
    return Deb(package, f["Version"], f.get("SHA256", ""), Path(f.get("Filename", package)).name)


def fetch(deb: Deb, cache: Path) -> Path:
    """The .deb file in ``cache/debs`` (downloaded once, checked by SHA-256)."""
    where = cache / "debs"
    where.mkdir(parents=True, exist_ok=True)
    path = where / deb.filename
    if path.is_file() and (not deb.sha256 or fsutil.sha256_file(path) == deb.sha256):
        return path
    tmp = where / f".tmp-dl-{os.getpid()}"
    fsutil.remove_tree(tmp)
    tmp.mkdir()
    try:
        tools.run(["apt-get", "download", f"{deb.package}={deb.version}"], cwd=tmp, timeout=900)
        got = list(tmp.glob("*.deb"))
        if len(got) != 1:
            raise tools.ToolError(f"apt-get download {deb.package} gave {len(got)} files, expected 1")
        if deb.sha256 and fsutil.sha256_file(got[0]) != deb.sha256:
            raise tools.ToolError(f"{got[0].name}: SHA-256 does not match apt's index: run 'apt-get update' and retry")
        os.replace(got[0], path)
    finally:
        fsutil.remove_tree(tmp)
    return path


def extract(deb_file: Path, dest: Path) -> None:
    tools.run(["dpkg-deb", "-x", deb_file, dest], timeout=600)

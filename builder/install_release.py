"""The release `obelisk install` writes: a local release folder or an http(s) URL of one, verified first.

A local folder goes through `obelisk image verify` (builder.verify: the signature of SHA256SUMS, every
checksum, the payload's manifest) before a byte is written. A URL gets the same signature check on
SHA256SUMS and the checksum of release.json before disk.raw is fetched; disk.raw itself is checked
while it streams (its size before the first byte, its SHA-256 at the end), since it is read once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from builder import verify
from builder.fsutil import BLOCK
from obelisk import signing
from obelisk.errors import ObeliskError
from obelisk.inputs import check_input

IMAGE = "disk.raw"
MAX_SMALL = 4 * 1024 * 1024  # SHA256SUMS, its signature, release.json
TIMEOUT = 30.0


class ReleaseSourceError(ObeliskError):
    """The release to install is missing, unsigned, tampered with or unreachable."""


@dataclass
class ReleaseSource:
    where: str  # folder or URL, as given
    name: str
    version: str
    signer: str  # key id
    size: int  # of disk.raw
    sha256: str  # of disk.raw, from the signed SHA256SUMS
    local: Path | None = None  # disk.raw of a local release
    url: str | None = None  # disk.raw of a remote one

    def open(self) -> Iterator[bytes]:
        """disk.raw's bytes, in blocks; the caller checks size and SHA-256 as they pass.

        For a URL the request is made here, before the caller writes anything: an HTTP error or a
        Content-Length other than the signed size is refused while the disk is still untouched.
        """
        if self.local is not None:
            return self._file(self.local)
        assert self.url is not None
        try:
            resp = requests.get(self.url, stream=True, timeout=TIMEOUT)
        except requests.RequestException as exc:
            raise ReleaseSourceError(f"{self.url}: download failed: {type(exc).__name__} — nothing was written") \
                from None
        length = resp.headers.get("Content-Length")
        problem = (f"HTTP {resp.status_code}" if resp.status_code != 200 else
                   f"{int(length):,} bytes, the signed release says {self.size:,}: truncated or replaced"
                   if length is not None and length.isdigit() and int(length) != self.size else "")
        if problem:
            resp.close()
            raise ReleaseSourceError(f"{self.url}: {problem} — nothing was written")
        return self._http(resp)

    @staticmethod
    def _file(path: Path) -> Iterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(BLOCK):
                yield chunk

    def _http(self, resp: requests.Response) -> Iterator[bytes]:
        try:
            with resp:
                yield from resp.iter_content(BLOCK)
        except requests.RequestException as exc:
            raise ReleaseSourceError(f"{self.url}: download broke off: {type(exc).__name__}") from None


def _key(key: Path | None) -> list[signing.PublicKey]:
    key = key or verify.default_public_key()
    if not key.exists():
        raise ReleaseSourceError(f"no public key at {key}: pass --key PUB (the obelisk.pub of the signing key)")
    return [signing.load_public_key(check_input(key, "public key"))]


def parse_sums(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name:
            raise ReleaseSourceError(f"SHA256SUMS: malformed line {line!r}")
        out[name] = digest
    return out


def _release_json(raw: bytes, where: str) -> dict:
    try:
        rel = json.loads(raw)
    except ValueError:
        rel = None
    if not isinstance(rel, dict) or not isinstance(rel.get("artifacts"), dict):
        raise ReleaseSourceError(f"{where}: release.json is not a release description")
    return rel


def _image_of(rel: dict, sums: dict[str, str], where: str) -> tuple[int, str]:
    art = rel["artifacts"].get(IMAGE)
    if IMAGE not in sums or not isinstance(art, dict) or not isinstance(art.get("size"), int):
        raise ReleaseSourceError(f"{where}: the release has no {IMAGE} (build it with --format raw)")
    if art.get("sha256") != sums[IMAGE]:
        raise ReleaseSourceError(f"{where}: {IMAGE}'s checksum in release.json differs from SHA256SUMS")
    return art["size"], sums[IMAGE]


def open_local(folder: Path, key: Path | None) -> ReleaseSource:
    if folder.is_file() and folder.name == IMAGE:
        folder = folder.parent  # disk.raw named directly: its release is the folder around it
    if not folder.is_dir():
        raise ReleaseSourceError(f"{folder}: no such release folder: give out/<name>/<version> or its URL")
    if not (folder / IMAGE).exists():
        raise ReleaseSourceError(f"{folder}: the release has no {IMAGE} (build it with --format raw)")
    try:
        report = verify.verify(folder, key)
    except verify.VerifyError as exc:
        raise ReleaseSourceError(str(exc)) from None
    bad = [f"{what}: {detail}" if detail else what for what, ok, detail in report.checks if not ok]
    if bad:
        raise ReleaseSourceError(f"{folder}: release failed verification ({'; '.join(bad)}) — nothing was written",
                                 hint="check it with 'obelisk image verify'")
    signer = next(d for w, _ok, d in report.checks if w == "SHA256SUMS.sig").removeprefix("signed by ")
    sums = parse_sums((folder / "SHA256SUMS").read_text())
    rel = _release_json((folder / "release.json").read_bytes(), str(folder))
    size, digest = _image_of(rel, sums, str(folder))
    return ReleaseSource(str(folder), str(rel.get("name", "")), str(rel.get("version", "")), signer, size, digest,
                         local=folder / IMAGE)


def _get_small(url: str) -> bytes:
    try:
        with requests.get(url, stream=True, timeout=TIMEOUT) as resp:
            if resp.status_code != 200:
                raise ReleaseSourceError(f"{url}: HTTP {resp.status_code}: not an obelisk release folder URL — nothing "
                                         "was written")
            data = resp.raw.read(MAX_SMALL + 1, decode_content=True)
    except requests.RequestException as exc:
        raise ReleaseSourceError(f"{url}: cannot fetch: {type(exc).__name__} — nothing was written") from None
    if len(data) > MAX_SMALL:
        raise ReleaseSourceError(f"{url}: larger than {MAX_SMALL} bytes: not an obelisk release file")
    return data


def open_url(url: str, key: Path | None) -> ReleaseSource:
    keys = _key(key)
    base = url.rstrip("/")
    if base.endswith("/" + IMAGE):
        base = base[: -len(IMAGE) - 1]
    sums_raw = _get_small(f"{base}/SHA256SUMS")
    try:
        signer = signing.verify_any(keys, sums_raw, _get_small(f"{base}/SHA256SUMS.sig")).key_id
    except signing.SigningError as exc:
        raise ReleaseSourceError(f"{base}: SHA256SUMS.sig: {exc} — nothing was written") from None
    sums = parse_sums(sums_raw.decode(errors="replace"))
    rel_raw = _get_small(f"{base}/release.json")
    if hashlib.sha256(rel_raw).hexdigest() != sums.get("release.json"):
        raise ReleaseSourceError(f"{base}: release.json does not match the signed SHA256SUMS — nothing was written")
    rel = _release_json(rel_raw, base)
    size, digest = _image_of(rel, sums, base)
    return ReleaseSource(url, str(rel.get("name", "")), str(rel.get("version", "")), signer, size, digest,
                         url=f"{base}/{IMAGE}")


def open_release(source: str, key: Path | None) -> ReleaseSource:
    if source.startswith(("http://", "https://")):
        return open_url(source, key)
    return open_local(Path(source), key)

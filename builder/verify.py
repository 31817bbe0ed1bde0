"""`obelisk image verify`: check a release's signature, every checksum and the payload's manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from builder import fsutil
from builder.build import data_dir
from obelisk import signing
from obelisk.errors import ObeliskError
from obelisk.inputs import check_input
from update_engine import payload


class VerifyError(ObeliskError, ValueError):
    pass


@dataclass
class Report:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (what, ok, detail)

    def add(self, what: str, ok: bool, detail: str = "") -> None:
        self.checks.append((what, ok, detail))

    @property
    def ok(self) -> bool:
        return all(ok for _w, ok, _d in self.checks)

    def lines(self) -> list[str]:
        out = [f"{'ok ' if ok else 'BAD'} {what}{': ' + detail if detail else ''}" for what, ok, detail in self.checks]
        out.append("release verified" if self.ok else "release FAILED verification")
        return out

    def to_json(self) -> dict:
        return {"ok": self.ok, "checks": [{"what": w, "ok": ok, "detail": d} for w, ok, d in self.checks]}


def default_public_key() -> Path:
    return data_dir() / "dev-key" / signing.PUBLIC_NAME


def verify(release_dir: Path, key: Path | None) -> Report:
    if not release_dir.is_dir():
        raise VerifyError(f"{release_dir}: no such release folder")
    key = key or default_public_key()
    if not key.exists():
        raise VerifyError(f"no public key at {key}: pass --key PUB (the obelisk.pub of the signing key)")
    keys = [signing.load_public_key(check_input(key, "public key"))]
    report = Report()
    sums_path, sig_path = release_dir / "SHA256SUMS", release_dir / "SHA256SUMS.sig"
    for p in (sums_path, sig_path):
        if p.exists():
            check_input(p, p.name)  # a FIFO would hang the read
    if not sums_path.is_file() or not sig_path.is_file():
        raise VerifyError(f"{release_dir}: SHA256SUMS or SHA256SUMS.sig is missing: not an obelisk release")
    sums = sums_path.read_bytes()
    try:
        signer = signing.verify_any(keys, sums, sig_path.read_bytes())
        report.add("SHA256SUMS.sig", True, f"signed by {signer.key_id}")
    except signing.SigningError as exc:
        report.add("SHA256SUMS.sig", False, str(exc))
    listed: dict[str, str] = {}
    for line in sums.decode(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if not name or "/" in name:
            report.add("SHA256SUMS", False, f"malformed line {line!r}")
            continue
        listed[name] = digest
    for name, digest in sorted(listed.items()):
        p = release_dir / name
        if not p.is_file():
            report.add(name, False, "missing")
            continue
        got = fsutil.sha256_file(p)
        detail = "sha256 ok" if got == digest else f"sha256 {got[:16]}..., expected {digest[:16]}..."
        report.add(name, got == digest, detail)
    for extra in sorted(p.name for p in release_dir.iterdir() if p.is_file()):
        if extra not in listed and extra not in ("SHA256SUMS", "SHA256SUMS.sig"):
            report.add(extra, False, "not listed in SHA256SUMS")
    rel_path = release_dir / "release.json"
    try:
        rel = json.loads(check_input(rel_path, "release.json").read_text())
    except (OSError, ValueError, ObeliskError) as exc:  # a FIFO is refused by check_input, not read
        report.add("release.json", False, f"unreadable: {exc}")
        return report
    if not isinstance(rel, dict):
        report.add("release.json", False, "not a JSON object")
        return report
    artifacts = rel.get("artifacts", {})
    if not isinstance(artifacts, dict) or not all(isinstance(a, dict) for a in artifacts.values()):
        report.add("release.json", False, "artifacts is not an object of objects")
        artifacts = {}
    for name, art in artifacts.items():
        p = release_dir / name
        if p.is_file() and p.stat().st_size != art.get("size"):
            report.add(f"{name} size", False, f"{p.stat().st_size} bytes, release.json says {art.get('size')}")
        if listed.get(name) != art.get("sha256"):
            report.add(f"{name} in release.json", False, "sha256 differs from SHA256SUMS")
    if (release_dir / "update.payload").is_file():
        try:
            m = payload.read_manifest(release_dir / "update.payload", keys)
            same = (m.version, m.app_id, m.verity_root_hash) == (rel.get("version"), rel.get("app_id"),
                                                                   rel.get("verity_root_hash"))
            report.add("update.payload manifest", same,
                       "signed, matches release.json" if same else "version/app id/root hash differ from release.json")
        except payload.PayloadError as exc:
            report.add("update.payload manifest", False, str(exc))
    return report

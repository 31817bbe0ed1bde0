"""The package manifest of an OS tree: every Debian package dpkg installed (name, version, source
package, arch) and every Python distribution of obelisk's host side, so an operator can check a
release against a vulnerability feed (Debian's security tracker is keyed by source package).

Read from the tree itself after the build put everything in: ``/var/lib/dpkg/status`` and the
``*.dist-info/METADATA`` files under ``/usr/lib/obelisk/python``. Kept in the image as
``/usr/share/obelisk/packages.json`` and in the release (``packages.json``, ``release.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from email.parser import HeaderParser
from pathlib import Path

MANIFEST_PATH = "usr/share/obelisk/packages.json"
FORMAT = 1


@dataclass(frozen=True, order=True)
class Package:
    name: str
    version: str
    source: str  # Debian source package (name[ version]); "pypi" for Python distributions
    kind: str = "deb"  # deb | python | file (a .deb unpacked without dpkg, in tiny images)
    arch: str = ""
    installed_kib: int = 0  # dpkg's Installed-Size: what the package costs in the image


def parse_dpkg_status(text: str) -> list[Package]:
    """Installed packages of a dpkg status file (stanzas whose Status ends in "installed")."""
    out = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:
                continue  # continuation lines (descriptions, conffiles): not needed
            name, sep, value = line.partition(":")
            if sep:
                key = name.strip()
                fields[key] = value.strip()
        if "Package" not in fields or not fields.get("Status", "").endswith(" installed"):
            continue
        version = fields.get("Version", "")
        source = fields.get("Source", "") or fields["Package"]
        if "(" not in source:  # "Source: foo" means the same version as the binary's
            source = f"{source} ({version})"
        size = fields.get("Installed-Size", "0")
        out.append(Package(fields["Package"], version, source, "deb", fields.get("Architecture", ""),
                           int(size) if size.isdigit() and len(size) < 12 else 0))
    return sorted(out)


def python_dists(site: Path) -> list[Package]:
    out = []
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        headers = HeaderParser().parsestr(meta.read_text(errors="replace"))
        if headers.get("Name") and headers.get("Version"):
            out.append(Package(str(headers["Name"]), str(headers["Version"]), "pypi", "python"))
    return sorted(out)


def read_tree(tree: Path, extra: list[Package] | None = None) -> list[Package]:
    status = tree / "var/lib/dpkg/status"
    pkgs = parse_dpkg_status(status.read_text(errors="replace")) if status.is_file() else []
    pkgs += python_dists(tree / "usr/lib/obelisk/python")
    return sorted({*pkgs, *(extra or [])})


def to_json(pkgs: list[Package]) -> dict:
    return {"format": FORMAT, "packages": [asdict(p) for p in pkgs]}


def write_manifest(tree: Path, pkgs: list[Package]) -> Path:
    path = tree / MANIFEST_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a link of the source's would be written through
    path.write_text(json.dumps(to_json(pkgs), indent=1, sort_keys=True) + "\n")
    return path

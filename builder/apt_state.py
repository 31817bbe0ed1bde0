"""The state of a Debian archive, as far as a build reads it: part of the rootfs stage's cache key.

mmdebstrap installs whatever the archive holds today, so a rootfs cached last month is not today's
rootfs. The key therefore covers, for the mirror and each extra source, the SHA-256 that the
archive's signed ``InRelease`` (or ``Release``) file lists for the package indices the build reads
(``<component>/binary-<arch>/Packages*`` and ``binary-all``): a new package version changes them,
a change elsewhere in the archive (other architectures, sources, translations) does not.

Each state read is recorded in ``<cache>/apt-state/``; ``--offline`` uses the record instead of
asking the archive, so a machine without network rebuilds from the rootfs it cached last.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests

from builder.errors import BuildError

MAX_RELEASE_BYTES = 8 * 1024 * 1024  # Debian's InRelease is about 150 KB
TIMEOUT = 30.0


@dataclass(frozen=True)
class AptSource:
    url: str
    suite: str
    components: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.url.rstrip('/')} {self.suite}"


def sources(mirror: str, suite: str, components: list[str], extra: list[str]) -> list[AptSource]:
    """The archive the definition names first, then each 'deb URL SUITE COMPONENT...' line."""
    out = [AptSource(mirror, suite, tuple(components))]
    for line in extra:
        parts = line.split()
        out.append(AptSource(parts[1], parts[2], tuple(parts[3:])))
    return out


def indices_digest(release_text: str, components: tuple[str, ...], arch: str) -> str:
    """Digest of the SHA256 lines of the indices a build of ``arch`` reads; the whole file's digest
    when it lists none of them (an unusual archive: any change then counts)."""
    wanted = tuple(f"{c}/binary-{a}/Packages" for c in components for a in (arch, "all"))
    lines = []
    in_sha256 = False
    for line in release_text.splitlines():
        if not line.startswith(" "):
            in_sha256 = line.strip() == "SHA256:"
            continue
        if in_sha256:
            fields = line.split()
            if len(fields) == 3 and fields[2].startswith(wanted):
                lines.append(f"{fields[2]} {fields[0]}")
    material = "\n".join(sorted(lines)) if lines else release_text
    return hashlib.sha256(material.encode(errors="surrogateescape")).hexdigest()


def _read(url: str) -> str | None:
    """The body at ``url`` (http(s) or file), None when it is not there; raises OSError or
    requests' errors for anything else."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(parsed.path)
        if not path.is_file():
            return None
        with path.open("rb") as f:
            return f.read(MAX_RELEASE_BYTES + 1).decode(errors="replace")
    with requests.get(url, timeout=TIMEOUT, stream=True) as resp:
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        body = resp.raw.read(MAX_RELEASE_BYTES + 1, decode_content=True)
    return body.decode(errors="replace")


def read_release(src: AptSource, fetch: Callable[[str], str | None] = _read) -> str:
    base = f"{src.url.rstrip('/')}/dists/{src.suite}"
    for name in ("InRelease", "Release"):
        url = f"{base}/{name}"
        try:
            text = fetch(url)
        except (OSError, requests.RequestException) as exc:
            raise BuildError(f"cannot read the state of the Debian archive {src.name} from {url} ({exc}): check "
                             "the network or the mirror, or pass --offline to reuse the rootfs cached last") from None
        if text is None:
            continue
        if len(text) > MAX_RELEASE_BYTES:
            raise BuildError(f"{url} is bigger than {MAX_RELEASE_BYTES} bytes: not a Debian Release file; check the "
                             "mirror URL")
        return text
    raise BuildError(f"the Debian archive {src.name} has neither {base}/InRelease nor Release: check the mirror URL "
                     "and the suite name")


def _record(cache: Path, srcs: list[AptSource], arch: str) -> Path:
    ident = json.dumps([[s.url, s.suite, list(s.components)] for s in srcs] + [arch]).encode()
    return cache / "apt-state" / f"{hashlib.sha256(ident).hexdigest()[:24]}.json"


def state(srcs: list[AptSource], arch: str, cache: Path, *, offline: bool,
          fetch: Callable[[str], str | None] = _read) -> dict[str, str]:
    """Source name -> digest of its indices; read from the archive, or from the record when ``offline``."""
    record = _record(cache, srcs, arch)
    if offline:
        try:
            return json.loads(record.read_text())["state"]
        except (OSError, ValueError, KeyError, TypeError):
            raise BuildError(f"--offline: the cache {cache} has no record of the state of "
                             f"{', '.join(s.name for s in srcs)}: build once with the network to fill it") from None
    got = {s.name: indices_digest(read_release(s, fetch), s.components, arch) for s in srcs}
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"state": got, "read_at": int(time.time())}, indent=1))
    os.replace(tmp, record)
    return got

"""Release versions: the one pattern a version must match and the one order between versions."""

from __future__ import annotations

import re

# Dotted numbers with an optional -pre or +build suffix: 1.0.0, 3815.2.0, 1.2.0-rc1, 1.0+local.
VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+)*([-+][0-9A-Za-z.+-]*)?")


def is_version(text: str) -> bool:
    """True when the whole of ``text`` is a version (no trailing newline or spaces)."""
    return VERSION_RE.fullmatch(text) is not None


def version_key(v: str) -> list[int]:
    """Numeric parts of the dotted core, trailing zeros dropped (1.2 == 1.2.0); non-numbers count 0."""
    core = re.split(r"[-+]", v.strip(), maxsplit=1)[0]
    parts = []
    for p in core.split("."):
        m = re.match(r"\d+", p)
        parts.append(int(m.group()) if m else 0)
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return parts


def compare_versions(a: str, b: str) -> int:
    """-1/0/1 comparing dotted versions numerically part by part (1.10.0 > 1.9.0; 1.2 == 1.2.0)."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)

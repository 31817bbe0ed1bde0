"""The stage cache's size: list its entries and prune the least recently used past a cap.

An entry is ``<cache>/stages/<stage>/<key>/`` (see ``builder.pipeline``). The pipeline stamps an
entry's folder mtime each time a build uses or makes it, so the mtime says when it was last used
(the entry digest covers contents, not times). Pruning renames an entry aside before removing it,
so a build that looks at it meanwhile sees either the whole entry or none (and rebuilds it); a kill
mid-prune leaves only a ``.tmp-pruned-*`` folder, which the next build of that stage sweeps up.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from builder import fsutil
from builder.errors import BuildError

# A base build's entries take about 2.3 GB (rootfs 0.7, tree 0.6, disk, usr, payload, formats 0.2
# each): 10 GiB keeps the last four builds' worth, enough to switch between a few definitions.
DEFAULT_MAX_SIZE = 10 * 1024**3
MAX_SIZE_ENV = "OBELISK_CACHE_MAX_SIZE"
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    path: Path
    size: int  # bytes on disk (holes in sparse disk images are not counted)
    last_used: float  # epoch seconds

    def to_json(self) -> dict:
        return {"stage": self.stage, "key": self.key, "path": str(self.path), "size": self.size,
                "last_used": round(self.last_used, 3)}


@dataclass
class PruneResult:
    max_size: int
    before: int
    removed: list[Entry] = field(default_factory=list)
    kept_in_use: list[Entry] = field(default_factory=list)  # over the cap, but the running build uses them

    @property
    def after(self) -> int:
        return self.before - sum(e.size for e in self.removed)

    def to_json(self) -> dict:
        return {"max_size": self.max_size, "before": self.before, "after": self.after,
                "removed": [e.to_json() for e in self.removed], "kept_in_use": [e.to_json() for e in self.kept_in_use]}


def parse_size(text: str, option: str = "--max-size") -> int | None:
    """Bytes from "10G", "500M", "1.5GiB", "123" (bytes); None for "unlimited"."""
    t = text.strip().lower()
    if t in ("unlimited", "none", "off"):
        return None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?", t)
    if not m:
        raise BuildError(f"{option} {text!r}: not a size; write it as e.g. 10G, 500M, 2T or 'unlimited'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def default_max_size() -> int | None:
    env = os.environ.get(MAX_SIZE_ENV)
    return parse_size(env, MAX_SIZE_ENV) if env else DEFAULT_MAX_SIZE


def _disk_usage(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # pruned or replaced meanwhile
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def entries(cache: Path) -> list[Entry]:
    """Every complete entry (one with its meta.json), least recently used first."""
    out = []
    stages = cache / "stages"
    if not stages.is_dir():
        return out
    for stage_dir in sorted(p for p in stages.iterdir() if p.is_dir()):
        for entry in stage_dir.iterdir():
            if entry.name.startswith(".") or not (entry / "meta.json").is_file():
                continue
            try:
                used = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            out.append(Entry(stage_dir.name, entry.name, entry, _disk_usage(entry), used))
    return sorted(out, key=lambda e: (e.last_used, e.stage, e.key))


def mark_used(entry: Path) -> None:
    """Stamp an entry as used now (its folder's mtime)."""
    now = time.time()
    os.utime(entry, (now, now))


def choose(listed: list[Entry], max_size: int, in_use: Iterable[Path] = ()) -> PruneResult:
    """Which entries go, oldest use first, until the rest fit in ``max_size``; never one in ``in_use``."""
    keep = {Path(p).resolve() for p in in_use}
    result = PruneResult(max_size, sum(e.size for e in listed))
    total = result.before
    for e in listed:  # least recently used first
        if total <= max_size:
            break
        if e.path.resolve() in keep:
            result.kept_in_use.append(e)
            continue
        result.removed.append(e)
        total -= e.size
    return result


def remove(entry: Entry) -> None:
    aside = entry.path.with_name(f".tmp-pruned-{entry.key}-{os.getpid()}")
    try:
        os.rename(entry.path, aside)
    except FileNotFoundError:  # another prune took it first
        return
    fsutil.remove_tree(aside)


def prune(cache: Path, max_size: int, *, in_use: Iterable[Path] = (), dry_run: bool = False) -> PruneResult:
    result = choose(entries(cache), max_size, in_use)
    if not dry_run:
        for stage_dir in (cache / "stages").glob("*/"):
            fsutil.remove_stale_temps(stage_dir)  # what killed builds and prunes left
        for e in result.removed:
            remove(e)
    return result


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

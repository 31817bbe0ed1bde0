"""Stage python: obelisk's host side and its Python dependencies, installed with pip for the image's /usr.

Only for Debian sources with ``install_obelisk`` (other trees get nothing here). The result is
copied into the tree by the tree stage, under /usr/lib/obelisk/python, with /usr/bin/obelisk a
small launcher that puts that directory on sys.path.

A host gets only what its commands run (``HOST_COMMANDS``: the root CLI and those sub-commands'
modules, with everything they import, found by ``builder.imports``): no builder (but the one
``key`` module), no provisioning server, no tests.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from builder import fsutil, imports
from builder.definition import DebianSource
from obelisk import cli, tools

DEPENDS: tuple[str, ...] = ()
REPO = imports.REPO
# The `obelisk` sub-commands a host runs (image and provision run elsewhere).
HOST_COMMANDS = ("key", "boot", "update", "lock", "cloudconfig")


def host_files(repo: Path = REPO) -> list[str]:
    """Paths (relative to the checkout) of every project file the image's obelisk command needs."""
    roots = [cli.__name__, *(cli.SUBCOMMANDS[c][0] for c in HOST_COMMANDS)]
    return sorted(p.relative_to(repo).as_posix() for p in imports.files(roots, repo))


def wanted(ctx) -> bool:
    src = ctx.definition.source
    return isinstance(src, DebianSource) and src.install_obelisk


def inputs(ctx) -> dict:
    if not wanted(ctx):
        return {"skip": True}
    return {
        "pyproject": fsutil.sha256_file(REPO / "pyproject.toml"),
        "code": {p: fsutil.sha256_file(REPO / p) for p in host_files()},
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def run(ctx, out: Path) -> dict:
    if not wanted(ctx):
        return {"installed": False}
    target = out / "python"
    # Build from a copy so that setuptools' build/ and *.egg-info never land in the checkout.
    src = out / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src / "pyproject.toml")
    for rel in host_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    ctx.log("python: pip install obelisk")
    tools.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--no-warn-script-location",
               "--disable-pip-version-check", "--target", target, src], timeout=1800,
              env={"SOURCE_DATE_EPOCH": str(ctx.epoch), "PIP_NO_INPUT": "1"})
    # pip's entry-point scripts name the build host's interpreter; the image uses our launcher instead.
    fsutil.remove_tree(target / "bin")
    for cache in target.rglob("__pycache__"):
        fsutil.remove_tree(cache)
    # pip records where it installed from (a temporary path): drop it so builds are reproducible.
    for record in target.glob("*.dist-info/direct_url.json"):
        record.unlink()
    prune_records(target)
    fsutil.remove_tree(src)
    return {"installed": True}


def prune_records(target: Path) -> None:
    """Drop the RECORD lines of files removed after pip ran (their hashes name the temporary source path)."""
    for record in target.glob("*.dist-info/RECORD"):
        lines = record.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if (target / ln.split(",", 1)[0]).exists()]
        if kept != lines:
            record.write_text("".join(kept))

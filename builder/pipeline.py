"""Runs the build stages in order with a content-addressed cache, rich progress and atomic publish.

Each stage declares what it depends on (other stages, definition values, files, code). The
digest of those inputs names its cache entry ``<cache>/stages/<stage>/<key>/``; an entry is built
in a temporary sibling and renamed into place only when complete, so a killed build never leaves
a half entry. The release is assembled in ``out/<name>/.tmp-<version>-<pid>`` and renamed to
``out/<name>/<version>`` at the very end.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from builder import fsutil
from builder.definition import ImageDefinition
from builder.errors import BuildError  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parent.parent
STAGES = ["rootfs", "python", "tree", "usr", "esp", "fs", "disk", "payload", "formats", "release"]
# Bump to invalidate every cache entry when the cache layout changes.
CACHE_FORMAT = 1


@dataclass
class StageResult:
    name: str
    key: str
    dir: Path
    meta: dict
    cached: bool
    seconds: float

    def path(self, name: str) -> Path:
        return self.dir / name


@dataclass
class BuildContext:
    definition: ImageDefinition
    definition_path: Path
    version: str
    build_id: str
    epoch: int
    formats: list[str]
    private_key: Ed25519PrivateKey
    trusted_keys: list[tuple[str, bytes]]  # (file name, PEM) shipped in /usr/share/obelisk/keys
    cache: Path
    inputs_digest: str
    results: dict[str, StageResult] = field(default_factory=dict)
    log: Callable[[str], None] = lambda _msg: None  # progress line
    warn: Callable[[str], None] = lambda _msg: None  # a warning the user should read (printed, kept)

    @property
    def name(self) -> str:
        return self.definition.name

    def __getitem__(self, stage: str) -> StageResult:
        return self.results[stage]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "obelisk"


def stage_module(name: str) -> ModuleType:
    return importlib.import_module(f"builder.stages.{name}")


def code_digest(mod: ModuleType) -> str:
    """Digest of the code a stage runs: its module, shared helpers, and the modules it names in CODE."""
    h = hashlib.sha256()
    paths = [Path(mod.__file__ or ""), REPO / "builder" / "fsutil.py", REPO / "builder" / "pipeline.py"]
    paths += [REPO / p for p in getattr(mod, "CODE", ())]
    for p in paths:
        h.update(f"{p.relative_to(REPO)}={fsutil.digest_tree(p)}\n".encode())
    return h.hexdigest()


def stage_key(ctx: BuildContext, mod: ModuleType) -> str:
    material = {
        "format": CACHE_FORMAT,
        "stage": mod.__name__.rsplit(".", 1)[-1],
        "code": code_digest(mod),
        "inputs": mod.inputs(ctx),
        "deps": {d: ctx.results[d].key for d in getattr(mod, "DEPENDS", ())},
    }
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def run_stage(ctx: BuildContext, name: str) -> StageResult:
    mod = stage_module(name)
    start = time.monotonic()
    key = stage_key(ctx, mod)
    parent = ctx.cache / "stages" / name
    final = parent / key
    parent.mkdir(parents=True, exist_ok=True)
    meta_path = final / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        result = StageResult(name, key, final, meta, True, time.monotonic() - start)
    else:
        fsutil.remove_stale_temps(parent)
        tmp = parent / f".tmp-{key}-{os.getpid()}"
        fsutil.remove_tree(tmp)
        tmp.mkdir()
        try:
            meta = mod.run(ctx, tmp) or {}
            (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True, indent=1))
            fsutil.fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # another build finished the same entry first: theirs is as good
                fsutil.remove_tree(tmp)
        except BaseException:
            fsutil.remove_tree(tmp)
            raise
        result = StageResult(name, key, final, meta, False, time.monotonic() - start)
    check = getattr(mod, "check", None)
    if check is not None:  # checks that depend on the definition run on cached results too
        check(ctx, result)
    ctx.results[name] = result
    return result


def run_all(ctx: BuildContext, *, console: Console, stages: list[str] = STAGES) -> list[StageResult]:
    done: list[StageResult] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("build", total=len(stages))
        ctx.log = lambda msg: progress.update(task, description=msg)
        ctx.warn = lambda msg: console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True, highlight=False)
        for name in stages:
            progress.update(task, description=f"[bold]{name}[/]")
            result = run_stage(ctx, name)
            done.append(result)
            state = "cached" if result.cached else f"built in {result.seconds:.1f}s"
            console.print(f"  stage {name:<8} {state}")
            progress.advance(task)
    return done


# --- atomic publish -------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False if the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def publish(files: dict[str, Path], dest: Path) -> None:
    """Copy ``files`` (release name -> cached path) into ``dest`` as one atomic rename."""
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    fsutil.remove_stale_temps(parent)
    tmp = parent / f".tmp-{dest.name}-{os.getpid()}"
    fsutil.remove_tree(tmp)
    tmp.mkdir()
    try:
        for name, src in files.items():
            fsutil.copy_file(src, tmp / name)
            os.chmod(tmp / name, 0o644)
        for name in files:
            fd = os.open(tmp / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsutil.fsync_dir(tmp)
        if dest.exists():
            # Replace an earlier release of the same version in one step; the old one is removed after.
            if not _exchange(tmp, dest):
                old = parent / f".tmp-old-{dest.name}-{os.getpid()}"
                os.rename(dest, old)
                os.rename(tmp, dest)
                tmp = old
        else:
            os.rename(tmp, dest)
        fsutil.fsync_dir(parent)
    finally:
        fsutil.remove_tree(tmp)

"""Runs the build stages in dependency order with a content-addressed cache, rich progress and atomic publish.

The stages are the modules of ``builder.stages``; each declares the stages it ``DEPENDS`` on, and
they run in an order derived from those declarations alone (``stage_order``). The digest of a
stage's inputs (definition values, files, the keys of its dependencies, and the code it runs:
every project module it imports, transitively, and their data files; see ``builder.imports``)
names its cache entry ``<cache>/stages/<stage>/<key>/``. An entry is built in a temporary
sibling and renamed into place only when complete, so a killed build never leaves a half entry;
it holds a digest of its own files, checked whenever it is reused: a damaged entry is rebuilt
(with a warning), never published. The release is assembled in ``out/<name>/.tmp-<version>-<pid>``
and renamed to ``out/<name>/<version>`` at the very end.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib
import json
import os
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from builder import cache as stage_cache
from builder import fsutil, imports
from builder import stages as stage_package
from builder.definition import ImageDefinition
from builder.errors import BuildError

REPO = imports.REPO
# Bump to invalidate every cache entry when the cache layout changes.
CACHE_FORMAT = 2
ENTRY_DIGEST = ".entry-digest"  # in each cache entry: the digest of everything else in it


class StageGraphError(BuildError):
    """The stages' DEPENDS declarations do not form an order (a cycle, an unknown stage)."""


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
    offline: bool = False  # use the cache's record of the archive's state instead of asking the archive
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


def stage_names() -> list[str]:
    """Every stage module in builder/stages."""
    return sorted(m.name for m in pkgutil.iter_modules(stage_package.__path__))


def stage_order(depends: dict[str, tuple[str, ...]]) -> list[str]:
    """The stages in an order where each comes after what it depends on.

    Depth first from the stages nothing depends on (by name), each stage's dependencies in the
    order it declares them: deterministic, and it reads like the pipeline (rootfs, python, tree,
    usr, ...). Raises StageGraphError naming a cycle or an unknown dependency.
    """
    for name, deps in depends.items():
        for d in deps:
            if d not in depends:
                raise StageGraphError(f"stage {name} depends on {d!r}, which is not a stage "
                                      f"(stages: {', '.join(sorted(depends))})")
    needed = {d for deps in depends.values() for d in deps}
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            raise StageGraphError(f"stage dependencies form a cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        for d in depends[name]:
            visit(d, [*path, name])
        state[name] = "done"
        order.append(name)

    sinks = sorted(n for n in depends if n not in needed)
    for name in [*sinks, *sorted(depends)]:  # the rest is reached only when it holds a cycle: name it
        visit(name, [])
    return order


def pipeline_stages() -> list[str]:
    return stage_order({n: tuple(getattr(stage_module(n), "DEPENDS", ())) for n in stage_names()})


def code_digest(mod: ModuleType) -> str:
    """Digest of the code a stage runs: every project module it imports, transitively, with their data
    files, and the pipeline's own code (it decides how stages run)."""
    files = imports.files([mod.__name__, __name__])
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(f"{p.relative_to(REPO)}={fsutil.sha256_file(p)}\n".encode())
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


def _cached(ctx: BuildContext, name: str, final: Path) -> dict | None:
    """The meta of a complete, undamaged cache entry; None (with a warning) when it must be rebuilt."""
    meta_path = final / "meta.json"
    if not meta_path.is_file():
        return None
    problem = ""
    try:
        recorded = (final / ENTRY_DIGEST).read_text().strip()
        meta = json.loads(meta_path.read_text())
        if fsutil.entry_digest(final, skip=ENTRY_DIGEST) != recorded:
            problem = "its files do not match the digest recorded when it was stored"
        elif not isinstance(meta, dict):
            problem = "its meta.json is not an object"
    except FileNotFoundError:
        problem = "it has no digest (made by an older obelisk)"
    except (ValueError, UnicodeDecodeError):
        problem = "its meta.json is not valid JSON"
    if not problem:
        return meta
    ctx.warn(f"stage {name}: cache entry {final} is damaged ({problem}): rebuilding it")
    aside = final.with_name(f".tmp-damaged-{final.name}-{os.getpid()}")
    os.rename(final, aside)
    fsutil.remove_tree(aside)
    return None


FULL = (errno.ENOSPC, errno.EDQUOT)


def _run_in(ctx: BuildContext, name: str, mod: ModuleType, tmp: Path) -> dict:
    """The stage's run; a full disk (the one expected failure of writing into the cache) is one line."""
    try:
        return mod.run(ctx, tmp) or {}
    except OSError as exc:
        if exc.errno in FULL:
            raise BuildError(f"stage {name}: {exc.strerror} while writing {exc.filename or tmp}: free space on the "
                             f"disk of {ctx.cache} or pass --cache on a bigger one") from None
        raise


def run_stage(ctx: BuildContext, name: str) -> StageResult:
    mod = stage_module(name)
    start = time.monotonic()
    key = stage_key(ctx, mod)
    parent = ctx.cache / "stages" / name
    final = parent / key
    parent.mkdir(parents=True, exist_ok=True)
    meta = _cached(ctx, name, final)
    if meta is not None:
        stage_cache.mark_used(final)  # what `image cache prune` ranks entries by
        result = StageResult(name, key, final, meta, True, time.monotonic() - start)
    else:
        fsutil.remove_stale_temps(parent)
        tmp = parent / f".tmp-{key}-{os.getpid()}"
        fsutil.remove_tree(tmp)
        tmp.mkdir()
        try:
            meta = _run_in(ctx, name, mod, tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True, indent=1))
            (tmp / ENTRY_DIGEST).write_text(fsutil.entry_digest(tmp, skip=ENTRY_DIGEST) + "\n")
            fsutil.fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # another build finished the same entry first: theirs is as good
                fsutil.remove_tree(tmp)
            stage_cache.mark_used(final)
        except BaseException:
            fsutil.remove_tree(tmp)
            raise
        result = StageResult(name, key, final, meta, False, time.monotonic() - start)
    check = getattr(mod, "check", None)
    if check is not None:  # checks that depend on the definition run on cached results too
        check(ctx, result)
    ctx.results[name] = result
    return result


def run_all(ctx: BuildContext, *, console: Console) -> list[StageResult]:
    stages = pipeline_stages()
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
    try:
        _publish(files, dest)
    except OSError as exc:  # a full or read-only --out: nothing is left half-written (see _publish)
        raise BuildError(f"cannot publish the release to {dest}: {exc.strerror}: free space there or choose "
                         "another --out") from None


def _publish(files: dict[str, Path], dest: Path) -> None:
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

"""Which of the project's files a module runs: its imports, followed transitively, found with ``ast``.

Used for two things: the code digest of a build stage (a stage's cache entry is stale when any
module it imports, directly or through others, changes) and the file set the python stage ships
into an image (the host commands and what they import, nothing else). Only the project's own
packages are followed; every ``import`` statement counts, wherever it is (inside a function, under
``TYPE_CHECKING``), so a lazy import is covered too. Importing ``a.b.c`` also runs ``a`` and
``a.b``, so their ``__init__.py`` are part of the closure. Data files (anything but ``.py``) in the
folder of a module and in its non-package subfolders (``bootloader/initramfs/``) come along.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("obelisk", "builder", "update_engine", "bootloader", "cloudconfig", "provision", "update_server",
            "fleetlock_server")


def module_file(name: str, repo: Path = REPO) -> Path | None:
    """The source file of project module ``name`` (a package's ``__init__.py``), or None."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = repo.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


LAZY_MAP = "_WHERE"  # in a package's __init__: {exported name: submodule} it imports on first use


@cache
def _imports(path: Path, name: str, mtime_ns: int) -> frozenset[str]:
    """Module names ``path`` (module ``name``) imports; ``mtime_ns`` keys the memo to the file's version."""
    del mtime_ns
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif (path.name == "__init__.py" and isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
              and any(isinstance(t, ast.Name) and t.id == LAZY_MAP for t in node.targets)):
            # A package that loads its names on first use (`__getattr__` + importlib) imports the
            # submodules its map names: ast sees no import statement, but the package needs them all.
            found.update(f"{name}.{v.value}" for v in node.value.values
                         if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return frozenset(n for n in found if n.split(".")[0] in PACKAGES)


def closure(roots: Iterable[str], repo: Path = REPO) -> dict[str, Path]:
    """Every project module ``roots`` run when imported: name -> source file."""
    out: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        path = module_file(name, repo)
        if path is None:
            continue  # `from pkg import function` names no module; outside packages are not followed
        out[name] = path
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(_imports(path, name, path.stat().st_mtime_ns))
    return out


def data_files(modules: Iterable[Path]) -> set[Path]:
    """Non-Python files beside ``modules`` and in their folders' non-package subfolders."""
    out: set[Path] = set()
    for folder in {m.parent for m in modules}:
        out.update(_data_below(folder))
    return out


def _data_below(folder: Path) -> set[Path]:
    out: set[Path] = set()
    for p in folder.iterdir():
        if p.name == "__pycache__":
            continue
        if p.is_dir():
            if not (p / "__init__.py").exists():  # a subpackage is included only when imported
                out.update(_data_below(p))
        elif p.suffix not in (".py", ".pyc"):
            out.add(p)
    return out


def files(roots: Iterable[str], repo: Path = REPO) -> set[Path]:
    """The source files of ``roots`` and everything they import, plus their data files."""
    mods = set(closure(roots, repo).values())
    return mods | data_files(mods)

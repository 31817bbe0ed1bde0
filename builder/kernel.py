"""Put a Debian kernel (vmlinuz + modules) into an OS tree, optionally keeping only some modules."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from builder import debs, fsutil
from obelisk import tools
from obelisk.errors import ObeliskError


class KernelError(ObeliskError, ValueError):
    pass


def find_kernel(tree: Path) -> tuple[str, Path] | None:
    """(kernel version, vmlinuz path) of the kernel a tree ships, if any."""
    for mod_dir in sorted((tree / "usr/lib/modules").glob("*")):
        if mod_dir.is_symlink() or not mod_dir.is_dir():
            continue
        for cand in (mod_dir / "vmlinuz", tree / "boot" / f"vmlinuz-{mod_dir.name}"):
            # A symlink is never followed: it could point at any file of the build host.
            if cand.is_file() and not cand.is_symlink():
                return mod_dir.name, cand
    return None


def _norm(name: str) -> str:
    return name.replace("-", "_")


def module_closure(mod_root: Path, wanted: list[str], optional: frozenset[str] = frozenset()) -> set[str]:
    """Relative .ko paths of ``wanted`` modules and what they depend on (modinfo, not a full depmod:
    a Debian kernel has 4000 modules and we want a few dozen)."""
    by_name = {_norm(p.name.split(".ko")[0]): p for p in (mod_root / "kernel").rglob("*.ko*")}
    builtin: set[str] = set()
    bfile = mod_root / "modules.builtin"
    if bfile.is_file():
        builtin = {_norm(Path(p).name.split(".ko")[0]) for p in bfile.read_text().split()}
    keep: set[str] = set()
    todo = [_norm(n) for n in wanted]
    for name in todo:
        if name not in by_name and name not in builtin and name not in optional:
            raise KernelError(f"kernel.modules: no module named {name!r} in this kernel")
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        path = by_name[name]
        keep.add(path.relative_to(mod_root).as_posix())
        deps = tools.run(["modinfo", "-F", "depends", path]).stdout.strip()
        todo.extend(_norm(d) for d in deps.split(",") if d)
    return keep


def install_from_deb(deb_file: Path, tree: Path, modules: list[str], optional: frozenset[str] = frozenset()) -> str:
    """Extract a linux-image .deb into ``tree`` (merged /usr); keep ``modules`` only, if given."""
    with tempfile.TemporaryDirectory(dir=tree.parent, prefix=".kernel-") as tmp:
        x = Path(tmp)
        debs.extract(deb_file, x)
        mods = sorted((x / "lib/modules").glob("*")) or sorted((x / "usr/lib/modules").glob("*"))
        if not mods:
            raise KernelError(f"{deb_file.name} holds no /lib/modules/<version>: is it a kernel package?")
        src = mods[0]
        kver = src.name
        vmlinuz = x / "boot" / f"vmlinuz-{kver}"
        dest = tree / "usr/lib/modules" / kver
        fsutil.remove_tree(dest)  # what the source had there (no vmlinuz) must not steer our copies
        dest.mkdir(parents=True)
        if modules:
            for rel in module_closure(src, modules, frozenset(_norm(m) for m in optional)):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, dest / rel)
            for f in src.glob("modules.builtin*"):
                shutil.copy2(f, dest / f.name)
            shutil.copy2(src / "modules.order", dest / "modules.order")
        else:
            shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
        for stale in ("build", "source"):
            (dest / stale).unlink(missing_ok=True)
        shutil.copy2(vmlinuz, dest / "vmlinuz")
        config = x / "boot" / f"config-{kver}"
        if config.is_file():
            shutil.copy2(config, dest / "config")
    # depmod reads <base>/lib/modules; give it a base whose lib is our usr/lib.
    with tempfile.TemporaryDirectory(dir=tree.parent, prefix=".depmod-") as base:
        (Path(base) / "lib").symlink_to(tree / "usr/lib")
        tools.run(["depmod", "-b", base, kver])
    return kver

"""Stage fs: the OEM and ROOT partitions as ext4 images, made with ``mkfs.ext4 -d`` (no mount).

ROOT holds everything of the tree but /usr (which it only has as a mount point): the first
/etc, /var and the /bin -> usr/bin links. Reproducible: fixed UUIDs and hash seeds derived from
the image name, every time from SOURCE_DATE_EPOCH (E2FSPROGS_FAKE_TIME)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from builder import ext4, fsutil
from builder.definition import MIB
from builder.errors import BuildError
from obelisk import tools

DEPENDS = ("tree",)
NAMESPACE = uuid.UUID("0b5e1c0d-0b5e-4c0d-8b5e-1c0d0b5e1c0d")
REPO = Path(__file__).resolve().parents[2]


def inputs(ctx) -> dict:
    disk = ctx.definition.disk
    return {"oem_mib": disk.oem_mib, "root_mib": disk.root_mib, "epoch": ctx.epoch, "name": ctx.name,
            "oem": fsutil.digest_tree(REPO / "images/files" / ctx.name / "oem")}


def run(ctx, out: Path) -> dict:
    disk = ctx.definition.disk
    tree = ctx["tree"].path("tree")
    root_dir = out / "rootdir"
    root_dir.mkdir()
    for entry in sorted(os.listdir(tree)):
        if entry == "usr":
            (root_dir / "usr").mkdir()
            continue
        tools.run(["cp", "-a", tree / entry, root_dir / entry])
    fsutil.clamp_mtimes(root_dir, ctx.epoch)
    oem_dir = out / "oemdir"
    src_oem = REPO / "images/files" / ctx.name / "oem"
    if src_oem.is_dir():
        shutil.copytree(src_oem, oem_dir, symlinks=True)
    else:
        oem_dir.mkdir()
    fsutil.clamp_mtimes(oem_dir, ctx.epoch)
    ctx.log("fs: ROOT and OEM (ext4)")
    make_ext4(ctx, root_dir, out / "root.img", "ROOT", disk.root_mib, "disk.root_mib")
    make_ext4(ctx, oem_dir, out / "oem.img", "OEM", disk.oem_mib, "disk.oem_mib")
    fsutil.remove_tree(root_dir)
    fsutil.remove_tree(oem_dir)
    return {}


def _content_bytes(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            st = Path(dirpath, name).lstat()
            total += -(-st.st_size // 4096) * 4096 + 256
    return total


def make_ext4(ctx, src: Path, img: Path, label: str, size_mib: int, key: str) -> None:
    need = _content_bytes(src)
    # ext4's own metadata (inode tables, journal) takes a share that grows with the size.
    need_mib = -(-need * 13 // 10 // MIB) + (8 if size_mib >= 64 else 4)
    if need_mib > size_mib:
        raise BuildError(f"{label} needs about {need_mib} MiB but {key} is {size_mib}: "
                         f"set {key} to at least {need_mib} in {ctx.definition_path}")
    fs_uuid = uuid.uuid5(NAMESPACE, f"{ctx.name}/{label}/fs")
    seed = uuid.uuid5(NAMESPACE, f"{ctx.name}/{label}/hash_seed")
    fsutil.make_sparse(img, size_mib * MIB)
    env = {"E2FSPROGS_FAKE_TIME": str(ctx.epoch), "SOURCE_DATE_EPOCH": str(ctx.epoch)}
    try:
        tools.run(["mkfs.ext4", "-q", "-F", "-L", label, "-U", str(fs_uuid), "-b", "4096", "-I", "256",
                   "-E", f"hash_seed={seed},root_owner=0:0,lazy_itable_init=0,nodiscard",
                   "-d", src, img], env=env, timeout=1800)
    except tools.ToolError as exc:
        if "space" in str(exc).lower() or "allocate" in str(exc).lower():
            raise BuildError(f"{label} does not fit in {key} = {size_mib} MiB: set {key} to at least "
                             f"{need_mib * 2} in {ctx.definition_path}") from None
        raise
    pin_inode_times(src, img, ctx.epoch)
    ext4.pin_write_time(img, ctx.epoch)  # debugfs and mke2fs stamp the superblock with the clock on close


def pin_inode_times(src: Path, img: Path, epoch: int) -> None:
    """mke2fs -d copies each file's ctime and atime, which no one can set on the source: pin them
    (and the creation time) to ``epoch`` with debugfs so the image is reproducible."""
    cmds = []
    paths = ["/"]
    for dirpath, dirnames, filenames in os.walk(src):
        rel = "/" + Path(dirpath).relative_to(src).as_posix().lstrip(".")
        for name in sorted([*dirnames, *filenames]):
            paths.append(rel.rstrip("/") + "/" + name)
    for p in paths:
        if '"' in p or "\n" in p:
            continue  # debugfs cannot quote these; never seen in an OS tree
        for fld in ("atime", "ctime", "mtime", "crtime"):
            cmds.append(f'sif "{p}" {fld} @{epoch}')
        for fld in ("atime_extra", "ctime_extra", "mtime_extra", "crtime_extra"):
            cmds.append(f'sif "{p}" {fld} 0')
    script = img.with_suffix(".debugfs")
    script.write_text("\n".join(cmds) + "\n")
    try:
        tools.run(["debugfs", "-w", "-f", script, img], timeout=1800)
    finally:
        script.unlink()

"""Stage rootfs: the OS tree as it comes from its source (mmdebstrap, busybox + kernel, a directory,
a tarball or an OCI layout), plus a Debian kernel when the source has none."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from bootloader import initramfs
from builder import debs, fsutil, kernel
from builder.definition import DebianSource, DirectorySource, OciSource, TarballSource, TinySource
from obelisk import tools

DEPENDS: tuple[str, ...] = ()
CODE = ("builder/debs.py", "builder/kernel.py")
MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/merged-usr")
# Trimmed from Debian trees: documentation and translations are not needed on a host and make /usr big.
DPKG_EXCLUDES = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
                 "/usr/share/lintian/*"]


def initramfs_modules() -> frozenset[str]:
    try:
        from bootloader import initramfs
    except ImportError:
        return frozenset()
    return frozenset(getattr(initramfs, "MODULES", []))


def kept_modules(ctx) -> list[str]:
    """The definition's module list plus whatever the initramfs loads (empty list: keep all)."""
    wanted = list(ctx.definition.kernel.modules)
    if not wanted:
        return []
    return wanted + [m for m in initramfs.MODULES if m not in wanted]


def inputs(ctx) -> dict:
    d = ctx.definition
    src = d.source
    out: dict = {"source": src.model_dump(mode="json"), "kernel": d.kernel.model_dump(mode="json"),
                 "modules": kept_modules(ctx)}
    if isinstance(src, TinySource):
        out["debs"] = [debs.resolve(p, ctx.cache).__dict__ for p in (src.busybox_package, d.kernel.package)]
    elif isinstance(src, DirectorySource | OciSource):
        out["digest"] = fsutil.digest_tree(src.path)
    elif isinstance(src, TarballSource):
        out["digest"] = fsutil.sha256_file(src.path)
    if not isinstance(src, DebianSource | TinySource):
        out["kernel_deb"] = debs.resolve(d.kernel.package, ctx.cache).__dict__  # used only when the tree has none
    return out


def run(ctx, out: Path) -> dict:
    d = ctx.definition
    src = d.source
    root = out / "root"
    if isinstance(src, DebianSource):
        _mmdebstrap(ctx, src, root)
    elif isinstance(src, TinySource):
        _tiny(ctx, src, root)
    elif isinstance(src, DirectorySource):
        root.mkdir()
        tools.run(["cp", "-a", f"{src.path}/.", root], timeout=1800)
    elif isinstance(src, TarballSource):
        root.mkdir()
        _untar(src.path, root)
    elif isinstance(src, OciSource):
        root.mkdir()
        _oci(src, root)
    merge_usr(root)
    found = kernel.find_kernel(root)
    if found is None:
        deb = debs.fetch(debs.resolve(d.kernel.package, ctx.cache), ctx.cache)
        ctx.log(f"rootfs: installing {deb.name}")
        kernel.install_from_deb(deb, root, kept_modules(ctx), initramfs_modules())
        found = kernel.find_kernel(root)
    assert found is not None
    return {"kernel_version": found[0]}


def _mmdebstrap(ctx, src: DebianSource, root: Path) -> None:
    argv: list[str | Path] = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
                              f"--components={','.join(src.components)}"]
    if src.packages:
        argv.append(f"--include={','.join(src.packages)}")
    if MERGED_USR_HOOK.is_dir():
        argv.append(f"--hook-dir={MERGED_USR_HOOK}")
    for pattern in DPKG_EXCLUDES:
        argv.append(f"--dpkgopt=path-exclude={pattern}")
    argv.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    argv += [src.suite, root, src.mirror, *src.extra_sources]
    ctx.log(f"rootfs: mmdebstrap {src.suite} ({len(src.packages)} packages)")
    tools.run(argv, env={"SOURCE_DATE_EPOCH": str(ctx.epoch)}, timeout=3600)
    # The boot chain makes its own initramfs; Debian's (initramfs-tools) is dead weight.
    for f in (root / "boot").glob("initrd.img*"):
        f.unlink()


def _tiny(ctx, src: TinySource, root: Path) -> None:
    d = ctx.definition
    for sub in ("usr/bin", "usr/sbin", "usr/lib", "etc", "dev", "proc", "sys", "run", "tmp", "var", "root"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    bb_deb = debs.fetch(debs.resolve(src.busybox_package, ctx.cache), ctx.cache)
    x = root.parent / "busybox-deb"
    debs.extract(bb_deb, x)
    bb = next((p for p in (x / "bin/busybox", x / "usr/bin/busybox") if p.is_file()), None)
    if bb is None:
        raise tools.ToolError(f"{bb_deb.name} has no bin/busybox")
    target = root / "usr/bin/busybox"
    os.replace(bb, target)
    fsutil.remove_tree(x)
    applets = tools.run([target, "--list-full"]).stdout.split()
    for applet in applets:
        rel = applet.removeprefix("usr/")
        if not rel.startswith(("bin/", "sbin/")) or rel.endswith("/busybox"):
            continue
        link = root / "usr" / rel
        if not link.exists() and not link.is_symlink():
            link.symlink_to("busybox" if rel.startswith("bin/") else "../bin/busybox")
    kdeb = debs.fetch(debs.resolve(d.kernel.package, ctx.cache), ctx.cache)
    ctx.log(f"rootfs: installing {kdeb.name}")
    kernel.install_from_deb(kdeb, root, kept_modules(ctx), initramfs_modules())


def _untar(path: Path, root: Path) -> None:
    try:
        with tarfile.open(path, "r:*") as tf:
            tf.extractall(root, filter="tar")
    except (tarfile.TarError, OSError) as exc:
        raise tools.ToolError(f"{path}: cannot unpack: {exc}") from None


def _oci(src: OciSource, root: Path) -> None:
    layout = src.path

    def blob(digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return layout / "blobs" / algo / hexd

    try:
        index = json.loads((layout / "index.json").read_text())
        manifests = index.get("manifests", [])
        if src.tag:
            manifests = [m for m in manifests
                         if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == src.tag]
        if len(manifests) != 1:
            raise tools.ToolError(f"{layout}: found {len(manifests)} matching manifests: set source.tag")
        man = json.loads(blob(manifests[0]["digest"]).read_text())
        if "manifests" in man:  # an image index: take linux/amd64
            pick = [m for m in man["manifests"] if m.get("platform", {}).get("architecture") == "amd64"]
            if not pick:
                raise tools.ToolError(f"{layout}: no linux/amd64 image in the index")
            man = json.loads(blob(pick[0]["digest"]).read_text())
        layers = man["layers"]
    except (OSError, KeyError, ValueError) as exc:
        raise tools.ToolError(f"{layout}: not a readable OCI image layout: {exc}") from None
    for layer in layers:
        _apply_layer(blob(layer["digest"]), root)


def _apply_layer(path: Path, root: Path) -> None:
    """Apply one layer with OCI whiteouts (.wh.NAME deletes NAME, .wh..wh..opq empties the dir)."""
    try:
        with tarfile.open(path, "r:*") as tf:
            members = []
            for m in tf:
                name = Path(m.name.lstrip("/"))
                base = name.name
                if base == ".wh..wh..opq":
                    d = root / name.parent
                    if d.is_dir():
                        for child in d.iterdir():
                            fsutil.remove_tree(child)
                elif base.startswith(".wh."):
                    fsutil.remove_tree(root / name.parent / base[4:])
                else:
                    members.append(m)
            tf.extractall(root, members=members, filter="tar")
    except (tarfile.TarError, OSError) as exc:
        raise tools.ToolError(f"{path.name}: cannot apply layer: {exc}") from None


def merge_usr(root: Path) -> None:
    """Make /bin, /sbin, /lib* links into /usr, so everything the OS ships is in the USR slot."""
    (root / "usr").mkdir(exist_ok=True)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        top, inside = root / name, root / "usr" / name
        if top.is_symlink():
            continue
        if top.is_dir():
            inside.mkdir(exist_ok=True)
            for child in top.iterdir():
                dest = inside / child.name
                if dest.exists() or dest.is_symlink():
                    fsutil.remove_tree(child)
                else:
                    os.replace(child, dest)
            top.rmdir()
        if inside.exists() or name in ("bin", "sbin", "lib"):
            inside.mkdir(exist_ok=True)
            top.symlink_to(f"usr/{name}")

"""Stage rootfs: the OS tree as it comes from its source (mmdebstrap, busybox + kernel, a directory,
a tarball or an OCI layout), plus a Debian kernel when the source has none.

Tarballs and OCI layers are unpacked by ``builder.archive`` (nothing lands outside the tree; device
nodes and FIFOs are skipped with a warning; see there). Every OCI blob is checked against its
digest, and only ``sha256:<64 hex>`` (or sha512) digests name blobs. Whatever the source, the
folders later steps write into must be real directories (``check_layout``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bootloader import initramfs
from builder import apt_state, archive, debs, fsutil, kernel
from builder.definition import DebianSource, DirectorySource, OciSource, TarballSource, TinySource
from builder.errors import BuildError
from obelisk import tools
from obelisk.inputs import InputFileError, check_input

DEPENDS: tuple[str, ...] = ()
MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/merged-usr")
# Trimmed from Debian trees: documentation and translations are not needed on a host and make /usr big.
DPKG_EXCLUDES = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
                 "/usr/share/lintian/*"]


def initramfs_modules() -> frozenset[str]:
    return frozenset(initramfs.MODULES)


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
    if isinstance(src, DebianSource):  # what mmdebstrap would install today (builder/apt_state.py)
        srcs = apt_state.sources(src.mirror, src.suite, src.components, src.extra_sources)
        out["archive"] = apt_state.state(srcs, d.arch, ctx.cache, offline=ctx.offline)
    elif isinstance(src, TinySource):
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
        _untar(src.path, root, ctx.warn)
    elif isinstance(src, OciSource):
        root.mkdir()
        _oci(src, root, ctx.warn)
    check_layout(root)
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
    if ctx.offline:
        raise BuildError(f"--offline: no rootfs of {src.suite} for the archive state seen last is in the cache "
                         f"{ctx.cache} (it was pruned or never built): build once with the network")
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


def _untar(path: Path, root: Path, warn: Callable[[str], None]) -> None:
    archive.unpack([path], root, oci=False, warn=warn)


# An OCI digest: algorithm ":" lowercase hex of the algorithm's length. Nothing else may name a blob
# (a "../" in a digest would read a file from outside the layout).
DIGEST_RE = re.compile(r"(sha256:[0-9a-f]{64})|(sha512:[0-9a-f]{128})")


def _as(kind: type, value: object, what: str, layout: Path) -> Any:
    if not isinstance(value, kind):
        raise archive.ArchiveError(f"{layout}: not a readable OCI image layout: {what} is not a JSON {kind.__name__}")
    return value


def blob_path(layout: Path, desc: object, what: str) -> tuple[Path, str, str]:
    """(path, algorithm, hex) of the blob a descriptor names, refusing any digest but algorithm:hex."""
    digest = _as(dict, desc, what, layout).get("digest")
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise archive.ArchiveError(f"{layout}: {what} has digest {digest!r}: expected sha256: and 64 hex digits")
    algo, hexd = digest.split(":")
    path = layout / "blobs" / algo / hexd
    try:
        check_input(path, f"blob file ({what})")
    except InputFileError as exc:
        raise archive.ArchiveError(f"{layout}: {exc}") from None
    size = desc.get("size")  # type: ignore[union-attr]
    if isinstance(size, int) and path.stat().st_size != size:
        raise archive.ArchiveError(f"{layout}: {what} blob {digest} has {path.stat().st_size} bytes, its descriptor "
                                   f"says {size}: the layout is damaged")
    return path, algo, hexd


def verified_blob(layout: Path, desc: object, what: str) -> Path:
    """The blob file, after its content was checked against its digest."""
    path, algo, hexd = blob_path(layout, desc, what)
    h = hashlib.new(algo)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != hexd:
        raise archive.ArchiveError(f"{layout}: {what} blob {algo}:{hexd[:16]}... does not match its digest (the file "
                                   f"hashes to {algo}:{h.hexdigest()[:16]}...): the layout is damaged or was tampered "
                                   "with")
    return path


def _json_blob(layout: Path, desc: object, what: str) -> dict:
    path = verified_blob(layout, desc, what)
    try:
        return _as(dict, json.loads(path.read_bytes()), what, layout)
    except ValueError as exc:
        raise archive.ArchiveError(f"{layout}: {what} is not valid JSON: {exc}") from None


def oci_layers(src: OciSource) -> list[Path]:
    """The layer files of the image a layout holds (the one tagged ``src.tag``), each checked by digest."""
    layout = src.path
    index_path = layout / "index.json"
    try:
        check_input(index_path, "index file")
        index = _as(dict, json.loads(index_path.read_bytes()), "index.json", layout)
    except InputFileError as exc:
        raise archive.ArchiveError(f"{layout}: not an OCI image layout: {exc}") from None
    except ValueError as exc:
        raise archive.ArchiveError(f"{layout}: index.json is not valid JSON: {exc}") from None
    manifests = _as(list, index.get("manifests", []), "index.json manifests", layout)
    if src.tag:
        manifests = [m for m in manifests if isinstance(m, dict) and isinstance(m.get("annotations"), dict)
                     and m["annotations"].get("org.opencontainers.image.ref.name") == src.tag]
    if len(manifests) != 1:
        raise archive.ArchiveError(f"{layout}: found {len(manifests)} matching manifests: set source.tag")
    man = _json_blob(layout, manifests[0], "the manifest")
    if "manifests" in man:  # an image index: take linux/amd64
        pick = [m for m in _as(list, man["manifests"], "the image index's manifests", layout)
                if isinstance(m, dict) and isinstance(m.get("platform"), dict)
                and m["platform"].get("architecture") == "amd64"]
        if not pick:
            raise archive.ArchiveError(f"{layout}: no linux/amd64 image in the index")
        man = _json_blob(layout, pick[0], "the amd64 manifest")
    layers = _as(list, man.get("layers"), "the manifest's layers", layout)
    return [verified_blob(layout, layer, f"layer {i + 1}") for i, layer in enumerate(layers)]


def _oci(src: OciSource, root: Path, warn: Callable[[str], None]) -> None:
    archive.unpack(oci_layers(src), root, oci=True, warn=warn)


# Folders later steps of the build write into or read from: a symlink in their place (the source
# may hold any) would take those writes or reads out of the tree, onto the build host.
SYSTEM_DIRS = ("usr", "usr/bin", "usr/sbin", "usr/lib", "usr/lib/modules", "usr/lib/systemd", "usr/lib/systemd/system",
               "usr/lib/tmpfiles.d", "usr/lib/obelisk", "usr/share", "usr/share/obelisk", "usr/share/factory", "etc",
               "boot")


def check_layout(root: Path) -> None:
    """Refuse a tree whose system folders (or kernel module folders) are symlinks or files."""
    for rel in SYSTEM_DIRS:
        p = root
        for comp in rel.split("/"):
            p = p / comp
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                what = "a symlink" if p.is_symlink() else "not a directory"
                raise archive.ArchiveError(f"the source tree's /{p.relative_to(root)} is {what}: the build writes "
                                           "below it; make it a directory in the source")
            if not p.exists():
                break
    mods = root / "usr/lib/modules"
    if mods.is_dir():
        for d in sorted(mods.iterdir()):
            if d.is_symlink() or not d.is_dir():
                raise archive.ArchiveError(f"the source tree's /{d.relative_to(root)} is not a directory: "
                                           "/usr/lib/modules holds one directory per kernel version")


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

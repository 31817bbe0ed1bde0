"""Stage tree: the finished OS tree. Adds the overlay files, trusted keys, os-release and release
files, obelisk's Python code, /usr/share/factory/etc, and the slot's boot files (kernel and
initramfs) at /usr/lib/obelisk/boot/, so kernel, initramfs and /usr always change together."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bootloader import initramfs
from builder import debs, fsutil, kernel, packages
from builder.definition import DebianSource, TinySource
from obelisk import tools
from obelisk.signing import IMAGE_KEYS_DIR

DEPENDS = ("rootfs", "python")
REPO = Path(__file__).resolve().parents[2]
BOOT_DIR = "usr/lib/obelisk/boot"
LAUNCHER = """#!/usr/bin/python3
# obelisk's host side lives in /usr/lib/obelisk/python (installed with pip at build time).
import sys

sys.path.insert(0, "/usr/lib/obelisk/python")
from obelisk.cli import main  # noqa: E402

sys.exit(main())
"""


def overlay_dirs(ctx) -> list[Path]:
    files = REPO / "images" / "files"
    return [files / "common", files / ctx.name, *ctx.definition.files]


def inputs(ctx) -> dict:
    return {
        "overlays": [fsutil.digest_tree(p) for p in overlay_dirs(ctx)],
        "keys": ctx.trusted_keys,
        "name": ctx.name,
        "version": ctx.version,
        "build_id": ctx.build_id,
        "app_id": ctx.definition.app_id,
        "pretty_name": ctx.definition.pretty_name,
        "epoch": ctx.epoch,
        "exclude": ctx.definition.kernel.exclude,
        "units": ctx.definition.units.model_dump(mode="json"),
    }


def run(ctx, out: Path) -> dict:
    tree = out / "tree"
    ctx.log("tree: copying rootfs")
    tools.run(["cp", "-a", "--reflink=auto", ctx["rootfs"].path("root"), tree], timeout=1800)
    found = kernel.find_kernel(tree)
    if found is None:
        raise tools.ToolError("the OS tree has no kernel in /usr/lib/modules/<version>/")
    kver, vmlinuz = found
    if ctx.definition.kernel.exclude:
        for rel in ctx.definition.kernel.exclude:
            fsutil.remove_tree(fsutil.path_inside(tree, f"usr/lib/modules/{kver}/{rel}"))
        with tempfile.TemporaryDirectory(dir=out, prefix=".depmod-") as base:
            (Path(base) / "lib").symlink_to(tree / "usr/lib")
            tools.run(["depmod", "-b", base, kver], timeout=900)
    fsutil.dirs_inside(tree, Path(BOOT_DIR).parent)
    fsutil.remove_tree(tree / BOOT_DIR)  # only what this stage puts there: no link of the source's to write through
    boot = fsutil.dirs_inside(tree, BOOT_DIR)
    shutil.copy2(vmlinuz, boot / "vmlinuz")
    for f in (tree / "boot").glob("*"):  # a slot's boot files live in /usr only
        fsutil.remove_tree(f)
    for d in overlay_dirs(ctx):
        copy_overlay(d, tree)
        enable_units(d, tree)
    units = ctx.definition.units
    apply_unit_choices(tree, units.enable, units.disable)
    for rel in strip_machine_identity(tree):
        ctx.log(f"tree: removed per-machine /{rel}")
    keys = fsutil.dirs_inside(tree, IMAGE_KEYS_DIR)
    for name, pem in ctx.trusted_keys:
        fsutil.remove_tree(keys / name)
        (keys / name).write_bytes(pem)
    write_identity(ctx, tree)
    if ctx["python"].meta.get("installed"):
        dest = fsutil.dirs_inside(tree, "usr/lib/obelisk") / "python"
        fsutil.remove_tree(dest)
        shutil.copytree(ctx["python"].path("python"), dest, symlinks=True)
        launcher = fsutil.dirs_inside(tree, "usr/bin") / "obelisk"
        launcher.unlink(missing_ok=True)
        launcher.write_text(LAUNCHER)
        launcher.chmod(0o755)
    pkgs = packages.read_tree(tree, unpacked_debs(ctx))
    packages.write_manifest(tree, pkgs)
    factory_etc(tree)
    ctx.log("tree: initramfs")
    initramfs.build(tree, boot / "initrd.img")
    if not (boot / "initrd.img").is_file():
        raise tools.ToolError("bootloader.initramfs.build made no initrd.img")
    fsutil.clamp_mtimes(tree, ctx.epoch)
    return {"kernel_version": kver, "packages": len(pkgs)}


def unpacked_debs(ctx) -> list[packages.Package]:
    """Packages a tiny image unpacks without dpkg (busybox, the kernel): dpkg's status does not know them."""
    src = ctx.definition.source
    if not isinstance(src, TinySource):
        return []
    out = []
    for name in (src.busybox_package, ctx.definition.kernel.package):
        deb = debs.resolve(name, ctx.cache)
        out.append(packages.Package(deb.package, deb.version, f"{deb.package} ({deb.version})", "file", "amd64"))
    return out


def copy_overlay(src: Path, tree: Path) -> None:
    """Copy ``src`` over ``tree``; files replace what is there (symlinks are replaced, not followed)."""
    if not src.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        dest_dir = fsutil.dirs_inside(tree, _in_usr(rel))
        for name in [*filenames, *[d for d in dirnames if Path(dirpath, d).is_symlink()]]:
            s, d = Path(dirpath, name), dest_dir / name
            if d.is_symlink() or d.is_file():
                d.unlink()
            elif d.is_dir():  # an overlay file or link replaces a folder of the tree
                shutil.rmtree(d)
            if s.is_symlink():
                d.symlink_to(os.readlink(s))
            else:
                shutil.copy2(s, d)


def enable_units(overlay: Path, tree: Path) -> None:
    """Enable the systemd units an overlay ships: a ``WantedBy=`` in ``[Install]`` becomes a link in
    /usr/lib/systemd/system/<target>.wants/ (in /usr, so a new /usr brings its units enabled)."""
    units = overlay / "usr/lib/systemd/system"
    if not units.is_dir() or not (tree / "usr/lib/systemd/systemd").exists():
        return
    for unit in sorted(units.iterdir()):
        if unit.suffix not in (".service", ".timer", ".socket", ".path") or not unit.is_file():
            continue
        enable_in_usr(tree, unit.name, unit.read_text(errors="replace"))


def wanted_by(unit_text: str) -> list[str]:
    """The targets a unit's ``[Install]`` section names in ``WantedBy=``."""
    section, targets = "", []
    for line in unit_text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Install]" and line.startswith("WantedBy="):
            targets += line.split("=", 1)[1].split()
    return targets


def enable_in_usr(tree: Path, name: str, unit_text: str) -> list[str]:
    """Links in /usr/lib/systemd/system/<target>.wants/ for each WantedBy= target; the targets."""
    targets = wanted_by(unit_text)
    for target in targets:
        link = fsutil.dirs_inside(tree, f"usr/lib/systemd/system/{target}.wants") / name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(f"../{name}")
    return targets


# Where package scripts (deb-systemd-helper) and overlays enable units.
UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system")


def apply_unit_choices(tree: Path, enable: list[str], disable: list[str]) -> None:
    """The definition's ``[units]``: ``enable`` links a unit of the tree into its WantedBy= targets in
    /usr; ``disable`` removes every .wants/.requires link to it (it stays installed: something else, such
    as cloud-config, starts it when it is configured)."""
    for name in enable:
        unit = tree / "usr/lib/systemd/system" / name
        if not unit.is_file():
            raise tools.ToolError(f"units.enable: {name} is not in the tree's /usr/lib/systemd/system: "
                                  "add the package that ships it to source.packages")
        if not enable_in_usr(tree, name, unit.read_text(errors="replace")):
            raise tools.ToolError(f"units.enable: {name} has no WantedBy= in [Install]: nothing to enable it in")
    for name in disable:
        for base in UNIT_DIRS:
            d = tree / base
            if not d.is_dir():
                continue
            for link in d.glob(f"*.wants/{name}"):
                link.unlink()
            for link in d.glob(f"*.requires/{name}"):
                link.unlink()


# Made by package scripts at build time, but one per machine: every copy of the image would share
# them (SSH host keys: hosts could impersonate each other). Each host makes its own on first boot.
PER_MACHINE_FILES = ("etc/ssh/ssh_host_*", "var/lib/dbus/machine-id")


def strip_machine_identity(tree: Path) -> list[str]:
    removed = []
    for pattern in PER_MACHINE_FILES:
        for f in sorted(tree.glob(pattern)):
            if f.is_file() or f.is_symlink():
                f.unlink()
                removed.append(str(f.relative_to(tree)))
    mid = tree / "etc/machine-id"
    if mid.is_file() and mid.read_text().strip() not in ("", "uninitialized"):
        mid.write_text("")  # empty: systemd makes one on first boot
        removed.append("etc/machine-id")
    return removed


def _in_usr(rel: Path) -> Path:
    # /bin, /sbin and /lib are links into /usr: write through to the real directory.
    parts = rel.parts
    if parts and parts[0] in ("bin", "sbin", "lib", "lib64"):
        return Path("usr", *parts)
    return rel


def os_release_quote(value: str) -> str:
    """``value`` as an os-release(5) string: in double quotes, with \\ " $ and ` escaped by a backslash
    (the shell-compatible subset). Control characters cannot be quoted: the definition refuses them."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{value!r} holds a control character")
    return '"' + "".join("\\" + c if c in '\\"$`' else c for c in value) + '"'


def write_identity(ctx, tree: Path) -> None:
    d = ctx.definition
    pretty = d.pretty_name or f"obelisk {d.name} {ctx.version}"
    like = "ID_LIKE=debian\n" if isinstance(d.source, DebianSource) else ""
    os_release = (
        f'NAME="obelisk"\nID=obelisk\n{like}VERSION="{ctx.version}"\nVERSION_ID={ctx.version}\n'
        f"BUILD_ID={ctx.build_id}\nIMAGE_ID={d.name}\nIMAGE_VERSION={ctx.version}\n"
        f'PRETTY_NAME={os_release_quote(pretty)}\nHOME_URL="https://github.com/obelisk-os/obelisk"\n'
    )
    target = fsutil.dirs_inside(tree, "usr/lib") / "os-release"
    fsutil.remove_tree(target)
    target.write_text(os_release)
    etc = fsutil.dirs_inside(tree, "etc") / "os-release"
    fsutil.remove_tree(etc)
    etc.symlink_to("../usr/lib/os-release")
    rel = fsutil.dirs_inside(tree, "usr/share/obelisk") / "release"
    fsutil.remove_tree(rel)
    rel.write_text(f"VERSION={ctx.version}\nAPPID={d.app_id}\nARCH={d.arch}\nNAME={d.name}\nBUILD_ID={ctx.build_id}\n")


def factory_etc(tree: Path) -> None:
    """Keep a copy of /etc in /usr/share/factory/etc and let systemd-tmpfiles copy in whatever
    top-level entry /etc lacks at boot (so a new /usr can bring new configuration)."""
    etc = tree / "etc"
    factory = fsutil.dirs_inside(tree, "usr/share/factory") / "etc"
    fsutil.remove_tree(factory)
    shutil.copytree(etc, factory, symlinks=True)
    lines = ["# Generated by obelisk image build: populate /etc from /usr/share/factory/etc at boot.\n"]
    for entry in sorted(os.listdir(factory)):
        if entry in ("machine-id", "mtab", "hostname"):
            continue  # systemd makes these per machine
        lines.append(f"C /etc/{entry} - - - - -\n")
    conf = fsutil.dirs_inside(tree, "usr/lib/tmpfiles.d") / "obelisk-factory-etc.conf"
    fsutil.remove_tree(conf)
    conf.write_text("".join(lines))

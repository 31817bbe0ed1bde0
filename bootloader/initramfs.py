"""Build the initramfs: busybox, the kernel modules the boot needs, veritysetup, first-boot tools.

The image is a deterministic newc cpio (entries sorted, mtimes 0, owner root, inode numbers in
order) compressed with gzip without a name or timestamp, so the same tree gives the same bytes.
Its ``/init`` (``bootloader/initramfs/init``) opens the chosen USR slot with dm-verity, mounts
ROOT and ``/usr``, does the first-boot work and switches root. On a PXE boot it takes ``/usr`` from
``/usr.img`` in the initrd instead (loop + dm-verity) and a tmpfs as ROOT (docs/pxe.md).
"""

from __future__ import annotations

import gzip
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from obelisk.errors import ObeliskError
from obelisk.tools import ToolError, require, run

DATA = Path(__file__).with_name("initramfs")
# Module names (as modinfo spells them); dependencies come from modules.dep or modinfo.
MODULES = [
    "virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "squashfs", "dm_mod", "dm_bufio", "dm_verity",
    # ext4 asks the crypto API for crc32c at mount time (a softdep, not in modules.dep).
    "crc32c_generic", "crc32c_intel", "ext4", "vfat", "nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859_1",
    # A PXE boot attaches /usr.img (inside the initrd) to a loop device.
    "loop",
    # The kernel's pstore in EFI variables: a panic's last lines survive the reset (docs/health.md).
    "efi_pstore",
]
# Optional: other disk types, loop (only PXE boots need it; a disk boot must not fail for want of it), and
# efi_pstore (an image may leave it out: then no panic is kept).
OPTIONAL = {"virtio_scsi", "sd_mod", "nls_iso8859_1", "nls_ascii", "crc32c_intel", "loop", "efi_pstore"}
# Programs copied with their shared libraries: from the tree when it has them, else the host.
PROGRAMS = ["veritysetup", "sgdisk", "resize2fs"]
PROGRAM_DIRS = ["usr/sbin", "usr/bin", "sbin", "bin"]


class InitramfsError(ObeliskError, ValueError):
    """The tree lacks something the initramfs needs; the message says what."""


@dataclass
class Archive:
    """Files of the cpio, by path inside it (no leading slash)."""

    files: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # path -> (mode, data)
    dirs: set[str] = field(default_factory=set)
    links: dict[str, str] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dirs.add("/".join(parts[:i]))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self.files[path] = (mode, data)

    def add_dir(self, path: str) -> None:
        path = path.strip("/")
        self._parents(path + "/x")

    def add_link(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.links[path] = target

    def cpio(self) -> bytes:
        entries: list[tuple[str, int, bytes]] = []
        for d in self.dirs:
            entries.append((d, stat.S_IFDIR | 0o755, b""))
        for p, (mode, data) in self.files.items():
            entries.append((p, stat.S_IFREG | mode, data))
        for p, target in self.links.items():
            entries.append((p, stat.S_IFLNK | 0o777, target.encode()))
        entries.sort(key=lambda e: e[0])
        out = bytearray()
        for ino, (name, mode, data) in enumerate(entries, start=1):
            out += _newc(name, mode, data, ino)
        out += _newc("TRAILER!!!", 0, b"", 0)
        out += b"\0" * (-len(out) % 512)
        return bytes(out)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _newc(name: str, mode: int, data: bytes, ino: int) -> bytes:
    nm = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nm), 0]
    hdr = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    return hdr + nm + _pad4(len(hdr) + len(nm)) + data + _pad4(len(data))


def find_kernel(tree: Path) -> tuple[str, Path]:
    """(kernel version, modules dir) of the one kernel in the tree."""
    for base in ("usr/lib/modules", "lib/modules"):
        d = tree / base
        if d.is_dir():
            kvers = sorted(p.name for p in d.iterdir() if (p / "kernel").is_dir())
            if len(kvers) == 1:
                return kvers[0], d / kvers[0]
            if len(kvers) > 1:
                raise InitramfsError(f"{d}: {len(kvers)} kernels ({', '.join(kvers)}): keep exactly one in the image")
    raise InitramfsError(f"{tree}: no kernel modules under usr/lib/modules/<version>/: add a kernel package")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_index(moddir: Path) -> dict[str, Path]:
    return {_norm(p.name.split(".ko")[0]): p for p in (moddir / "kernel").rglob("*.ko*")}


def _builtin(moddir: Path) -> set[str]:
    f = moddir / "modules.builtin"
    if not f.exists():
        return set()
    return {_norm(Path(line.strip()).name.split(".ko")[0]) for line in f.read_text().splitlines() if line.strip()}


def _deps_of(path: Path, moddir: Path, depfile: dict[str, list[str]] | None) -> list[str]:
    if depfile is not None:
        rel = str(path.relative_to(moddir))
        return [_norm(Path(d).name.split(".ko")[0]) for d in depfile.get(rel, [])]
    out = run(["modinfo", "-F", "depends", path]).stdout.strip()
    return [_norm(d) for d in out.split(",") if d]


def resolve_modules(moddir: Path, wanted: list[str]) -> list[Path]:
    """Module files in load order (dependencies first). Built-in and absent optional ones skipped."""
    index = _module_index(moddir)
    builtin = _builtin(moddir)
    depfile = None
    if (moddir / "modules.dep").exists():
        depfile = {}
        for line in (moddir / "modules.dep").read_text().splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                depfile[k.strip()] = v.split()
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, required: bool) -> None:
        name = _norm(name)
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            if required:
                raise InitramfsError(f"{moddir}: kernel module {name} not found: the kernel cannot open the slot")
            return
        for dep in _deps_of(index[name], moddir, depfile):
            visit(dep, True)
        order.append(index[name])

    for m in wanted:
        # virtio_scsi/sd_mod serve other disk types; everything else the boot cannot do without.
        visit(m, required=m not in OPTIONAL)
    return order


def _find_program(tree: Path, name: str) -> tuple[Path, Path | None]:
    """(path of the binary, tree it came from or None for the host)."""
    for d in PROGRAM_DIRS:
        p = tree / d / name
        if p.exists() or p.is_symlink():
            return p, tree
    return Path(require(name)), None


def _libs(binary: Path, root: Path | None) -> list[Path]:
    """Shared libraries of a binary (ldd on the host's copy; mapped into the tree when it has them)."""
    out = run(["ldd", in_tree(root, binary) if root is not None else binary.resolve()], check=False).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = None
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            path = parts[2]
        elif parts and parts[0].startswith("/"):
            path = parts[0]
        if path:
            # Kept at the path ldd names (where the loader looks); read through in_tree when copied.
            cand = root / path.lstrip("/") if root else None
            libs.append(cand if cand is not None and in_tree(root, cand).is_file() else Path(path))
    return libs


def in_tree(tree: Path, path: Path) -> Path:
    """``path`` (below ``tree``) with every symlink resolved the way a chroot into ``tree`` would.

    An absolute link target starts again at ``tree``; ``..`` stops at ``tree``. So a hostile
    tree's ``usr/sbin/veritysetup -> /etc/shadow`` names the tree's own /etc/shadow, never the build
    host's. Raises InitramfsError for a link loop.
    """
    tree = Path(tree)
    parts = list(Path(path).relative_to(tree).parts)
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = tree.joinpath(*done, part)
        if here.is_symlink():
            hops += 1
            if hops > 40:
                raise InitramfsError(f"{path}: too many levels of symbolic links in the image tree")
            target = Path(os.readlink(here))
            if target.is_absolute():
                done = []
            parts = list(target.parts[1:] if target.is_absolute() else target.parts) + parts
            continue
        done.append(part)
    return tree.joinpath(*done)


def _read(p: Path, root: Path | None) -> bytes:
    """A file of the image tree (symlinks resolved inside it) or, with ``root`` None, of the build host."""
    return (in_tree(root, p) if root is not None else p.resolve()).read_bytes()


def build(tree: Path, out: Path) -> None:
    """Write the initramfs for the kernel in ``tree`` to ``out``."""
    tree = Path(tree)
    kver, moddir = find_kernel(tree)
    a = Archive()
    for d in ("dev", "proc", "sys", "run", "sysroot", "tmp", "usr/bin", "usr/sbin", "etc"):
        a.add_dir(d)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        a.add_link(link, target)
    a.add_dir("usr/lib64")
    a.add_dir("usr/lib")
    busybox = tree / "usr/bin/busybox"
    if not busybox.exists() or busybox.is_symlink() or _is_dynamic(busybox):
        busybox = Path(require("busybox"))
    if _is_dynamic(busybox):
        raise InitramfsError(f"{busybox} is dynamically linked: install busybox-static")
    a.add_file("usr/bin/busybox", busybox.read_bytes(), 0o755)
    a.add_file("init", (DATA / "init").read_bytes(), 0o755)
    a.add_file("usr/lib/obelisk/initramfs-functions", (DATA / "functions.sh").read_bytes(), 0o644)
    a.add_file("etc/os-release", b"NAME=obelisk-initramfs\n")

    mod_lines = []
    for m in resolve_modules(moddir, MODULES):
        rel = f"usr/lib/modules/{kver}/{m.relative_to(moddir)}"
        a.add_file(rel, _read(m, tree))
        mod_lines.append("/" + rel)
    a.add_file("etc/obelisk/modules", ("\n".join(mod_lines) + "\n").encode())

    for prog in PROGRAMS:
        try:
            path, root = _find_program(tree, prog)
        except ToolError as exc:
            raise InitramfsError(f"initramfs needs {prog}: {exc}") from exc
        a.add_file(f"usr/sbin/{prog}", _read(path, root), 0o755)
        for lib in _libs(path, root):
            # Libraries go to the path the dynamic loader expects (ld.so in lib64, the rest in lib).
            from_tree = root is not None and lib.is_relative_to(root)
            a.add_file(_usr_path(lib, root).lstrip("/"), _read(lib, root if from_tree else None), 0o755)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # mtime=0 and no file name: the same tree gives the same bytes.
    with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as gz:
        gz.write(a.cpio())
    os.replace(tmp, out)


def _usr_path(lib: Path, root: Path | None) -> str:
    p = lib.relative_to(root) if root and lib.is_relative_to(root) else lib.relative_to("/")
    parts = p.parts
    if parts[0] == "usr":
        return "/" + str(p)
    return "/usr/" + str(p)


def _is_dynamic(binary: Path) -> bool:
    data = binary.read_bytes()[:65536]
    return b"/lib64/ld-linux" in data or b"ld-linux-x86-64" in data

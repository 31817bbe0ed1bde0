"""The ESP: populate its boot-loader files, and read/rewrite the grubenv inside a disk.

``populate`` writes the GRUB EFI binary (stock Debian modules, built in with grub-mkimage),
grub.cfg and the first grubenv into a directory that the builder packs into the FAT image.

On a disk (an image file or a block device), the grubenv is read and rewritten *in place*
through a minimal FAT reader, the way GRUB's ``save_env`` does it: the file keeps its clusters,
so there is never a moment without a grubenv (mcopy would delete and re-create it).
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bootloader import grub
from bootloader.gpt import read_table
from bootloader.layout import USR_A, USR_B, name_of
from obelisk import diskio
from obelisk.errors import ObeliskError
from obelisk.tools import run

ESP_INDEX = 1


@dataclass(frozen=True)
class SlotBoot:
    root_hash: str
    hash_offset: int
    version: str


class EspError(ObeliskError, ValueError):
    """The disk's ESP or its grubenv cannot be used; the message says what to do."""


def initial_env(usr_a: SlotBoot, usr_b: SlotBoot | None = None) -> grub.LoaderEnv:
    """A fresh disk: USR-A P=1 T=0 S=1, USR-B P=0 T=0 S=0 (the builder's GPT)."""
    env = grub.LoaderEnv()
    env.slots[name_of(USR_A)] = grub.SlotEnv(prio=1, tries=0, ok=True, base=(1, 0, 1), hash=usr_a.root_hash,
                                  hashoff=usr_a.hash_offset, version=usr_a.version)
    if usr_b is not None:
        env.slots[name_of(USR_B)] = grub.SlotEnv(hash=usr_b.root_hash, hashoff=usr_b.hash_offset, version=usr_b.version)
    return env


def build_efi(out: Path) -> None:
    """BOOTX64.EFI: GRUB with its modules built in and prefix /EFI/obelisk on the boot device."""
    out.parent.mkdir(parents=True, exist_ok=True)
    run(["grub-mkimage", "-O", "x86_64-efi", "-o", out, "-p", grub.PREFIX, *grub.GRUB_MODULES])


def populate(esp_dir: Path, *, usr_a: SlotBoot, usr_b: SlotBoot | None = None) -> None:
    """Write every boot-loader file of the ESP into ``esp_dir``."""
    esp_dir = Path(esp_dir)
    build_efi(esp_dir / grub.EFI_PATH)
    cfg = esp_dir / grub.CFG_PATH
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(grub.render_cfg())
    (esp_dir / grub.ENV_PATH).write_bytes(grub.render_env(initial_env(usr_a, usr_b).to_vars()))


# --- FAT, just enough to find one file's bytes -------------------------------------------------


@dataclass(frozen=True)
class _Fat:
    base: int  # byte offset of the filesystem in the disk
    bps: int
    spc: int
    reserved: int
    nfats: int
    fatsz: int
    root_entries: int
    root_cluster: int
    total_clusters: int
    fat_type: int

    @property
    def cluster_bytes(self) -> int:
        return self.bps * self.spc

    @property
    def root_dir_offset(self) -> int:
        return self.base + (self.reserved + self.nfats * self.fatsz) * self.bps

    @property
    def data_offset(self) -> int:
        return self.root_dir_offset + ((self.root_entries * 32 + self.bps - 1) // self.bps) * self.bps

    def cluster_offset(self, c: int) -> int:
        return self.data_offset + (c - 2) * self.cluster_bytes


def _read_at(fd: int, off: int, n: int) -> bytes:
    data = os.pread(fd, n, off)
    if len(data) != n:
        raise EspError(f"short read at byte {off}: the disk is truncated")
    return data


def _open_fat(fd: int, base: int) -> _Fat:
    bs = _read_at(fd, base, 512)
    bps, spc, reserved, nfats, root_entries, tot16, _media, fat16sz = struct.unpack_from("<HBHBHHBH", bs, 11)
    tot32, = struct.unpack_from("<I", bs, 32)
    if bs[510:512] != b"\x55\xaa" or bps not in (512, 1024, 2048, 4096) or spc == 0 or nfats == 0:
        raise EspError("partition 1 holds no FAT filesystem: rebuild the image with 'obelisk image build'")
    fatsz = fat16sz or struct.unpack_from("<I", bs, 36)[0]
    root_cluster = struct.unpack_from("<I", bs, 44)[0] if fat16sz == 0 else 0
    total = tot16 or tot32
    data_sectors = total - (reserved + nfats * fatsz + (root_entries * 32 + bps - 1) // bps)
    clusters = data_sectors // spc
    fat_type = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    return _Fat(base, bps, spc, reserved, nfats, fatsz, root_entries, root_cluster, clusters, fat_type)


def _next_cluster(fd: int, fat: _Fat, c: int) -> int | None:
    fat_off = fat.base + fat.reserved * fat.bps
    if fat.fat_type == 32:
        v = struct.unpack("<I", _read_at(fd, fat_off + c * 4, 4))[0] & 0x0FFFFFFF
        return None if v >= 0x0FFFFFF8 else v
    if fat.fat_type == 16:
        v = struct.unpack("<H", _read_at(fd, fat_off + c * 2, 2))[0]
        return None if v >= 0xFFF8 else v
    raw = struct.unpack("<H", _read_at(fd, fat_off + c * 3 // 2, 2))[0]
    v = raw >> 4 if c & 1 else raw & 0xFFF
    return None if v >= 0xFF8 else v


def _chain(fd: int, fat: _Fat, first: int) -> list[int]:
    out: list[int] = []
    c: int | None = first
    while c is not None and 2 <= c < fat.total_clusters + 2:
        out.append(c)
        if len(out) > fat.total_clusters:
            raise EspError("FAT cluster chain loops: run 'fsck.fat' on the ESP")
        c = _next_cluster(fd, fat, c)
    return out


def _dir_entries(fd: int, fat: _Fat, first_cluster: int) -> list[tuple[str, int, int, int]]:
    """(short name, attr, first cluster, size) of a directory (0 = FAT12/16 root)."""
    if first_cluster == 0:
        raw = _read_at(fd, fat.root_dir_offset, fat.root_entries * 32)
    else:
        raw = b"".join(_read_at(fd, fat.cluster_offset(c), fat.cluster_bytes) for c in _chain(fd, fat, first_cluster))
    out = []
    for i in range(0, len(raw), 32):
        e = raw[i : i + 32]
        if e[0] == 0:
            break
        if e[0] == 0xE5 or e[11] == 0x0F:  # deleted or long-name entry
            continue
        name = e[0:8].decode("latin-1").rstrip()
        ext = e[8:11].decode("latin-1").rstrip()
        hi, lo = struct.unpack_from("<H", e, 20)[0], struct.unpack_from("<H", e, 26)[0]
        size = struct.unpack_from("<I", e, 28)[0]
        out.append((f"{name}.{ext}" if ext else name, e[11], (hi << 16) | lo, size))
    return out


def _locate(fd: int, fat: _Fat, path: str) -> list[tuple[int, int]]:
    """Byte extents (offset, length) holding the file's data, in order."""
    cluster = fat.root_cluster
    parts = path.strip("/").split("/")
    for i, part in enumerate(parts):
        match = [e for e in _dir_entries(fd, fat, cluster) if e[0].upper() == part.upper()]
        if not match:
            raise EspError(f"ESP has no /{'/'.join(parts[: i + 1])}: rebuild the image or run 'obelisk boot status'")
        _, attr, first, size = match[0]
        cluster = first
    remaining = size
    extents = []
    for c in _chain(fd, fat, cluster):
        n = min(remaining, fat.cluster_bytes)
        if n <= 0:
            break
        extents.append((fat.cluster_offset(c), n))
        remaining -= n
    if remaining > 0:
        raise EspError(f"ESP file /{path} is shorter on disk than its size: run 'fsck.fat' on the ESP")
    return extents


def esp_offset(disk: Path) -> int:
    table = read_table(Path(disk))
    for p in table.partitions:
        if p.index == ESP_INDEX:
            return p.first_lba * table.sector_size
    raise EspError(f"{disk}: no partition 1 (EFI-SYSTEM): not an obelisk disk")


def read_file(disk: Path, path: str, *, max_bytes: int | None = None) -> bytes:
    """An ESP file's bytes (the first ``max_bytes`` of them when given: for files anyone may have written)."""
    fd = os.open(disk, os.O_RDONLY)
    try:
        fat = _open_fat(fd, esp_offset(disk))
        out = bytearray()
        for off, n in _locate(fd, fat, path):
            if max_bytes is not None and len(out) + n > max_bytes:
                n = max_bytes - len(out)
            if n > 0:
                out += _read_at(fd, off, n)
            if max_bytes is not None and len(out) >= max_bytes:
                break
        return bytes(out)
    finally:
        os.close(fd)


def has_file(disk: Path, path: str) -> bool:
    try:
        read_file(disk, path)
    except EspError:
        return False
    return True


def rewrite_file(disk: Path, path: str, data: bytes) -> None:
    """Overwrite an existing ESP file of the same size in place, then flush to the disk."""
    fd = os.open(disk, os.O_RDWR)
    try:
        fat = _open_fat(fd, esp_offset(disk))
        extents = _locate(fd, fat, path)
        if sum(n for _, n in extents) != len(data):
            raise EspError(f"ESP file /{path} has another size than the new content: rebuild the image")
        pos = 0
        for off, n in extents:
            diskio.pwrite_all(fd, data[pos : pos + n], off)
            pos += n
        diskio.fsync(fd)
    finally:
        os.close(fd)


def copy_in(disk: Path, path: str, data: bytes) -> None:
    """Create or replace an ESP file with mtools (for files GRUB does not rewrite)."""
    off = esp_offset(disk)
    with tempfile.NamedTemporaryFile() as tmp:
        tmp.write(data)
        tmp.flush()
        image = f"{disk}@@{off}"
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            run(["mmd", "-D", "s", "-i", image, "::/" + "/".join(parts[:i])], check=False)
        run(["mcopy", "-o", "-i", image, tmp.name, "::/" + path.strip("/")])

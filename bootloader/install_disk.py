"""What `obelisk install` may write to: a target disk inspected with pyparted, and whether it is in use.

pyparted (libparted) gives the size, the logical sector size and the partitions; nothing is ever
committed through it, and every question libparted asks ("fix the GPT?") is answered "ignore", so an
inspection writes nothing. "In use" is what the kernel says: a mount of the disk or one of its
partitions (/proc/self/mountinfo, by device number), a swap on it (/proc/swaps), a holder such as
device-mapper or md (/sys/block/NAME/holders, also per partition), and finally an O_EXCL open, which
the kernel refuses with EBUSY while anything holds the device. The parsers take text so that they
are tested without devices.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from obelisk.errors import ObeliskError

SYS_BLOCK = Path("/sys/block")
SYS_CLASS_BLOCK = Path("/sys/class/block")


class InstallTargetError(ObeliskError):
    """The target disk cannot be inspected, or is refused (in use, too small, not a block device)."""


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # first sector
    sectors: int
    fs: str  # file system libparted recognised, "" when none
    name: str  # GPT partition name, "" for other labels


@dataclass
class Target:
    path: Path
    kind: str  # "block" | "file"
    size: int  # bytes
    sector_size: int
    label: str = ""  # partition table type ("gpt", "msdos"), "" when none
    partitions: list[Partition] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)  # one reason per user of the disk

    def to_json(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "size": self.size, "sector_size": self.sector_size,
                "label": self.label, "partitions": [p.__dict__ for p in self.partitions], "in_use": self.in_use}


def _kind(path: Path) -> tuple[str, os.stat_result]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InstallTargetError(f"{path}: no such disk: give the block device to install to, e.g. /dev/sdX") from None
    except OSError as exc:
        raise InstallTargetError(f"{path}: cannot inspect the disk: {exc.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        return "block", st
    if stat.S_ISREG(st.st_mode):
        return "file", st
    raise InstallTargetError(f"{path}: is neither a block device nor a regular file: give a disk such as /dev/sdX")


_handler: list[object] = []  # the registered handler and its answer, kept alive here


def _ignore(_type: int, _options: int, _message: str) -> int:
    """libparted's questions ("fix the GPT?") are answered "ignore", never "fix": inspecting must not write."""
    return _handler[1]  # type: ignore[return-value]


def _register(parted: object) -> None:
    """Once per process: pyparted keeps no reference of its own to the handler and drops one from the
    previous handler on each registration, so a lambda, or a second registration, is freed while
    libparted still calls it (segfaults, both seen here)."""
    if not _handler:
        _handler.extend([_ignore, parted.EXCEPTION_RESOLVE_IGNORE])  # type: ignore[attr-defined]
        parted.register_exn_handler(_ignore)  # type: ignore[attr-defined]


def _parted(path: Path) -> tuple[int, int, str, list[Partition]]:
    """(size in bytes, logical sector size, label, partitions) through libparted, read-only."""
    try:
        import _ped
        import parted
    except ImportError:
        raise InstallTargetError(
            "pyparted is not installed: run 'pip install pyparted' (needs the Debian packages libparted-dev and "
            "pkg-config), or 'make setup'") from None
    _register(parted)
    try:
        dev = parted.getDevice(str(path))
    except (_ped.IOException, _ped.DeviceException) as exc:
        raise InstallTargetError(f"{path}: libparted cannot open it: {exc}") from None
    try:
        disk = parted.newDisk(dev)
    except (_ped.DiskException, _ped.IOException, _ped.PartedException):
        return dev.length * dev.sectorSize, dev.sectorSize, "", []  # blank, or no label libparted knows
    parts = []
    for p in disk.partitions:
        name = ""
        if disk.type == "gpt":
            try:
                name = p.name or ""
            except _ped.PartitionException:
                name = ""
        parts.append(Partition(p.number, p.geometry.start, p.geometry.length,
                               p.fileSystem.type if p.fileSystem else "", name))
    return dev.length * dev.sectorSize, dev.sectorSize, disk.type, parts


def mounts_on(mountinfo: str, devices: set[str]) -> list[str]:
    """Mount points in ``mountinfo`` (/proc/self/mountinfo text) whose source is one of ``devices`` ("MAJ:MIN")."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[2] in devices:
            found.append(fields[4].replace("\\040", " "))
    return found


def swaps_on(swaps: str, devices: set[str], devnum: object = None) -> list[str]:
    """Swap areas in ``swaps`` (/proc/swaps text) on one of ``devices``; ``devnum`` maps a path to "MAJ:MIN"."""
    number = devnum or _devnum
    found = []
    for line in swaps.splitlines()[1:]:
        name = line.split(maxsplit=1)[0] if line.strip() else ""
        if name and number(name) in devices:  # type: ignore[operator]
            found.append(name)
    return found


def _devnum(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" if stat.S_ISBLK(st.st_mode) else ""


def block_tree(name: str, sys_block: Path = SYS_BLOCK) -> tuple[set[str], list[str]]:
    """("MAJ:MIN" of the disk and each partition, holders of any of them) from sysfs."""
    base = sys_block / name
    nodes = [base] + sorted(p.parent for p in base.glob("*/partition"))
    devices, holders = set(), []
    for node in nodes:
        try:
            devices.add((node / "dev").read_text().strip())
        except OSError:
            continue
        holders += [f"{node.name} is held by {h.name}" for h in sorted((node / "holders").glob("*"))]
    return devices, holders


def _busy(path: Path) -> bool:
    """True when the kernel refuses an exclusive open: something (a mount, dm, md, another installer) holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        raise InstallTargetError(f"{path}: cannot open the disk: {exc.strerror}") from None
    os.close(fd)
    return False


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def usage(path: Path, st: os.stat_result) -> list[str]:
    """Every user of block device ``path`` the kernel reports; empty when it is free."""
    name = Path(os.path.realpath(path)).name
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    if (SYS_BLOCK / name).is_dir():
        devices, reasons = block_tree(name)
    else:  # a partition given as the disk, or a name sysfs does not know: its own number only
        devices, reasons = {f"{major}:{minor}"}, []
        if (SYS_CLASS_BLOCK / name / "partition").exists():
            reasons.append("it is a partition, not a whole disk (the image has its own partition table)")
    reasons += [f"mounted on {m}" for m in mounts_on(_read("/proc/self/mountinfo"), devices)]
    reasons += [f"in use as swap ({s})" for s in swaps_on(_read("/proc/swaps"), devices)]
    if not reasons and _busy(path):
        reasons.append("busy: the kernel refuses an exclusive open (mounted elsewhere, or held by another program)")
    return reasons


def inspect(path: str | os.PathLike[str]) -> Target:
    """The target as it is now; reads only."""
    p = Path(path)
    kind, st = _kind(p)
    size, sector, label, parts = _parted(p)
    target = Target(p, kind, size, sector, label, parts)
    if kind == "block":
        target.in_use = usage(p, st)
    return target


@dataclass(frozen=True)
class Refusal:
    reason: str
    forceable: bool  # --force overrides it


def refusals(target: Target, image_size: int, image_sector: int = 512) -> list[Refusal]:
    """Why writing an image of ``image_size`` bytes to ``target`` is refused.

    ``--force`` overrides each but one: a block device smaller than the image (the write would stop
    at its end, leaving no partition table); a regular file just grows.
    """
    out = []
    if target.kind != "block":
        out.append(Refusal(f"{target.path} is a regular file, not a block device", True))
    out += [Refusal(f"{target.path} is in use: {r}", True) for r in target.in_use]
    if target.size < image_size:
        out.append(Refusal(f"{target.path} is too small: {target.size:,} bytes, the image needs {image_size:,}",
                           target.kind != "block"))
    if target.sector_size != image_sector:
        out.append(Refusal(f"{target.path} has {target.sector_size}-byte sectors, the image's GPT was made for "
                           f"{image_sector}-byte sectors (firmware would not find it)", True))
    return out

"""A/B slot rules on the GPT attribute field (cgpt and GRUB ``gptprio`` compatible).

The attribute bits (reference/image-build.md §2.1): priority 48-51, tries 52-55, successful 56.
Pure functions on attribute values and priorities come first; the disk-level functions below
them read the table once, change only these bits of the USR entries, and write it once, so
every operation is one crash-safe :func:`bootloader.gpt.write_table`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from bootloader import gpt, layout, loader
from bootloader.layout import (  # noqa: F401  (re-exported: the slot identity's users read it from here too)
    CHROMEOS_KERNEL_TYPE,
    ESP_TYPE,
    MAX_PRIORITY,
    MAX_TRIES,
    PRIORITY_MASK,
    PRIORITY_SHIFT,
    ROOT_TYPE,
    SLOT_NAMES,
    SUCCESSFUL_MASK,
    SUCCESSFUL_SHIFT,
    TRIES_MASK,
    TRIES_SHIFT,
    USR_A,
    USR_A_UUID,
    USR_B,
    USR_B_UUID,
    USR_TYPE,
    name_of,
)
from obelisk.errors import ObeliskError


class SlotError(ObeliskError, ValueError):
    """A refused or impossible slot operation. One line for the user."""


@dataclass
class Slot:
    index: int
    label: str
    uuid: uuid.UUID
    priority: int
    tries: int
    successful: bool
    first_lba: int
    last_lba: int

    @property
    def name(self) -> str:
        return name_of(self.index)

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "label": self.label, "uuid": str(self.uuid), "priority": self.priority,
                "tries": self.tries, "successful": self.successful}


# ---------------------------------------------------------------- pure rules


def decode(attributes: int) -> tuple[int, int, bool]:
    """(priority, tries, successful) of a 64-bit attribute value."""
    priority, tries, successful = layout.decode_bits(attributes)
    return priority, tries, bool(successful)


def encode(attributes: int, *, priority: int | None = None, tries: int | None = None,
           successful: bool | None = None) -> int:
    """``attributes`` with the given fields replaced; every other bit is kept."""
    check_range(priority=priority, tries=tries)
    if priority is not None:
        attributes = (attributes & ~PRIORITY_MASK) | (priority << PRIORITY_SHIFT)
    if tries is not None:
        attributes = (attributes & ~TRIES_MASK) | (tries << TRIES_SHIFT)
    if successful is not None:
        attributes = (attributes & ~SUCCESSFUL_MASK) | (int(bool(successful)) << SUCCESSFUL_SHIFT)
    return attributes & 0xFFFFFFFFFFFFFFFF


def check_range(*, priority: int | None = None, tries: int | None = None, max_priority: int | None = None) -> None:
    if priority is not None and not 0 <= priority <= MAX_PRIORITY:
        raise SlotError(f"priority {priority} is out of range — use 0..{MAX_PRIORITY}")
    if tries is not None and not 0 <= tries <= MAX_TRIES:
        raise SlotError(f"tries {tries} is out of range — use 0..{MAX_TRIES}")
    if max_priority is not None and not 1 <= max_priority <= MAX_PRIORITY:
        raise SlotError(f"max priority {max_priority} is out of range — use 1..{MAX_PRIORITY}")


def next_index(slots: list[Slot]) -> int | None:
    """GRUB ``gptprio.next``'s choice: the highest priority among slots with tries > 0 or
    successful; priority 0 never boots; ties go to the lowest index. None when nothing qualifies."""
    best, chosen = 0, None
    for s in sorted(slots, key=lambda s: s.index):
        if (s.tries > 0 or s.successful) and s.priority > best:
            best, chosen = s.priority, s.index
    return chosen


def prioritized(priorities: dict[int, int], index: int | None = None, *, max_priority: int | None = None,
                friends: bool = False) -> dict[int, int]:
    """``cgpt prioritize`` on ``index -> priority`` of the candidate partitions; returns the new map.

    Groups partitions by priority; ``index`` (with ``friends`` its whole group) moves into a new
    top group; groups are ranked by priority, a trailing priority-0 group is left alone, and the
    rest renumbered from ``max_priority`` (default: number of groups, at most 15) down, never
    below 1. (vboot ``cgpt_prioritize.c``.)
    """
    check_range(max_priority=max_priority)
    if friends and index is None:
        raise SlotError("--friends needs a slot index")
    if index is not None and index not in priorities:
        raise SlotError(f"partition {index} is not a candidate for prioritize")
    top = 99  # above every real priority, as cgpt does
    groups: dict[int, list[int]] = {}
    for i in sorted(priorities):
        key = priorities[i]
        if index is not None and not friends and i == index:
            key = top
        groups.setdefault(key, []).append(i)
    if index is not None and friends:
        groups[top] = groups.pop(priorities[index])
    order = sorted(groups, reverse=True)
    if order and order[-1] == 0:
        order.pop()
    new = dict(priorities)
    prio = max_priority or min(len(order), MAX_PRIORITY)
    for key in order:
        for i in groups[key]:
            new[i] = prio
        prio = max(prio - 1, 1)
    return new


def parse_slot(text: str) -> int:
    """A slot as the user names it (3, 4, A, B, USR-A, USR-B), or any other partition number,
    which the disk-level functions then refuse naming the disk's USR slots."""
    index = layout.parse_slot(text)
    if index is not None:
        return index
    if text.strip().isdigit():
        return int(text.strip())
    raise SlotError(f"{text!r} is not a slot — use an index ({USR_A}, {USR_B}) or {' / '.join(SLOT_NAMES)}")


# ---------------------------------------------------------------- disk level


_P = ParamSpec("_P")
_R = TypeVar("_R")
_held: dict[str, int] = {}  # disks this process holds the slot lock on (re-entry from nested calls)


@contextlib.contextmanager
def _exclusive(disk: Path) -> Iterator[None]:
    """An advisory lock on the disk for one read-modify-write, so the update engine and the boot
    check cannot interleave and lose a change. cgpt takes no lock, so it is not excluded."""
    key = os.path.realpath(disk)
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    try:
        mode = os.stat(key).st_mode
        # Only a file or block device is opened: open() of a FIFO would block before any check.
        fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC) if stat.S_ISREG(mode) or stat.S_ISBLK(mode) else -1
    except OSError:  # missing or unreadable: the read that follows gives the one-line error
        fd = -1
    if fd < 0:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[key] = 1
        yield
    finally:
        _held.pop(key, None)
        os.close(fd)


def _locked(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _exclusive(Path(args[0] if args else kwargs["disk"])):  # type: ignore[arg-type]
            return fn(*args, **kwargs)

    return wrapper


def _slot(p: gpt.GptPartition) -> Slot:
    prio, tries, ok = decode(p.attributes)
    return Slot(p.index, p.name, p.part_guid, prio, tries, ok, p.first_lba, p.last_lba)


def _read(disk: Path) -> tuple[gpt.GptTable, list[Slot]]:
    gpt.read_table(disk)  # a missing or non-GPT disk gets this module's one-line error, before the loader looks
    loader.reconcile(disk)
    table = gpt.read_table(disk)
    return table, [_slot(p) for p in table.partitions if p.type_guid == USR_TYPE]


def _require(disk: Path, slots: list[Slot], index: int) -> Slot:
    found = next((s for s in slots if s.index == index), None)
    if found is None:
        have = ", ".join(str(s.index) for s in slots) or "none"
        raise SlotError(f"{disk}: partition {index} is not a USR slot (USR slots: {have}) — pick one of those")
    return found


def _write(disk: Path, table: gpt.GptTable, changes: dict[int, int]) -> list[Slot]:
    """Write the new attributes in one table write, then hand the state to the boot loader."""
    old = {p.index: p.attributes for p in table.partitions}
    if any(old[i] != a for i, a in changes.items()) or table.needs_repair:
        gpt.write_table(disk, gpt.with_attributes(table, changes))
        loader.mirror(disk)
    parts = gpt.with_attributes(table, changes).partitions
    return [_slot(p) for p in parts if p.type_guid == USR_TYPE]


def _by_index(slots: list[Slot], index: int) -> Slot:
    return next(s for s in slots if s.index == index)


@_locked
def read_slots(disk: Path) -> list[Slot]:
    return _read(Path(disk))[1]


@_locked
def set_attrs(disk: Path, index: int, *, priority: int | None = None, tries: int | None = None,
              successful: bool | None = None) -> Slot:
    """Like ``cgpt add -i INDEX -P -T -S``: change only the given fields."""
    disk = Path(disk)
    check_range(priority=priority, tries=tries)
    table, slots = _read(disk)
    _require(disk, slots, index)
    attrs = encode(table.partition(index).attributes, priority=priority, tries=tries, successful=successful)
    return _by_index(_write(disk, table, {index: attrs}), index)


def _prioritize_changes(table: gpt.GptTable, slots: list[Slot], index: int | None, base: dict[int, int],
                        max_priority: int | None, friends: bool) -> dict[int, int]:
    prios = {s.index: decode(base.get(s.index, table.partition(s.index).attributes))[0] for s in slots}
    new = prioritized(prios, index, max_priority=max_priority, friends=friends)
    out = dict(base)
    for i, p in new.items():
        out[i] = encode(out.get(i, table.partition(i).attributes), priority=p)
    return out


@_locked
def prioritize(disk: Path, index: int, *, max_priority: int | None = None, friends: bool = False) -> list[Slot]:
    """``cgpt prioritize -i INDEX [-P max] [-f]`` over the USR slots."""
    disk = Path(disk)
    check_range(max_priority=max_priority)
    table, slots = _read(disk)
    _require(disk, slots, index)
    return _write(disk, table, _prioritize_changes(table, slots, index, {}, max_priority, friends))


@_locked
def boot_next(disk: Path, *, dry_run: bool = False) -> Slot | None:
    """The boot-time choice (``gptprio.next``): pick, burn one try if it has any, write both copies.

    Returns the chosen slot as it is after the choice (with ``dry_run``: as it would be), or None.
    """
    disk = Path(disk)
    table, slots = _read(disk)
    chosen = next_index(slots)
    if chosen is None:
        return None
    slot = _by_index(slots, chosen)
    if slot.tries == 0:  # a successful slot with no tries left: GRUB writes nothing
        return slot
    attrs = encode(table.partition(chosen).attributes, tries=slot.tries - 1)
    if dry_run:
        return _slot(gpt.with_attributes(table, {chosen: attrs}).partition(chosen))
    return _by_index(_write(disk, table, {chosen: attrs}), chosen)


@_locked
def mark_good(disk: Path, index: int) -> Slot:
    """After a healthy boot: S=1 T=0 and prioritize it (``flatcar-setgoodroot``), in one write."""
    disk = Path(disk)
    table, slots = _read(disk)
    _require(disk, slots, index)
    base = {index: encode(table.partition(index).attributes, tries=0, successful=True)}
    return _by_index(_write(disk, table, _prioritize_changes(table, slots, index, base, None, False)), index)


@_locked
def mark_unbootable(disk: Path, index: int) -> Slot:
    """P=0 T=0 S=0: before a slot is rewritten, so no boot can pick a half-written slot."""
    return set_attrs(disk, index, priority=0, tries=0, successful=False)


@_locked
def stage_trial(disk: Path, index: int, *, tries: int = 1) -> Slot:
    """Postinstall: S=0 T=tries, then prioritize the slot (``cgpt add -S0 -T1`` + ``cgpt prioritize``)."""
    disk = Path(disk)
    check_range(tries=tries)
    if tries < 1:
        raise SlotError(f"tries {tries} would make the trial slot unbootable — use 1..{MAX_TRIES}")
    table, slots = _read(disk)
    _require(disk, slots, index)
    base = {index: encode(table.partition(index).attributes, tries=tries, successful=False)}
    return _by_index(_write(disk, table, _prioritize_changes(table, slots, index, base, None, False)), index)


@_locked
def rollback(disk: Path) -> Slot:
    """Make the other slot the next boot, but only if it has booted well before (S=1)."""
    disk = Path(disk)
    table, slots = _read(disk)
    current = _running_or_next(disk, slots)
    if current is None:
        raise SlotError(f"{disk}: no slot is running or bootable, so there is nothing to roll back from")
    others = [s for s in slots if s.index != current and s.index in (USR_A, USR_B)]
    if not others:
        raise SlotError(f"{disk}: there is no other USR slot to roll back to")
    other = others[0]
    if not other.successful:
        raise SlotError(
            f"{disk}: slot {other.name} (partition {other.index}) is not marked successful, so it is not a known-good "
            "system — refusing to roll back; stage a release into it first"
        )
    return _by_index(_write(disk, table, _prioritize_changes(table, slots, other.index, {}, None, False)), other.index)


@_locked
def slot_extent(disk: Path, index: int) -> tuple[int, int]:
    """(byte offset, byte length) of a USR slot's partition."""
    disk = Path(disk)
    table, slots = _read(disk)
    s = _require(disk, slots, index)
    ss = table.sector_size
    return s.first_lba * ss, (s.last_lba - s.first_lba + 1) * ss


# ---------------------------------------------------------------- the running host


def _cmdline(path: Path = Path("/proc/cmdline")) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _usr_partuuid(cmdline: str) -> uuid.UUID | None:
    """The PARTUUID /usr was mounted from (obelisk's own key, or Flatcar's mount.usr=)."""
    m = re.search(r"(?:^|\s)(?:obelisk\.usr|mount\.usr|usr)=PARTUUID=([0-9A-Fa-f-]{36})(?:\s|$)", cmdline)
    return uuid.UUID(m.group(1)) if m else None


def _disk_of_partition(dev: Path) -> Path | None:
    """/dev/sda3 -> /dev/sda via sysfs (works for nvme0n1p3, vda3, ...)."""
    try:
        sys_part = Path("/sys/class/block") / dev.resolve().name
        if not (sys_part / "partition").exists():
            return None
        return Path("/dev") / sys_part.resolve().parent.name
    except OSError:
        return None


def same_file(a: Path, b: Path) -> bool:
    """True when both paths name one disk: the same block device, or the same image file."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    if sa.st_rdev and sb.st_rdev:
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def find_boot_disk() -> Path:
    """On a host: the disk that holds the booted /usr (from the kernel command line's PARTUUID)."""
    part = _usr_partuuid(_cmdline())
    if part is not None:
        dev = Path("/dev/disk/by-partuuid") / str(part)
        disk = _disk_of_partition(dev) if dev.exists() else None
        if disk is not None:
            return disk
        # No udev links (e.g. in an initramfs): look for the GUID in every whole disk's GPT.
        for block in sorted(Path("/sys/block").glob("*")):
            if block.name.startswith(("loop", "ram", "dm-", "zram")):
                continue
            try:
                table = gpt.read_table(Path("/dev") / block.name)
            except gpt.GptError:
                continue
            if any(p.part_guid == part for p in table.partitions):
                return Path("/dev") / block.name
    raise SlotError("cannot tell which disk holds the booted /usr (not an obelisk host?) — pass --disk PATH")


def _running_or_next(disk: Path, slots: list[Slot]) -> int | None:
    part = _usr_partuuid(_cmdline())
    if part is not None:
        try:
            booted = find_boot_disk()
        except SlotError:
            booted = None
        if booted is not None and same_file(booted, disk):
            for s in slots:
                if s.uuid == part:
                    return s.index
    return next_index(slots)


@_locked
def running_index(disk: Path) -> int | None:
    """The slot /usr is mounted from when ``disk`` is the booted disk, else the next-boot slot."""
    disk = Path(disk)
    return _running_or_next(disk, _read(disk)[1])

"""Which slot an apply writes, and which one it must keep.

The slot to keep is the one the host falls back to when the new one fails:

* on the booted disk, the slot ``/usr`` is mounted from (the running slot; it cannot be written anyway);
* on any other disk (a disk image, a disk of another host), the **last good** slot: among the slots marked
  successful that can boot (priority > 0), the one GRUB's ``gptprio.next`` would choose, i.e. the highest
  priority (ties: the lower partition number). After ``boot rollback`` that is the slot rolled back to; after
  a trial boot was marked good, the new slot. A slot with a pending trial (S=0 T>0) is never "good", so
  staging again while a trial is pending replaces the trial and leaves the good slot alone;
* with no successful slot, the slot that boots next (the only thing left worth keeping).

The other slot is written. An explicit ``--slot`` naming the slot to keep is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bootloader import layout, slots
from obelisk.errors import ObeliskError
from update_engine import omaha
from update_engine.errors import ApplyError


@dataclass(frozen=True)
class Target:
    index: int  # partition number of the slot to write
    offset: int  # bytes from the start of the disk
    length: int
    keep: int | None  # the slot left alone (None: no slot is bootable)

    @property
    def name(self) -> str:
        return layout.name_of(self.index)


def is_boot_disk(disk: Path) -> bool:
    try:
        booted = slots.find_boot_disk()
    except slots.SlotError:
        return False  # not an obelisk host (a build machine, a test): every disk is "another" disk
    return slots.same_file(booted, disk)


def keep_index(disk: Path, found: list[slots.Slot], *, booted: bool) -> int | None:
    """The slot to keep on ``disk`` (see the module docstring); ``booted``: ``disk`` holds the running /usr."""
    if booted:
        return slots.running_index(disk)
    ab = [s for s in found if s.index in (layout.USR_A, layout.USR_B)]
    good = [s for s in ab if s.successful and s.priority > 0]
    return slots.next_index(good) if good else slots.next_index(ab)


def choose(disk: Path, slot: int | None = None) -> Target:
    """The slot to write (``slot``, or the other one than the slot to keep) and its extent."""
    try:
        found = slots.read_slots(disk)
        booted = is_boot_disk(disk)
        keep = keep_index(disk, found, booted=booted)
        index = slot
        if index is None:
            if keep is None:
                raise ApplyError(f"{disk}: no slot is bootable, so the passive one is unknown: pass --slot",
                                 omaha.ERR_POSTINSTALL)
            index = layout.other(keep)
        if index == keep:
            what = "the running slot" if booted else \
                "the last good slot (the running slot when this disk boots)"
            raise ApplyError(f"{disk}: slot {layout.name_of(index)} is {what}; only the other slot is ever written",
                             omaha.ERR_POSTINSTALL)
        off, length = slots.slot_extent(disk, index)
        if keep is not None:
            k_off, k_len = slots.slot_extent(disk, keep)
            if off < k_off + k_len and k_off < off + length:
                raise ApplyError(f"{disk}: slots overlap in the partition table", omaha.ERR_POSTINSTALL)
    except ApplyError:
        raise
    except ObeliskError as exc:  # SlotError, GptError: a disk without a usable A/B table
        raise ApplyError(f"{disk}: {exc}", omaha.ERR_POSTINSTALL) from None
    except OSError as exc:
        raise ApplyError(f"cannot read the partition table of {disk}: {exc.strerror}", omaha.ERR_POSTINSTALL) from None
    return Target(index, off, length, keep)


def make_unbootable(disk: Path, index: int) -> None:
    """P=0 T=0 S=0 before the slot's content changes: a half-written slot can never be chosen to boot."""
    try:
        slots.mark_unbootable(disk, index)
    except (ObeliskError, OSError) as exc:
        raise ApplyError(f"cannot change slot attributes: {exc}", omaha.ERR_POSTINSTALL) from None

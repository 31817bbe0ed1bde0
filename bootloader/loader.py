"""Boot-loader side of the slot state (owner: the boot-chain work, issue 5).

Upstream GRUB cannot read GPT attribute bits, so the boot loader keeps its own copy of the
slot state (for example a grubenv on the ESP). The GPT stays the record: ``bootloader.slots``
calls :func:`reconcile` before it reads a disk's slots (to take in what the boot loader did,
e.g. tries it burned) and :func:`mirror` after every GPT write (to hand the new state to the
boot loader). The update engine calls :func:`stage` in postinstall to put the new slot's boot
data (verity root hash, hash offset, version) in place before the slot is prioritized.

Until the boot chain lands these do nothing: a disk without an obelisk ESP has no loader state.
"""

from __future__ import annotations

from pathlib import Path


def reconcile(disk: Path) -> None:
    """Bring the GPT in line with what the boot loader recorded. No-op without loader state."""


def mirror(disk: Path) -> None:
    """Copy the GPT's slot state into the boot loader's state. No-op without loader state."""


def stage(disk: Path, index: int, *, root_hash: str, hash_offset: int, version: str) -> None:
    """Record the boot data of a freshly written slot. No-op without loader state."""

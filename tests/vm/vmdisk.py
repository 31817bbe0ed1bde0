"""Helpers of the boot-chain tests: a small obelisk-layout disk with a real FAT ESP (no VM)."""

from __future__ import annotations

import uuid
from pathlib import Path

from bootloader import esp, gpt, grub, slots
from obelisk.tools import run

MIB = 1 << 20


def make_disk(path: Path, *, fat: int = 32, populate: bool = True) -> Path:
    """GPT with ESP (FAT), USR-A (P1 T0 S1), USR-B (P0 T0 S0), ROOT; the ESP holds grub.cfg + grubenv."""
    size_esp = {12: 4, 16: 20, 32: 40}[fat]
    parts = [
        gpt.PartitionSpec(1, "EFI-SYSTEM", slots.ESP_TYPE, uuid.UUID(int=11), 2048, size_esp * 2048),
        gpt.PartitionSpec(3, "USR-A", slots.USR_TYPE, slots.USR_A_UUID, 2048 * (1 + size_esp), 2048,
                          slots.encode(0, priority=1, tries=0, successful=True)),
        gpt.PartitionSpec(4, "USR-B", slots.USR_TYPE, slots.USR_B_UUID, 2048 * (2 + size_esp), 2048, 0),
        gpt.PartitionSpec(9, "ROOT", slots.ROOT_TYPE, uuid.UUID(int=12), 2048 * (3 + size_esp), 2048),
    ]
    gpt.create_table(path, (5 + size_esp) * MIB, parts, uuid.UUID("00000000-0000-0000-0000-000000000001"))
    espimg = path.with_suffix(".esp")
    with open(espimg, "wb") as f:
        f.truncate(size_esp * MIB)
    run(["mkfs.fat", "-F", str(fat), "-n", "EFI-SYSTEM", espimg])
    if populate:
        files = path.parent / "espfiles"
        files.mkdir(exist_ok=True)
        (files / "EFI/obelisk").mkdir(parents=True, exist_ok=True)
        # grub.cfg + grubenv only: the EFI binary (grub-mkimage) is covered by the VM tests.
        (files / grub.CFG_PATH).write_text(grub.render_cfg())
        (files / grub.ENV_PATH).write_bytes(
            grub.render_env(esp.initial_env(esp.SlotBoot("ab" * 32, 4096, "1.0.0")).to_vars()))
        run(["mcopy", "-s", "-i", espimg, files / "EFI", "::/"])
    with open(path, "r+b") as d, open(espimg, "rb") as e:
        d.seek(MIB)
        d.write(e.read())
    espimg.unlink()
    return path

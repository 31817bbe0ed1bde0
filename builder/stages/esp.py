"""Stage esp: the EFI system partition (FAT32, label EFI-SYSTEM) as an image file. The boot chain's
``bootloader.esp.populate`` writes the files; mkfs.fat + mcopy pack them without a mount."""

from __future__ import annotations

import os
from pathlib import Path

from bootloader import esp
from builder import fsutil
from builder.definition import MIB
from builder.errors import BuildError
from obelisk import tools

DEPENDS = ("usr",)
VOLUME_ID = "0b5e1c0d"  # fixed FAT serial: reproducible images


def inputs(ctx) -> dict:
    return {"esp_mib": ctx.definition.disk.esp_mib, "version": ctx.version, "epoch": ctx.epoch}


def run(ctx, out: Path) -> dict:
    usr = ctx["usr"].meta
    files = out / "files"
    files.mkdir()
    esp.populate(files, usr_a=esp.SlotBoot(root_hash=usr["verity_root_hash"], hash_offset=usr["hash_offset"],
                                           version=ctx.version))
    img = out / "esp.img"
    size = ctx.definition.disk.esp_mib * MIB
    used = sum(p.stat().st_size for p in files.rglob("*") if p.is_file())
    if used > size * 0.9:
        raise BuildError(f"the ESP files need {used // MIB + 1} MiB but disk.esp_mib is {ctx.definition.disk.esp_mib}: "
                         f"raise disk.esp_mib in {ctx.definition_path}")
    fsutil.make_sparse(img, size)
    env = {"SOURCE_DATE_EPOCH": str(ctx.epoch)}
    tools.run(["mkfs.fat", "-F", "32", "-n", "EFI-SYSTEM", "-i", VOLUME_ID, "--invariant", img], env=env)
    fsutil.clamp_mtimes(files, ctx.epoch)
    entries = sorted(os.listdir(files))
    if entries:
        tools.run(["mcopy", "-s", "-m", "-i", img, *[files / e for e in entries], "::/"], env=env)
    fsutil.remove_tree(files)
    return {"size": size}

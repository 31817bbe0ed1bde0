"""Stage disk: the GPT disk image. bootloader.gpt writes the protective MBR and both GPT copies
(USR-A P=1 T=0 S=1, USR-B P=0 T=0 S=0); the partition images are then copied in, sparse."""

from __future__ import annotations

import uuid
from pathlib import Path

from bootloader import gpt, slots
from builder import fsutil
from builder.definition import MIB

DEPENDS = ("esp", "usr", "fs")
SECTOR = 512
DISK_GUID = uuid.UUID("00000000-0000-0000-0000-000000000001")  # placeholder: first boot randomizes it
LINUX_DATA = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
NAMESPACE = uuid.UUID("0b5e1c0d-0b5e-4c0d-8b5e-1c0d0b5e1c0d")
ESP, OEM, ROOT = 1, 6, 9


def inputs(ctx) -> dict:
    return {"disk": ctx.definition.disk.model_dump(), "name": ctx.name}


def layout(ctx) -> list[gpt.PartitionSpec]:
    disk = ctx.definition.disk

    def guid(label: str) -> uuid.UUID:
        return uuid.uuid5(NAMESPACE, f"{ctx.name}/{label}/part")

    usr_a = slots.encode(0, priority=1, tries=0, successful=True)
    order = [  # (index, label, type, part guid, MiB, attributes), in disk order
        (ESP, "EFI-SYSTEM", slots.ESP_TYPE, guid("EFI-SYSTEM"), disk.esp_mib, 0),
        (slots.USR_A, "USR-A", slots.USR_TYPE, slots.USR_A_UUID, disk.usr_mib, usr_a),
        (slots.USR_B, "USR-B", slots.USR_TYPE, slots.USR_B_UUID, disk.usr_mib, 0),
        (OEM, "OEM", LINUX_DATA, guid("OEM"), disk.oem_mib, 0),
        (ROOT, "ROOT", slots.ROOT_TYPE, guid("ROOT"), disk.root_mib, 0),
    ]
    specs, lba = [], MIB // SECTOR
    for index, label, type_guid, part_guid, mib, attrs in order:
        size = mib * MIB // SECTOR
        specs.append(gpt.PartitionSpec(index=index, name=label, type_guid=type_guid, part_guid=part_guid,
                                       first_lba=lba, size_lba=size, attributes=attrs))
        lba += size
    return specs


def run(ctx, out: Path) -> dict:
    img = out / "disk.raw"
    specs = layout(ctx)
    ctx.log("disk: GPT")
    gpt.create_table(img, ctx.definition.disk.total_bytes, specs, DISK_GUID)
    by_index = {s.index: s for s in specs}
    contents = {ESP: ctx["esp"].path("esp.img"), slots.USR_A: ctx["usr"].path("usr.img"),
                OEM: ctx["fs"].path("oem.img"), ROOT: ctx["fs"].path("root.img")}
    for index, src in contents.items():
        spec = by_index[index]
        if src.stat().st_size > spec.size_lba * SECTOR:
            raise ValueError(f"{src.name} is larger than partition {spec.name}")  # checked earlier; a bug if seen
        ctx.log(f"disk: {spec.name}")
        fsutil.copy_sparse(src, img, dst_offset=spec.first_lba * SECTOR)
    return {"size": img.stat().st_size,
            "partitions": {s.name: {"index": s.index, "offset": s.first_lba * SECTOR, "size": s.size_lba * SECTOR}
                           for s in specs}}

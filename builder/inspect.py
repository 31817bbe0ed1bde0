"""`obelisk image inspect`: what a disk image or a release holds. Read-only: nothing is written
(the GPT and the ESP's grubenv are read directly, not through bootloader.slots, which reconciles)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from bootloader import esp, gpt, grub, slots
from obelisk.errors import ObeliskError
from obelisk.inputs import check_input

TYPE_NAMES = {
    slots.ESP_TYPE: "EFI-SYSTEM",
    slots.USR_TYPE: "obelisk-usr",
    slots.ROOT_TYPE: "obelisk-resize",
    uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4"): "linux-data",
}


class InspectError(ObeliskError, ValueError):
    pass


def _loader_slots(disk: Path) -> dict[str, dict]:
    """Per-slot boot data (version, root hash) from the ESP's grubenv, when the disk has one."""
    try:
        env = grub.LoaderEnv.from_vars(grub.parse_env(esp.read_file(disk, grub.ENV_PATH)))
    except ObeliskError:  # no ESP or no grubenv (a disk of another kind): inspect shows the GPT only
        return {}
    return {n: {"version": s.version, "root_hash": s.hash, "hash_offset": s.hashoff} for n, s in env.slots.items()}


def inspect_disk(disk: Path) -> dict:
    table = gpt.read_table(disk)
    ss = table.sector_size
    loader = _loader_slots(disk)
    parts, slot_list = [], []
    for p in sorted(table.partitions, key=lambda p: p.index):
        entry = {"index": p.index, "name": p.name, "type": TYPE_NAMES.get(p.type_guid, str(p.type_guid)),
                 "type_guid": str(p.type_guid), "part_guid": str(p.part_guid), "offset": p.first_lba * ss,
                 "size": (p.last_lba - p.first_lba + 1) * ss, "attributes": f"0x{p.attributes:016x}"}
        if p.type_guid == slots.USR_TYPE:
            prio, tries, ok = slots.decode(p.attributes)
            name = "A" if p.index == slots.USR_A else "B" if p.index == slots.USR_B else str(p.index)
            entry["slot"] = {"name": name, "priority": prio, "tries": tries, "successful": ok,
                             "bootable": prio > 0 and (tries > 0 or ok)}
            slot_list.append({"name": name, "index": p.index, **entry["slot"], **loader.get(name, {})})
        parts.append(entry)
    return {"path": str(disk), "size": disk.stat().st_size, "disk_guid": str(table.disk_guid),
            "sector_size": ss, "partitions": parts, "slots": slot_list}


def inspect(target: Path) -> dict:
    if target.is_dir():
        rel = target / "release.json"
        if not rel.exists():
            raise InspectError(f"{target}: no release.json: give a release folder (out/<name>/<version>) or a disk")
        check_input(rel, "release.json")
        try:
            info: dict = {"release": json.loads(rel.read_text())}
        except (ValueError, UnicodeDecodeError) as exc:
            raise InspectError(f"{rel}: not valid JSON: {exc}") from None
        except OSError as exc:
            raise InspectError(f"{rel}: cannot read: {exc.strerror}") from None
        if not isinstance(info["release"], dict):
            raise InspectError(f"{rel}: not a release.json (a JSON object): rebuild the release")
        disk = target / "disk.raw"
        if disk.exists():
            info["disk"] = inspect_disk(check_input(disk, "disk image"))
        return info
    if not target.exists() and not target.is_symlink():
        raise InspectError(f"{target}: no such file or folder")
    return {"disk": inspect_disk(check_input(target, "disk image", block_device=True))}


def release_packages(target: Path) -> list[dict]:
    """The package manifest of a release folder (its release.json's ``packages``)."""
    if not target.is_dir():
        raise InspectError(f"{target}: --packages needs a release folder (out/<name>/<version>), not a disk")
    release = inspect(target)["release"]
    pkgs = release.get("packages")
    if pkgs is None:
        raise InspectError(f"{target}: release.json has no package manifest (built by an older obelisk): "
                           "rebuild the release")
    if not isinstance(pkgs, list) or not all(isinstance(p, dict) and {"name", "version", "source", "kind"}
                                             <= p.keys() for p in pkgs):
        raise InspectError(f"{target}: release.json's packages is not a list of name/version/source entries: "
                           "the file is damaged; rebuild or re-download the release")
    return [{k: str(p[k]) for k in ("name", "version", "source", "kind")} for p in pkgs]

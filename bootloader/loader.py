"""Boot-loader side of the slot state: the grubenv on the ESP, kept in step with the GPT.

Upstream GRUB cannot read GPT attribute bits, so GRUB reads a copy of each USR slot's
priority/tries/successful from ``/EFI/obelisk/grubenv`` (format: ``bootloader.grub``). The GPT
stays the record: ``bootloader.slots`` calls :func:`reconcile` before it reads a disk's slots (to
take in what the boot loader did: tries it burned, a mark-good written by a guest without
Python) and :func:`mirror` after every GPT write (to hand the new state to GRUB). The update
engine calls :func:`stage` in postinstall to put the new slot's boot data (verity root hash, hash
offset, version) in place before the slot is prioritized.

Crash safety: the env keeps, per slot, the GPT attributes it was mirrored from (``base``) beside
the working values GRUB changes. If ``base`` equals the GPT, working values that differ are the
loader's news and go into the GPT. If ``base`` differs, obelisk wrote the GPT after the last
mirror and crashed before mirroring: the GPT wins. Either way the env is rewritten from the GPT.

This module uses ``bootloader.gpt`` directly, never ``bootloader.slots`` (which calls it). A disk
without an obelisk ESP (no ``/EFI/obelisk/grubenv``) has no loader state: every function is a
no-op there.
"""

from __future__ import annotations

from pathlib import Path

from bootloader import esp, gpt, grub
from bootloader.layout import INDEX_NAME as _NAMES
from bootloader.layout import USR_A, USR_B, USR_TYPE
from bootloader.layout import decode_bits as _decode
from bootloader.layout import encode_bits as _encode


class LoaderError(gpt.GptError):
    """The disk's boot-loader state cannot be used (a GptError, so every slot CLI reports it in one line)."""


def _usr(table: gpt.GptTable) -> dict[str, gpt.GptPartition]:
    return {_NAMES[p.index]: p for p in table.partitions if p.type_guid == USR_TYPE and p.index in _NAMES}


def read_env(disk: Path) -> grub.LoaderEnv | None:
    """The loader state on ``disk``, or None when the disk has no obelisk ESP."""
    disk = Path(disk)
    try:
        raw = esp.read_file(disk, grub.ENV_PATH)
    except (esp.EspError, gpt.GptError):
        return None
    except OSError as exc:
        raise LoaderError(f"{disk}: cannot read the ESP: {exc.strerror}") from None
    try:
        return grub.LoaderEnv.from_vars(grub.parse_env(raw))
    except grub.GrubEnvError as exc:
        raise LoaderError(f"{disk}: /{grub.ENV_PATH} on the ESP is damaged ({exc}): restore the ESP from the "
                          "release's disk image, or re-stage the slots with 'obelisk update apply'") from None


def _write_env(disk: Path, env: grub.LoaderEnv) -> None:
    try:
        esp.rewrite_file(disk, grub.ENV_PATH, grub.render_env(env.to_vars()))
    except (esp.EspError, grub.GrubEnvError) as exc:
        raise LoaderError(f"{disk}: cannot write /{grub.ENV_PATH}: {exc}") from None
    except OSError as exc:
        raise LoaderError(f"{disk}: cannot write /{grub.ENV_PATH}: {exc.strerror}") from None


def _sync_from(table: gpt.GptTable, env: grub.LoaderEnv) -> None:
    for name, part in _usr(table).items():
        p, t, s = _decode(part.attributes)
        slot = env.slots[name]
        slot.prio, slot.tries, slot.ok, slot.base = p, t, bool(s), (p, t, s)


def news(table: gpt.GptTable, env: grub.LoaderEnv) -> dict[int, int]:
    """GPT attribute changes the loader made (slots whose base still equals the GPT)."""
    changes: dict[int, int] = {}
    for name, part in _usr(table).items():
        slot = env.slots[name]
        current = _decode(part.attributes)
        if slot.base == current and slot.working != current:
            changes[part.index] = _encode(part.attributes, *slot.working)
    return changes


def in_step(table: gpt.GptTable, env: grub.LoaderEnv) -> bool:
    return all(env.slots[n].base == _decode(p.attributes) == env.slots[n].working for n, p in _usr(table).items())


def reconcile(disk: Path) -> None:
    """Bring the GPT in line with what the boot loader recorded, then the env in line with the GPT."""
    disk = Path(disk)
    env = read_env(disk)
    if env is None:
        return
    table = gpt.read_table(disk)
    changes = news(table, env)
    if changes:
        gpt.write_table(disk, gpt.with_attributes(table, changes))
        table = gpt.read_table(disk)
    if changes or not in_step(table, env):
        _sync_from(table, env)
        _write_env(disk, env)


def mirror(disk: Path) -> None:
    """Copy the GPT's slot state into the boot loader's state (working values and base)."""
    disk = Path(disk)
    env = read_env(disk)
    if env is None:
        return
    table = gpt.read_table(disk)
    if in_step(table, env):
        return
    _sync_from(table, env)
    _write_env(disk, env)


def stage(disk: Path, index: int, *, root_hash: str, hash_offset: int, version: str) -> None:
    """Record the boot data of a freshly written slot (before it is prioritized)."""
    disk = Path(disk)
    env = read_env(disk)
    if env is None:
        return
    if index not in _NAMES:
        raise LoaderError(f"partition {index} is not a USR slot: "
                          f"use {USR_A} ({_NAMES[USR_A]}) or {USR_B} ({_NAMES[USR_B]})")
    if not root_hash or any(c not in "0123456789abcdef" for c in root_hash.lower()):
        raise LoaderError(f"root hash {root_hash!r} is not hex: pass the slot's verity root hash")
    table = gpt.read_table(disk)
    # Take the loader's news first: a stale base must not let an old GRUB write win later.
    changes = news(table, env)
    if changes:
        gpt.write_table(disk, gpt.with_attributes(table, changes))
        table = gpt.read_table(disk)
    _sync_from(table, env)
    slot = env.slots[_NAMES[index]]
    slot.hash, slot.hashoff, slot.version = root_hash.lower(), int(hash_offset), version
    _write_env(disk, env)

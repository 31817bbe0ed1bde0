"""Postinstall: make a fully written, verified slot the next boot, for one trial.

First the boot data the loader needs for the slot (``bootloader.loader.stage``: root hash, hash
offset, version), then the GPT attributes (``slots.stage_trial``: S=0 T=1, prioritized), so a kill
in between leaves a slot that never boots (P=0 since the write began) rather than one without its
boot data. The previous version is recorded by the caller (the daemon's state).
"""

from __future__ import annotations

from pathlib import Path

from bootloader import loader, slots
from obelisk.errors import ObeliskError
from update_engine import omaha
from update_engine.errors import ApplyError
from update_engine.payload import Manifest


def postinstall(disk: Path, index: int, m: Manifest) -> None:
    try:
        loader.stage(disk, index, root_hash=m.verity_root_hash, hash_offset=m.hash_offset, version=m.version)
        slots.stage_trial(disk, index)
    except (ObeliskError, OSError) as exc:
        raise ApplyError(f"postinstall failed: {exc}", omaha.ERR_POSTINSTALL) from None

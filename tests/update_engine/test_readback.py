"""The apply's read-back and whole-payload checks, which run in their own thread behind the writer.

A disk that returns other bytes than were written cannot be made here, so the write is the fake: a wrapped
``slotwriter.pwrite_all`` stores one chunk with a flipped bit after that chunk passed its signed-hash check (as a faulty
disk or a stray writer would). Everything else is real: the payload, the disk image file, the GPT."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from ue_helpers import World, slot_attrs, slot_bytes

from obelisk.signing import load_public_key
from update_engine import apply as applymod
from update_engine import omaha, slotwriter


def test_slot_that_reads_back_wrong_is_refused(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    new = world.build("1.1.0", seed=2)
    disk = world.disk(tmp_path / "disk.raw")
    a_before = hashlib.sha256(slot_bytes(disk, 3)).hexdigest()
    attrs_before = slot_attrs(disk)
    orig = slotwriter.pwrite_all
    calls = [0]

    def corrupting(fd: int, data, offset: int) -> None:
        calls[0] += 1
        if calls[0] == 3:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x10
        orig(fd, data, offset)

    monkeypatch.setattr(slotwriter, "pwrite_all", corrupting)
    with pytest.raises(applymod.ApplyError) as exc:
        applymod.Applier(str(new.payload), disk, [load_public_key(world.pub)]).run()
    assert exc.value.code == omaha.ERR_NEW_ROOTFS_VERIFICATION and "chunk 2 does not read back" in str(exc.value)
    assert hashlib.sha256(slot_bytes(disk, 3)).hexdigest() == a_before
    assert slot_attrs(disk)["A"] == attrs_before["A"]
    assert slot_attrs(disk)["B"][0] == 0  # never made bootable


def test_whole_payload_hash_checked_and_apply_succeeds(world: World, tmp_path: Path) -> None:
    """The Omaha SHA-256 is computed beside the write: a wrong one is refused, the right one passes."""
    new = world.build("1.1.0", seed=2)
    good = hashlib.sha256(new.payload.read_bytes()).hexdigest()
    disk = world.disk(tmp_path / "disk.raw")
    keys = [load_public_key(world.pub)]
    with pytest.raises(applymod.ApplyError) as exc:
        applymod.Applier(str(new.payload), disk, keys, policy=applymod.Policy(expected_sha256="0" * 64)).run()
    assert exc.value.code == omaha.ERR_PAYLOAD_HASH
    assert slot_attrs(disk)["B"][0] == 0
    result = applymod.Applier(str(new.payload), disk, keys, policy=applymod.Policy(expected_sha256=good)).run()
    assert result.version == "1.1.0"
    assert slot_bytes(disk, 4)[: new.usr.stat().st_size] == new.usr.read_bytes()

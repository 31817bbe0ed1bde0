"""The orchestrating Applier: its steps in order, what it leaves behind on success and on refusal."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from ue_helpers import World, slot_attrs, slot_bytes

from obelisk.signing import load_public_key
from update_engine import omaha
from update_engine.apply import MANIFEST_FILE, PROGRESS_FILE, Applier, ApplyError, Policy


def test_phases_in_order_and_nothing_left_behind(world: World, tmp_path: Path) -> None:
    new = world.build("1.1.0", seed=2)
    disk = world.disk(tmp_path / "disk.raw")
    state = tmp_path / "state"
    phases: list[str] = []
    done: list[int] = []
    a = Applier(str(new.payload), disk, [load_public_key(world.pub)], state_dir=state, on_phase=phases.append,
                on_progress=lambda phase, n, total: done.append(n))
    r = a.run()
    assert phases == ["downloading", "verifying", "finalizing"]
    assert a.slot_name == r.slot == "B" and r.index == 4 and r.resumed_from == 0
    assert done[-1] == new.manifest.data_size and done == sorted(done)
    assert r.manifest["version"] == "1.1.0" and r.manifest["operations"] == 1
    assert not (state / PROGRESS_FILE).exists() and not (state / MANIFEST_FILE).exists()


def test_refusal_before_any_write(world: World, tmp_path: Path) -> None:
    new = world.build("1.1.0", seed=2)
    disk = world.disk(tmp_path / "disk.raw")
    state = tmp_path / "state"
    before = (slot_attrs(disk), hashlib.sha256(slot_bytes(disk, 4)).hexdigest())
    phases: list[str] = []
    with pytest.raises(ApplyError) as ei:
        Applier(str(new.payload), disk, [load_public_key(world.pub)], state_dir=state, on_phase=phases.append,
                policy=Policy(arch="riscv64")).run()
    assert ei.value.code == omaha.ERR_PAYLOAD_VERIFICATION and phases == ["downloading"]
    assert (slot_attrs(disk), hashlib.sha256(slot_bytes(disk, 4)).hexdigest()) == before  # not even marked
    assert not (state / PROGRESS_FILE).exists()
    with pytest.raises(ApplyError, match="not an http"):
        Applier(str(new.payload), disk, [load_public_key(world.pub)], urls_only=True).run()
    with pytest.raises(ApplyError, match="no such disk"):
        Applier(str(new.payload), tmp_path / "none.raw", [load_public_key(world.pub)]).run()
